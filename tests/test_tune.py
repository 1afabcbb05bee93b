"""engine="auto": the measured trial, the stored plan, and when no worker starts at all."""

import contextlib
import dataclasses
import json
import shutil
import threading
import warnings

import numpy as np
import psutil
import pytest

import kerasfleet
from conftest import assert_same, load_x, load_y
from kerasfleet import Fleet
from kerasfleet.cache import cache_dir
from kerasfleet.engines.model_file import resolve_model
from kerasfleet.tune import TunedPlan, cached_plan, get_plan, plan_path, tune


@pytest.fixture(scope="module")
def folder(zoo):
    return zoo("jax")


@pytest.fixture(scope="module")
def plan(folder):
    return tune(resolve_model(folder / "mlp.keras"), backend="jax", seconds=2.0, fleet_factory=Fleet)


def test_trial_measures_engines_splits_and_in_process(plan):
    kinds = {(row["where"], row["engine"], row["workers"], row["threads"]) for row in plan.table}
    assert ("in-process", "onnx", 1, 2) in kinds and ("workers", "onnx", 2, 1) in kinds and ("workers", "keras", 2, 1) in kinds
    # OpenVINO on the same export (its parity checked) is a candidate in and out of process.
    assert ("in-process", "openvino", 1, 2) in kinds and ("workers", "openvino", 2, 1) in kinds
    inproc = [row for row in plan.table if row["where"] == "in-process"]
    best = max(inproc, key=lambda row: row["rows_per_s"])
    assert (plan.in_process_engine, plan.in_process_rows_per_s) == (best["engine"], best["rows_per_s"])
    fleets = [row for row in plan.table if row["where"] == "workers"]
    assert plan.rows_per_s == max(row["rows_per_s"] for row in fleets) > 0
    assert all(row["start_s"] > 0 for row in fleets)


def test_plan_is_stored_and_reused(folder, plan):
    model = resolve_model(folder / "mlp.keras")
    path = plan_path(model, "jax")
    stored = json.loads(path.read_text())
    assert stored["engine"] == plan.engine and stored["machine"]["cores"] >= 1
    again = get_plan(model, backend="jax", fleet_factory=Fleet)  # no trial: read back as stored
    assert again == cached_plan(model, "jax") and again.table == plan.table


@contextlib.contextmanager
def watch_processes(monkeypatch):
    """Records the child processes that exist at any time inside the block (sampled every 10 ms)
    and every Fleet built: {"children": {pid: cmdline}, "fleets": int}."""
    seen = {"children": {}, "fleets": 0}
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    build = Fleet.__init__

    def counting_init(self, *args, **kwargs):
        seen["fleets"] += 1
        build(self, *args, **kwargs)

    monkeypatch.setattr(Fleet, "__init__", counting_init)
    stop = threading.Event()

    def sample():
        while True:
            for p in me.children(recursive=True):
                if p.pid not in before:
                    with contextlib.suppress(psutil.Error):
                        seen["children"].setdefault(p.pid, " ".join(p.cmdline()))
            if stop.wait(0.01):
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield seen
    finally:
        stop.set()
        sampler.join()
        monkeypatch.setattr(Fleet, "__init__", build)


def test_in_process_crossover_from_hand_picked_numbers():
    plan = TunedPlan("onnx", 2, 1, 256, rows_per_s=4000.0, start_s=1.0, in_process_rows_per_s=1000.0)
    assert plan.use_in_process(1) and plan.use_in_process(1000)  # 1000 rows: 1.0 s in-process, 1.25 s with workers
    assert plan.use_in_process(1333) and not plan.use_in_process(1334)  # even at 4000 / 3 = 1333.3 rows
    assert not plan.use_in_process(2000)  # 2000 rows: 2.0 s in-process, 1.5 s with workers
    assert "used by one-shot calls below 1,333 rows" in plan.describe()
    faster_here = dataclasses.replace(plan, in_process_rows_per_s=5000.0)
    assert faster_here.use_in_process(10**9) and "of any size" in faster_here.describe()
    assert not dataclasses.replace(plan, in_process_rows_per_s=None).use_in_process(1)  # no verified ONNX export


