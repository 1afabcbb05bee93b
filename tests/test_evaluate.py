"""`kerasfleet.evaluate` against `model.evaluate` on JAX and TensorFlow, real fleets, real files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module", params=["jax", "tensorflow"])
def cases(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"eval_{request.param}")
    env = {**os.environ, "KERAS_BACKEND": request.param}
    run = subprocess.run(
        [sys.executable, str(HERE / "eval_cases.py"), str(out)], env=env, capture_output=True, text=True, timeout=560
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("case", ["single", "single-weighted", "multi", "multi-weighted"])
def test_evaluate_equals_model_evaluate(cases, case):
    want, got = cases[case]["keras"], cases[case]["fleet"]
    assert sorted(got) == sorted(want)
    assert "auc" in " ".join(want) and "loss" in want
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-7, err_msg=name)


def test_numpy_scores_run_in_workers_and_equal_the_loop(cases):
    scores = cases["scores"]
    got = scores["fleet"]
    np.testing.assert_allclose(got["crps_gaussian_quadrature"], scores["loop_crps"], rtol=1e-9)
    np.testing.assert_allclose(got["mae"], scores["keras_mae"], rtol=1e-5)  # a Keras metric by name
    np.testing.assert_allclose(got["score_1"], scores["loop_abs"], rtol=1e-5)  # a lambda, by value
    assert scores["per_row_len"] == 1504
    for name, value in scores["keras_eval"].items():  # .npy inputs, memory-mapped
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-7, err_msg=name)


def test_a_score_function_takes_a_multi_output_models_dicts(cases):
    got = cases["multi-score"]
    np.testing.assert_allclose(got["fleet"], got["loop"], rtol=1e-5)
    np.testing.assert_allclose(got["loss"], cases["multi"]["keras"]["loss"], rtol=1e-5)


def test_onnx_predictions_give_the_same_metrics_closely(cases):
    want, got = cases["onnx"]["keras"], cases["onnx"]["fleet"]
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


def test_bad_calls_fail_before_work_with_clear_errors(zoo):
    import kerasfleet
    from kerasfleet import InputError

    folder = zoo("jax")
    x = np.zeros((10, 32), np.float32)
    with pytest.raises(InputError, match="Expected a model compiled with a loss"):
        kerasfleet.evaluate(folder / "mlp.keras", x, np.zeros((10, 10)))
    with pytest.raises(InputError, match="Expected y"):
        kerasfleet.evaluate(folder / "mlp.keras", x, metrics=["mae"])
    with pytest.raises(InputError, match=r"Expected y to have as many rows as x \(10\). Received: 9 rows"):
        kerasfleet.evaluate(folder / "mlp.keras", x, np.zeros((9, 10)), metrics=["mae"])
    with pytest.raises(InputError, match="Expected metrics as Keras metric names"):
        kerasfleet.evaluate(folder / "mlp.keras", x, np.zeros((10, 10)), metrics=[42])


def test_a_score_function_of_the_wrong_shape_names_itself(zoo):
    import kerasfleet
    from kerasfleet import WorkerError

    sys.path.insert(0, str(HERE))
    import eval_fns

    folder = zoo("jax")
    with pytest.raises(WorkerError, match=r"Expected the score function 'wrong_shape' to return one number per row"):
        kerasfleet.evaluate(
            folder / "mlp.keras", np.zeros((50, 32), np.float32), np.zeros((50, 10)), metrics=[eval_fns.wrong_shape], workers=1
        )


def test_a_warm_fleet_is_reused_and_left_open(zoo):
    import keras

    import kerasfleet
    from conftest import assert_clean
    from kerasfleet import WorkerError

    folder = zoo("jax")
    path = folder / "batchnorm_dropout.keras"  # compiled with "mse", trained a little
    x = np.load(folder / "batchnorm_dropout.x.npz")["inputs"]
    y = np.random.default_rng(0).normal(size=(len(x), 4)).astype("float32")
    want = keras.saving.load_model(path).evaluate(x, y, return_dict=True, verbose=0)
    with kerasfleet.Fleet(path, engine="keras", workers=2) as fleet:
        fleet.wait_ready()
        pids = fleet.pids
        first = kerasfleet.evaluate(fleet, x, y)
        second = kerasfleet.evaluate(fleet, x[:100], y[:100], metrics=["mae"])
        assert fleet.pids == pids  # the same warm workers, still open
        assert fleet.predict(x[:3]).shape == (3, 4)
        # The fleet's own workers score the rows they predict: no other process, nothing kept.
        from eval_fns import crps_gaussian_quadrature, raises, worker_pid

        scored = [kerasfleet.evaluate(fleet, x, y, metrics=[crps_gaussian_quadrature]) for _ in range(2)]
        assert scored[0] == scored[1] and not fleet._attached
        np.testing.assert_allclose(
            scored[0]["crps_gaussian_quadrature"], crps_gaussian_quadrature(y, fleet.predict(x)).mean(), rtol=1e-6
        )
        many = np.resize(x, (4000, *x.shape[1:]))  # chunks enough for both workers
        # Which worker takes which chunk is the scheduler's call (a worker still compiling a
        # new chunk shape leaves them all to the other): both must score within a few calls.
        seen: set[int] = set()
        for _ in range(10):
            _, per_row = kerasfleet.evaluate(fleet, many, np.resize(y, (4000, 4)), metrics=[worker_pid], return_scores=True)
            assert len(per_row["worker_pid"]) == 4000
            seen |= set(per_row["worker_pid"].astype(int).tolist())
            if seen == set(pids):
                break
        assert seen == set(pids)
        # A function travels as it is at the call: a changed closure value is used.
        scale = [1.0]
        scaled = lambda t, p: np.abs(t - p).mean(axis=1) * scale[0]  # noqa: E731
        once = kerasfleet.evaluate(fleet, x, y, metrics=[scaled])["score_0"]
        scale[0] = 2.0
        twice = kerasfleet.evaluate(fleet, x, y, metrics=[scaled])["score_0"]
        np.testing.assert_allclose(twice, 2 * once, rtol=1e-6)
        # A failing score function fails the call with its traceback; the fleet goes on.
        with pytest.raises(WorkerError, match="a score function that fails"):
            kerasfleet.evaluate(fleet, x, y, metrics=[raises])
        assert fleet.pids == pids and kerasfleet.evaluate(fleet, x, y, metrics=[crps_gaussian_quadrature]) == scored[0]
    np.testing.assert_allclose(first["loss"], want["loss"], rtol=1e-5)
    assert set(second) == {"loss", "mae"}
    assert_clean()


def test_score_functions_that_fail_in_a_fleets_workers(zoo, tmp_path):
    """Scores run in the prediction workers: a failing function fails the call with a clear
    error, a crash is a worker crash (requeued, then refused), and the fleet goes on."""
    import kerasfleet
    from conftest import assert_clean, load_x
    from eval_fns import raises, segfault
    from kerasfleet import WorkerCrashedError, WorkerError

    folder = zoo("jax")
    x = np.resize(load_x(folder, "mlp"), (2000, 32))
    y = np.random.default_rng(0).normal(size=(len(x), 10)).astype("float32")
    # Importable here only: pickled by reference, the workers cannot import it.
    (tmp_path / "local_only_scores.py").write_text(
        "import numpy as np\ndef score(t, p):\n    return np.abs(t - p).mean(axis=1)\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import local_only_scores
    finally:
        sys.path.remove(str(tmp_path))
    table = [
        ("exception", raises, WorkerError, "a score function that fails"),
        ("segfault once", segfault(str(tmp_path / "fired")), None, None),
        ("segfault always", segfault(), WorkerCrashedError, "SIGSEGV"),
        ("not importable in the worker", local_only_scores.score, WorkerError, "local_only_scores"),
    ]
    with kerasfleet.Fleet(folder / "mlp.keras", engine="onnx", workers=1, threads_per_worker=1, max_retries=2) as fleet:
        fleet.wait_ready()
        want = np.abs(y - fleet.predict(x)).mean()
        for case, fn, error, message in table:
            if error is None:  # the crashed chunk ran again on a fresh worker: every row scored once
                got = kerasfleet.evaluate(fleet, x, y, metrics=[fn])
                np.testing.assert_allclose(got["score"], want, rtol=1e-5, err_msg=case)
            else:
                with pytest.raises(error, match=message):
                    kerasfleet.evaluate(fleet, x, y, metrics=[fn])
            got = kerasfleet.evaluate(fleet, x, y, metrics=["mae"])  # the fleet goes on
            np.testing.assert_allclose(got["mae"], want, rtol=1e-5, err_msg=case)
        assert fleet.restarts == 3  # the crash once, then twice for the function that always crashes
    assert_clean()


def test_a_fleet_of_multithreaded_workers_leaves_the_scores_to_score_workers(zoo):
    """A worker of several threads would leave them idle while one scores: score workers
    (kept with the warm fleet) run the scores instead."""
    import kerasfleet
    from conftest import assert_clean, load_x
    from eval_fns import worker_pid

    folder = zoo("jax")
    x = np.resize(load_x(folder, "mlp"), (3000, 32))
    y = np.random.default_rng(0).normal(size=(len(x), 10)).astype("float32")
    with kerasfleet.Fleet(folder / "mlp.keras", engine="onnx", workers=1, threads_per_worker=2) as fleet:
        _, per_row = kerasfleet.evaluate(fleet, x, y, metrics=[worker_pid], return_scores=True)
        (pool,) = fleet._attached.values()
        scorers = set(per_row["worker_pid"].astype(int))
        assert scorers and not scorers & set(fleet.pids) and scorers <= {w["pid"] for w in pool._supervisor.workers()}
    assert_clean()


def test_glibc_keeps_freed_memory_while_score_windows_are_attached():
    from kerasfleet.evaluation import scoring

    calls = []

    class Libc:
        def mallopt(self, option, value):
            calls.append(("mallopt", option, value))

        def malloc_trim(self, pad):
            calls.append(("malloc_trim", pad))

    freed = scoring._FreedMemory()
    freed._libc = Libc()
    freed.hold()
    freed.hold()  # a second window attached before the first one closes: nothing more
    assert calls == [("mallopt", -3, 32 << 20), ("mallopt", -1, 256 << 20)]
    freed.release()
    assert len(calls) == 2
    freed.release()  # the last one: the freed memory returned, the trim threshold lowered
    assert calls[2:] == [("mallopt", -1, 64 << 20), ("malloc_trim", 0)]


def test_score_workers_call_the_function_on_slices_and_keep_every_score():
    from conftest import assert_clean
    from eval_fns import crps_gaussian_quadrature
    from kerasfleet.evaluation.scoring import Packing, ScorePool

    rng = np.random.default_rng(0)
    y_true = rng.normal(size=(200_003, 1)).astype("float32")
    y_pred = (y_true + rng.normal(scale=0.3, size=y_true.shape)).astype("float32")
    pool = ScorePool([("crps", crps_gaussian_quadrature)], 2, "jax")
    try:
        # 25,001 rows a chunk: every slice size is tried on real rows, then the fastest used.
        got = pool.score([y_true], [y_pred], Packing("single", ()), Packing("single", ()))
    finally:
        pool.close()
    assert got.shape == (1, 200_003)
    np.testing.assert_allclose(got[0], crps_gaussian_quadrature(y_true, y_pred), rtol=1e-12)
    assert_clean()


def test_a_slice_size_is_chosen_from_the_time_a_row_of_each():
    from kerasfleet.evaluation.scoring import SLICE_SIZES, SliceSize

    per_row = {1024: 1.0, 4096: 0.5, 16384: 1.2}  # seconds a row: 4096 is the fastest
    assert tuple(per_row) == SLICE_SIZES
    slices, tried = SliceSize(), []
    for _ in range(6):
        size = slices.next_size()
        tried.append(size)
        slices.record(size, per_row[size])
    assert tried == [1024, 1024, 4096, 4096, 16384, 16384]
    assert slices.next_size() == 4096
    slices.record(4096, 0.0)  # once chosen, timings no longer move it
    assert slices.next_size() == 4096
