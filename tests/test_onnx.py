"""The ONNX engine: parity over the model zoo, caching, refusals, light workers, crashes."""

import os
import subprocess
import sys

import numpy as np
import pytest

import kerasfleet
from conftest import assert_clean, assert_same, load_x, load_y
from kerasfleet.engines.model_file import resolve_model
from kerasfleet.cache import cache_dir
from kerasfleet.engines.export import ExportRefused
from kerasfleet.engines.export import export as export_onnx

MODELS = ["mlp", "multi_input", "multi_output", "batchnorm_dropout", "embedding", "custom_layer"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("backend", ["jax", "tensorflow"])  # files saved on either; the export itself runs on TF
def test_onnx_matches_model_predict(zoo, backend, name):
    folder = zoo(backend)
    got = kerasfleet.predict(folder / f"{name}.keras", load_x(folder, name), engine="onnx", workers=2, progress=False)
    assert_same(got, load_y(folder, name))


def test_export_is_cached_by_model_hash(zoo):
    model = resolve_model(zoo("jax") / "mlp.keras")
    first = export_onnx(model, custom_objects=None, safe_mode=True)
    mtime = first.path.stat().st_mtime_ns
    second = export_onnx(model, custom_objects=None, safe_mode=True)
    assert second.path == first.path and second.path.stat().st_mtime_ns == mtime
    assert first.path.parent == cache_dir() / "onnx"
    assert first.meta["parity"]["max_abs"] < 1e-5


def test_export_beyond_tolerance_is_refused_with_the_numbers(zoo):
    model = resolve_model(zoo("jax") / "multi_input.keras")
    with pytest.raises(
        ExportRefused, match=r"Expected the ONNX model to match Keras within rtol=0.*max abs [0-9.e-]+, max relative"
    ):
        export_onnx(model, custom_objects=None, safe_mode=True, rtol=0.0, atol=0.0)
    assert list((cache_dir() / "onnx").glob("*.tmp.onnx")) == []


def test_onnx_workers_load_no_framework(zoo):
    folder = zoo("jax")
    with kerasfleet.Fleet(folder / "mlp.keras", engine="onnx", workers=2) as fleet:
        fleet.wait_ready(timeout=120)
        for pid in fleet.pids:
            with open(f"/proc/{pid}/maps") as f:
                maps = f.read()
            assert "onnxruntime" in maps
            assert "tensorflow" not in maps and "jaxlib" not in maps
        np.testing.assert_allclose(fleet.predict(load_x(folder, "mlp")), load_y(folder, "mlp")["output_0"], rtol=1e-5, atol=1e-6)


def test_onnx_worker_crash_is_requeued(zoo, monkeypatch, tmp_path):
    folder = zoo("jax")
    monkeypatch.setenv("KERASFLEET_FAULT", f"segfault@2000@{tmp_path / 'fired'}")
    got = kerasfleet.predict(
        folder / "mlp.keras", load_x(folder, "mlp"), engine="onnx", workers=2, batch_size=100, progress=False
    )
    assert (tmp_path / "fired").exists()
    assert_same(got, load_y(folder, "mlp"))
    assert_clean()


def test_cli_export_and_engine_flag(zoo, tmp_path):
    folder = zoo("tensorflow")
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run(
        [sys.executable, "-m", "kerasfleet", "export", folder / "multi_output.keras", "-o", tmp_path / "m.onnx"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "matches Keras on a sample batch" in result.stdout and (tmp_path / "m.onnx").stat().st_size > 1000
    np.save(tmp_path / "x.npy", load_x(folder, "multi_output"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kerasfleet",
            "predict",
            folder / "multi_output.keras",
            tmp_path / "x.npy",
            "-o",
            tmp_path / "y.npz",
            "--engine",
            "onnx",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert_same(dict(np.load(tmp_path / "y.npz")), load_y(folder, "multi_output"))