def test_auto_one_shot_runs_in_process_when_starting_workers_does_not_pay(folder, plan, monkeypatch, tmp_path):
    model = folder / "mlp.keras"
    x, y = load_x(folder, "mlp"), load_y(folder, "mlp")["output_0"]
    # With the measured plan, 100 rows of a tiny MLP run in this process: no Fleet, no process.
    assert plan.use_in_process(100), f"expected in-process to win for 100 rows on a tiny MLP: {plan.describe()}"
    with watch_processes(monkeypatch) as seen:
        got = kerasfleet.predict(model, x[:100], backend="jax")
    assert seen == {"children": {}, "fleets": 0}
    assert_same(got, {"output_0": y[:100]})
    # Zero rows in-process, also into an out= file.
    empty = kerasfleet.predict(model, x[:0], backend="jax", out=str(tmp_path / "empty.npy"))
    assert empty.shape == (0, 10) and np.load(tmp_path / "empty.npy").shape == (0, 10)

    # Both sides of the crossover, with a stored plan of hand-picked rates (the measured one may
    # favour in-process ONNX at any size on this machine): in-process 1000 rows/s, workers 4000
    # rows/s after 1 s of start-up, so 1000 rows stay here and 2000 rows start the workers.
    exports = cache_dir() / "onnx"
    monkeypatch.setenv("KERASFLEET_CACHE_DIR", str(tmp_path))
    shutil.copytree(exports, tmp_path / "onnx")  # the verified export, so no second export runs
    picked = dataclasses.replace(plan, rows_per_s=4000.0, start_s=1.0, in_process_rows_per_s=1000.0)
    stored = plan_path(resolve_model(model), "jax")
    stored.parent.mkdir(parents=True)
    stored.write_text(json.dumps(dataclasses.asdict(picked)))
    with watch_processes(monkeypatch) as seen:
        got = kerasfleet.predict(model, x[:1000], backend="jax")
    assert seen == {"children": {}, "fleets": 0}
    assert_same(got, {"output_0": y[:1000]})
    with watch_processes(monkeypatch) as seen:
        got = kerasfleet.predict(model, x[:2000], backend="jax")
    workers = [cmd for cmd in seen["children"].values() if "kerasfleet.runtime.bootstrap" in cmd]
    assert seen["fleets"] == 1 and len(workers) == picked.workers, seen
    assert_same(got, {"output_0": y[:2000]})


def test_auto_one_shot_evaluate_predicts_in_process_too(folder, plan, monkeypatch):
    from eval_fns import crps_gaussian_quadrature

    model = folder / "mlp.keras"
    x, y_pred = load_x(folder, "mlp")[:100], load_y(folder, "mlp")["output_0"][:100]
    y_true = np.random.default_rng(0).normal(size=y_pred.shape).astype("float32")
    assert plan.use_in_process(100), plan.describe()
    with watch_processes(monkeypatch) as seen:
        got = kerasfleet.evaluate(model, x, y_true, metrics=["mae"], backend="jax")
    assert seen == {"children": {}, "fleets": 0}  # no fleet, and no score function: no process at all
    np.testing.assert_allclose(got["mae"], np.abs(y_true - y_pred).mean(), rtol=1e-5)
    with watch_processes(monkeypatch) as seen:
        got = kerasfleet.evaluate(model, x, y_true, metrics=[crps_gaussian_quadrature], backend="jax")
    assert seen["fleets"] == 0 and len(seen["children"]) == 2, seen  # the two score workers only
    np.testing.assert_allclose(got["crps_gaussian_quadrature"], crps_gaussian_quadrature(y_true, y_pred).mean(), rtol=1e-5)


def test_auto_fleet_uses_the_plan(folder, plan):
    with kerasfleet.Fleet(folder / "mlp.keras", backend="jax") as fleet:
        got = fleet.predict(load_x(folder, "mlp"))
        assert fleet.engine == plan.engine and fleet.plan.workers == plan.workers and fleet.batch_size == plan.batch_size
    assert_same(got, load_y(folder, "mlp"))


def test_failed_export_falls_back_to_keras_with_the_reason(folder, monkeypatch, tmp_path):
    import kerasfleet.engines.export as onnx_module

    monkeypatch.setenv("KERASFLEET_CACHE_DIR", str(tmp_path))

    def broken_export(*args, **kwargs):
        raise kerasfleet.ModelLoadError("tf2onnx missing in this test")

    monkeypatch.setattr(onnx_module, "export", broken_export)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = tune(resolve_model(folder / "embedding.keras"), backend="jax", seconds=0.5, fleet_factory=Fleet)
    assert fallback.engine == "keras" and "tf2onnx missing in this test" in fallback.note
    assert any("tf2onnx missing in this test" in str(w.message) for w in caught)
    assert fallback.in_process_rows_per_s is None and not fallback.use_in_process(1)
    got = kerasfleet.predict(folder / "embedding.keras", load_x(folder, "embedding"), backend="jax")
    np.testing.assert_allclose(got, load_y(folder, "embedding")["output_0"], rtol=1e-5, atol=1e-6)


def test_model_that_cannot_be_exported_gets_keras_and_a_warning(folder):
    # A real export failure: the FFT layer exports to a graph ONNX Runtime refuses to load.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = kerasfleet.predict(folder / "not_exportable.keras", load_x(folder, "not_exportable"), backend="jax")
    assert_same(got, load_y(folder, "not_exportable"))
    reasons = [str(w.message) for w in caught if "ONNX not used" in str(w.message)]
    assert reasons and "The ONNX export failed" in reasons[0]
    plan = cached_plan(resolve_model(folder / "not_exportable.keras"), "jax")
    assert plan.engine == "keras" and "ONNX not used" in plan.note and plan.in_process_rows_per_s is None
    with pytest.raises(kerasfleet.ModelLoadError, match="The ONNX export failed"):
        kerasfleet.predict(folder / "not_exportable.keras", load_x(folder, "not_exportable"), engine="onnx")


def test_in_memory_model_saved_again_finds_its_plan(folder):
    import time

    import keras

    model = keras.saving.load_model(folder / "mlp.keras")
    first = resolve_model(model)
    time.sleep(1.1)  # the .keras metadata records the save time to the second
    second = resolve_model(model)
    try:
        assert first.path.read_bytes() != second.path.read_bytes()
        assert plan_path(first, "jax") == plan_path(second, "jax")
    finally:
        first.cleanup()
        second.cleanup()
