"""Predictor: in-process, every bucket warmed at construction, no retracing afterwards."""

import warnings

import numpy as np
import pytest

import kerasfleet
from conftest import assert_same, load_x, load_y

SIZES = [1, 2, 3, 7, 8, 100, 255, 256, 257, 1000, 1024, 1500]


@pytest.mark.parametrize("engine", ["keras", "onnx"])
def test_every_batch_size_matches_without_retracing(zoo, engine):
    folder = zoo("jax")
    x, y = load_x(folder, "mlp"), load_y(folder, "mlp")["output_0"]
    predictor = kerasfleet.Predictor(folder / "mlp.keras", engine=engine, max_batch_size=1024)
    assert predictor.engine_name == engine and predictor.buckets == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    for n in SIZES:
        np.testing.assert_allclose(predictor.predict(x[:n]), y[:n], rtol=1e-5, atol=1e-6)
    stats = predictor.stats()
    assert stats["calls"] == len(SIZES) and stats["retraces"] == 0
    assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]


def test_zero_rows_give_empty_outputs(zoo):
    folder = zoo("jax")
    predictor = kerasfleet.Predictor(folder / "multi_output.keras", engine="keras", max_batch_size=4)
    got = predictor.predict(load_x(folder, "multi_output")[:0])
    assert {k: v.shape for k, v in got.items()} == {"score": (0, 1), "classes": (0, 5)}


def test_keras_engine_counts_a_real_retrace(zoo):
    folder = zoo("jax")
    predictor = kerasfleet.Predictor(folder / "mlp.keras", engine="keras", max_batch_size=8)
    predictor._run(5, [np.zeros((5, 32), "float32")])  # a shape outside the buckets: must show
    assert predictor.stats()["retraces"] == 1


def test_multi_io_structure_and_dict_inputs(zoo):
    folder = zoo("jax")
    predictor = kerasfleet.Predictor(folder / "multi_output.keras", max_batch_size=64)
    got = predictor.predict(load_x(folder, "multi_output")[:50])
    expected = {k: v[:50] for k, v in load_y(folder, "multi_output").items()}
    assert_same(got, expected)
    predictor = kerasfleet.Predictor(folder / "multi_input.keras", max_batch_size=16)
    x = load_x(folder, "multi_input")
    assert_same(
        predictor.predict({k: v[:40] for k, v in x.items()}), {"output_0": load_y(folder, "multi_input")["output_0"][:40]}
    )


def test_auto_falls_back_to_keras_with_a_reason(zoo, monkeypatch):
    import kerasfleet.engines.export as onnx_module

    def broken_export(*args, **kwargs):
        raise kerasfleet.ModelLoadError("exporter unavailable in this test")

    monkeypatch.setattr(onnx_module, "export", broken_export)
    folder = zoo("jax")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predictor = kerasfleet.Predictor(folder / "mlp.keras", max_batch_size=4)
    assert predictor.engine_name == "keras"
    assert any("exporter unavailable in this test" in str(w.message) for w in caught)


def test_bad_arguments_and_inputs(zoo):
    folder = zoo("jax")
    with pytest.raises(kerasfleet.InputError, match="max_batch_size"):
        kerasfleet.Predictor(folder / "mlp.keras", max_batch_size=0)
    with pytest.raises(kerasfleet.InputError, match="engine"):
        kerasfleet.Predictor(folder / "mlp.keras", engine="tensorrt")
    predictor = kerasfleet.Predictor(folder / "mlp.keras", engine="onnx", max_batch_size=4)
    with pytest.raises(kerasfleet.InputError, match=r"shape \(rows, 32\)"):
        predictor.predict(np.zeros((2, 3), "float32"))
    np.testing.assert_allclose(
        predictor.predict(load_x(folder, "mlp")[:3].astype("float64")),
        load_y(folder, "mlp")["output_0"][:3],
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("backend", ["tensorflow", "torch"])
def test_retrace_count_is_real_on_other_backends(zoo, tmp_path, backend):
    """TF counts real traces; torch runs eagerly and counts first calls at a new input shape."""
    import json
    import os
    import subprocess
    import sys

    folder = zoo(backend)
    script = tmp_path / "retraces.py"
    script.write_text(
        "import json, sys, numpy as np, kerasfleet\n"
        f"p = kerasfleet.Predictor({str(folder / 'mlp.keras')!r}, engine='keras', max_batch_size=8)\n"
        f"x = np.load({str(folder / 'mlp.x.npz')!r})['features']\n"
        "for n in (1, 2, 3, 5, 8, 13): p.predict(x[:n])\n"
        "after_calls = p.stats()['retraces']\n"
        "p._run(5, [x[:5]])  # a shape outside the buckets: a real retrace\n"
        "print(json.dumps([after_calls, p.stats()['retraces'], p.engine_name]))\n"
    )
    env = {**os.environ, "KERAS_BACKEND": backend}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [0, 1, "keras"]
