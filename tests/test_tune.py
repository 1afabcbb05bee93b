"""engine="auto": the measured trial, the stored plan, and when no worker starts at all."""

import json
import warnings

import numpy as np
import pytest

import kerasfleet
from conftest import assert_same, load_x, load_y
from kerasfleet import Fleet
from kerasfleet.engines.model_file import resolve_model
from kerasfleet.tune import cached_plan, get_plan, plan_path, tune


@pytest.fixture(scope="module")
def folder(zoo):
    return zoo("jax")


@pytest.fixture(scope="module")
def plan(folder):
    return tune(resolve_model(folder / "mlp.keras"), backend="jax", seconds=2.0)


def test_trial_measures_engines_splits_and_in_process(plan):
    kinds = {(row["where"], row["engine"], row["workers"], row["threads"]) for row in plan.table}
    assert ("in-process", "onnx", 1, 2) in kinds and ("workers", "onnx", 2, 1) in kinds and ("workers", "keras", 2, 1) in kinds
    fleets = [row for row in plan.table if row["where"] == "workers"]
    assert plan.rows_per_s == max(row["rows_per_s"] for row in fleets) > 0
    assert all(row["start_s"] > 0 for row in fleets)


def test_plan_is_stored_and_reused(folder, plan):
    model = resolve_model(folder / "mlp.keras")
    path = plan_path(model, "jax")
    stored = json.loads(path.read_text())
    assert stored["engine"] == plan.engine and stored["machine"]["cores"] >= 1
    again = get_plan(model, backend="jax")  # no trial: read back as stored
    assert again == cached_plan(model, "jax") and again.table == plan.table


def test_auto_one_shot_runs_in_process_when_starting_workers_does_not_pay(folder, plan, monkeypatch):
    assert plan.use_in_process(100) == (100 / plan.in_process_rows_per_s <= plan.start_s + 100 / plan.rows_per_s)
    if not plan.use_in_process(100):
        pytest.fail(f"expected in-process to win for 100 rows on a tiny MLP: {plan.describe()}")

    def no_workers(self):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(Fleet, "_start", no_workers)
    x = load_x(folder, "mlp")[:100]
    assert_same(kerasfleet.predict(folder / "mlp.keras", x, backend="jax"), {"output_0": load_y(folder, "mlp")["output_0"][:100]})


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
        fallback = tune(resolve_model(folder / "embedding.keras"), backend="jax", seconds=0.5)
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
