"""The ONNX engine: parity over the model zoo, caching, refusals, light workers, crashes."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import kerasfleet
from conftest import assert_clean, assert_same, load_x, load_y
from kerasfleet.cache import cache_dir
from kerasfleet.engines.export import ExportRefused, export_key
from kerasfleet.engines.export import export as export_onnx
from kerasfleet.engines.model_file import ModelFile, Signature, resolve_model

# The module itself: `kerasfleet.engines.export` may be shadowed by a function of that name.
export_module = sys.modules["kerasfleet.engines.export"]

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


class OneLayer:
    def call(self, x):
        return x * 2


class OtherLayer:
    def call(self, x):
        return x * 3


@pytest.fixture
def model_file(tmp_path):
    """A ModelFile for key tests: the key hashes the file's bytes, so any file will do."""
    path = tmp_path / "m.keras"
    path.write_bytes(b"not a real model")
    return ModelFile(path, Signature(None, "single"))


def test_export_key_covers_safe_mode_custom_classes_and_tool_versions(model_file, monkeypatch):
    def key(custom_objects=None, safe_mode=True):
        return export_key(model_file, custom_objects, safe_mode, 1e-4, 1e-5)

    base = key()
    assert key() == base
    assert key(safe_mode=False) != base
    assert key({"Layer": OneLayer}) != base
    # Same registered name, different code: the file stores only the name, so the source decides.
    assert key({"Layer": OneLayer}) != key({"Layer": OtherLayer})
    # A class without retrievable source (built by type()) still keys by its qualified name.
    assert key({"Layer": type("Built", (), {})}) != key({"Layer": type("Other", (), {})})
    assert export_key(model_file, None, True, 0.0, 0.0) != base

    versions = dict(export_module.tool_versions())
    monkeypatch.setattr(export_module, "tool_versions", lambda: tuple({**versions, "tf2onnx": "0.0.1"}.items()))
    assert key() != base


def test_export_key_covers_the_custom_module_source(tmp_path, monkeypatch):
    module = tmp_path / "kf_key_test_layers.py"
    module.write_text("SCALE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "m.keras"
    path.write_bytes(b"not a real model")
    model = ModelFile(path, Signature(None, "single", ("kf_key_test_layers",)))
    before = export_key(model, None, True, 1e-4, 1e-5)
    assert export_key(model, None, True, 1e-4, 1e-5) == before
    module.write_text("SCALE = 2\n")
    assert export_key(model, None, True, 1e-4, 1e-5) != before


@pytest.fixture
def count_exports(monkeypatch, tmp_path):
    """A fresh cache, and a list that grows by one per export actually run."""
    monkeypatch.setenv("KERASFLEET_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    original = export_module._run_export

    def counting(task):
        calls.append(task)
        return original(task)

    monkeypatch.setattr(export_module, "_run_export", counting)
    return calls


def test_concurrent_exports_of_one_model_run_once(zoo, count_exports):
    model = resolve_model(zoo("jax") / "mlp.keras")
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(export_onnx, model, custom_objects=None, safe_mode=True) for _ in range(2)]
        results = [f.result(timeout=600) for f in futures]
    assert results[0].path == results[1].path and results[0].meta == results[1].meta
    assert len(count_exports) == 1
    folder = cache_dir() / "onnx"
    assert list(folder.glob("*.tmp*")) == [] and list(folder.glob(".*")) == []


def test_a_refused_export_is_remembered(zoo, count_exports):
    model = resolve_model(zoo("jax") / "multi_input.keras")
    with pytest.raises(ExportRefused, match="Expected the ONNX model to match Keras") as first:
        export_onnx(model, custom_objects=None, safe_mode=True, rtol=0.0, atol=0.0)
    assert len(count_exports) == 1
    assert len(list((cache_dir() / "onnx").glob("*.refused.json"))) == 1
    with pytest.raises(ExportRefused) as second:
        export_onnx(model, custom_objects=None, safe_mode=True, rtol=0.0, atol=0.0)
    assert str(second.value) == str(first.value)
    assert len(count_exports) == 1


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
