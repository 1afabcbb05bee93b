"""kerasfleet.sweep: real worker processes, a real SQLite store, real Keras training (JAX, TF).

Trial functions live in tests/sweep_fns.py (workers import it through the caller's sys.path).
"""

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time

import psutil
import pytest

import kerasfleet
from conftest import HERE, assert_clean, leftovers
from kerasfleet.errors import InputError
from kerasfleet.runtime import Echo, LocalWorker, Sleep, Supervisor, WorkerInit, make_plan
from kerasfleet.sweeps import SweepResult, read_store
from kerasfleet.sweeps.store import Store

pytestmark = pytest.mark.timeout(240)

BARE = WorkerInit("kerasfleet.runtime.worker:bare_handler", None)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE)])}


def by_config(result, name="mode"):
    return {t["config"][name]: t for t in result.trials}


# -- the runtime pieces a sweep needs ----------------------------------------------------------
def test_retire_replaces_an_idle_worker_without_counting_a_restart():
    sup = Supervisor(lambda slot: LocalWorker(slot, BARE, {}), make_plan(1).slots)
    try:
        sup.wait_ready(60)
        old = sup.workers()[0]["pid"]
        sup.retire(old)
        sup.retire(12345678)  # not in the fleet: ignored
        assert sup.submit(Echo("after")).result(timeout=60) == "after"
        sup.wait_ready(60)
        assert [w["pid"] for w in sup.workers()] != [old] and len(sup.workers()) == 1
        assert sup.retired == 1 and sup.restarts == 0 and sup.broken is None
        assert not psutil.pid_exists(old) or psutil.Process(old).status() == psutil.STATUS_ZOMBIE
    finally:
        sup.close()
    assert_clean()


def test_exclusive_tasks_wait_for_an_idle_worker_and_report_their_start():
    sup = Supervisor(lambda slot: LocalWorker(slot, BARE, {}), make_plan(2).slots)
    try:
        sup.wait_ready(60)
        starts = {}
        t0 = time.monotonic()

        def record(name):
            return lambda pid: starts.setdefault(name, (time.monotonic() - t0, pid))

        sleeps = [sup.submit(Sleep(1.0), exclusive=True, on_start=record(f"sleep{i}")) for i in range(2)]
        echo = sup.submit(Echo(1), exclusive=True, on_start=record("echo"))
        assert echo.result(timeout=30) == 1 and [f.result(timeout=30) for f in sleeps] == [None, None]
        # Without exclusive, the echo would be prefetched behind a sleep at once (started ~0 s).
        assert starts["echo"][0] >= 0.9
        assert {starts["sleep0"][1], starts["sleep1"][1]} == {w["pid"] for w in sup.workers()}
    finally:
        sup.close()
    assert_clean()


# -- grid, seeds, store, summary ---------------------------------------------------------------
def test_every_config_and_seed_runs_once_and_is_stored(tmp_path):
    store = tmp_path / "runs.sqlite"
    result = kerasfleet.sweep(
        "sweep_fns:score", {"x": [1, 2, 3], "k": [0, 100]}, seeds=(0, 1, 2), store=store, workers=2, progress=False
    )
    assert isinstance(result, SweepResult) and result.counts == {"done": 18}
    got = sorted((t["config"]["x"], t["config"]["k"], t["seed"], t["metrics"]["score"]) for t in result.trials)
    assert got == sorted((x, k, s, x * 10 + s + k) for x in (1, 2, 3) for k in (0, 100) for s in (0, 1, 2))
    fn_name, rows = read_store(store)
    assert fn_name == "sweep_fns:score" and len(rows) == 18 and len({r["key"] for r in rows}) == 18
    for r in rows:
        assert r["status"] == "done" and r["attempts"] == 1 and r["error"] is None
        assert r["worker_pid"] > 0 and r["duration"] >= 0 and r["ended"] >= r["started"] > time.time() - 600
    with sqlite3.connect(store) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # The same call again: everything is finished, nothing runs, the same trials come back.
    again = kerasfleet.sweep("sweep_fns:score", {"x": [1, 2, 3], "k": [0, 100]}, seeds=(0, 1, 2), store=store, workers=2)
    assert [t["key"] for t in again.trials] == [t["key"] for t in result.trials]
    assert all(r["attempts"] == 1 for r in read_store(store)[1])
    assert_clean()


def test_summary_best_and_table_math():
    def trial(config, seed, value, status="done"):
        metrics = {"acc": value, "loss": -value} if status == "done" else None
        return {"key": f"{config}{seed}", "config": config, "seed": seed, "status": status, "metrics": metrics}

    a, b, c = {"lr": 0.1}, {"lr": 0.01}, {"lr": 0.001}
    trials = [trial(a, 0, 0.5), trial(a, 1, 0.7), trial(a, 2, 0.6), trial(b, 0, 0.8), trial(b, 1, 0.9)]
    trials += [trial(b, 2, None, "timeout"), trial(c, 0, None, "failed")]
    result = SweepResult(trials)
    rows = result.summary("acc")
    assert [r["config"] for r in rows] == [b, a, c]
    assert rows[0]["mean"] == pytest.approx(0.85) and rows[0]["std"] == pytest.approx(math.sqrt(0.005))
    assert rows[0]["n"] == 2 and rows[0]["not_done"] == 1 and rows[0]["seeds"] == [0, 1]
    assert rows[1]["mean"] == pytest.approx(0.6) and rows[1]["std"] == pytest.approx(0.1)  # sample std (ddof=1)
    assert rows[2]["n"] == 0 and math.isnan(rows[2]["mean"])
    assert result.best("acc")["config"] == b
    assert result.best("loss", mode="min")["config"] == b and result.summary("loss", "max")[0]["config"] == a
    assert result.counts == {"done": 5, "failed": 1, "timeout": 1}
    table = result.table("acc").splitlines()
    assert table[0].split() == ["lr", "acc", "(mean", "±", "std)", "n", "not", "done"]
    assert table[1].split()[:4] == ["0.01", "0.85", "±", "0.071"] and table[3].split()[:2] == ["0.001", "-"]
    with pytest.raises(InputError, match=r"metric=None, metrics \['acc', 'loss'\]"):
        result.summary()
    with pytest.raises(InputError, match="Expected a metric among"):
        result.best("accuracy")
    frame = result.to_pandas()
    assert list(frame.columns[:5]) == ["config.lr", "seed", "status", "metrics.acc", "metrics.loss"] and len(frame) == 7
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "pandas", None)  # as if it were not installed
        with pytest.raises(ImportError, match=r"Expected pandas to be installed .*pip install pandas"):
            result.to_pandas()


# -- failures: a table of cases, one sweep ---------------------------------------------------------
TIMEOUT = 3.0
CASES = [
    # mode, status, what the store's error (or metrics) shows
    ("ok", "done", None),
    ("nan", "done", None),
    ("hang", "timeout", r"ran past its 3 s deadline; its worker \(pid \d+\) was killed and replaced"),
    ("raise", "failed", r"(?s)Traceback.*sweep_fns.py.*in behave.*ValueError: trial raised on purpose"),
    ("system_exit", "failed", r"(?s)Traceback.*SystemExit: 2"),
    ("segfault", "crashed", r"A worker died once while running trial .* killed by SIGSEGV"),
    ("sigkill", "crashed", r"killed by SIGKILL"),
    ("exit", "crashed", r"exit code 3"),
    ("not_a_dict", "failed", r"Expected the trial function to return a dict of numbers.*Received: float 0.5"),
    (
        "list_metric",
        "failed",
        r"loss=\[0.9, 0.5, 0.3\] \(list\) \(a list of 3 values - one per epoch\? .*history.history\['loss'\]\[-1\]",
    ),
]


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    store = tmp_path_factory.mktemp("failures") / "runs.sqlite"
    started = time.monotonic()
    result = kerasfleet.sweep(
        "sweep_fns:behave", configs=[{"mode": m} for m, _, _ in CASES], store=store, workers=2, timeout=TIMEOUT
    )
    return result, store, time.monotonic() - started


@pytest.mark.parametrize("mode, status, error", CASES, ids=[c[0] for c in CASES])
def test_each_failure_is_recorded_and_the_sweep_goes_on(failures, mode, status, error):
    result, store, _ = failures
    trial = by_config(result)[mode]
    assert trial["status"] == status
    assert trial["worker_pid"] and trial["started"] and trial["ended"] >= trial["started"]
    stored = {r["config"]["mode"]: r for r in read_store(store)[1]}[mode]
    assert json.dumps(stored, sort_keys=True) == json.dumps(trial, sort_keys=True)  # NaN != NaN
    if error is None:
        assert trial["error"] is None and set(trial["metrics"]) == {"value"}
    else:
        assert trial["metrics"] is None
        assert __import__("re").search(error, trial["error"]), trial["error"]


def test_a_hung_trial_is_killed_within_its_timeout_plus_two_seconds(failures):
    result, _, seconds = failures
    hung = by_config(result)["hang"]
    assert TIMEOUT - 0.1 <= hung["duration"] < TIMEOUT + 2.0
    assert math.isnan(by_config(result)["nan"]["metrics"]["value"])
    assert seconds < 120  # the other trials did not wait for it
    assert_clean()


def test_finished_failures_are_skipped_unless_retry_failed(tmp_path):
    store, marker = tmp_path / "runs.sqlite", tmp_path / "marker"
    first = kerasfleet.sweep("sweep_fns:flaky", {"marker": [str(marker)]}, seeds=(0, 1), store=store, workers=1)
    assert first.counts == {"failed": 2} and "RuntimeError: not yet" in first.trials[0]["error"]
    marker.touch()
    skipped = kerasfleet.sweep("sweep_fns:flaky", {"marker": [str(marker)]}, seeds=(0, 1), store=store, workers=1)
    assert skipped.counts == {"failed": 2} and [t["attempts"] for t in skipped.trials] == [1, 1]
    retried = kerasfleet.sweep(
        "sweep_fns:flaky", {"marker": [str(marker)]}, seeds=(0, 1), store=store, workers=1, retry_failed=True
    )
    assert retried.counts == {"done": 2} and [t["attempts"] for t in retried.trials] == [2, 2]
    assert [t["error"] for t in retried.trials] == [None, None] and len(read_store(store)[1]) == 2
    assert_clean()


# -- resume after the caller is killed -----------------------------------------------------------
def test_sigkill_of_the_caller_loses_no_finished_trial_and_a_rerun_runs_none_twice(tmp_path):
    store, lines = tmp_path / "runs.sqlite", tmp_path / "ran.txt"
    script = tmp_path / "sweep_script.py"
    script.write_text(
        "import kerasfleet\n"
        f"kerasfleet.sweep('sweep_fns:side_effect', {{'path': [{str(lines)!r}], 'i': list(range(8)), 'sleep': [0.4]}},\n"
        f"                 seeds=(0, 1), store={str(store)!r}, workers=2)\n"
        "print('sweep finished')\n"
    )
    # stderr to a file: a pipe nobody reads could fill and block the sweep's supervisor thread.
    stderr = open(tmp_path / "stderr.txt", "w")
    parent = subprocess.Popen([sys.executable, str(script)], env=ENV, cwd=tmp_path, stderr=stderr)
    try:
        deadline = time.monotonic() + 180
        done = []
        while time.monotonic() < deadline and len(done) < 5:
            time.sleep(0.1)
            if store.exists():
                try:
                    done = [r for r in read_store(store)[1] if r["status"] == "done"]
                except (InputError, sqlite3.Error):
                    pass  # created but not yet initialised
            assert parent.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
        assert len(done) >= 5, "the sweep did not get going"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(30)
    finally:
        parent.kill()
        stderr.close()
    finished_before = {(r["config"]["i"], r["seed"]) for r in read_store(store)[1]}
    assert len(finished_before) < 16
    pids = {r["worker_pid"] for r in read_store(store)[1]}
    time.sleep(1.0)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)

    rerun = subprocess.run([sys.executable, str(script)], env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0 and "sweep finished" in rerun.stdout, rerun.stderr[-3000:]
    runs = [tuple(map(int, line.split())) for line in lines.read_text().splitlines()]
    for trial in finished_before:
        assert runs.count(trial) == 1, f"{trial} finished before the kill and ran again"
    rows = read_store(store)[1]
    assert len(rows) == 16 and {(r["config"]["i"], r["seed"]) for r in rows} == {(i, s) for i in range(8) for s in (0, 1)}
    assert all(r["status"] == "done" and r["attempts"] == 1 for r in rows)
    assert_clean()


# -- how the function travels ----------------------------------------------------------------------
def test_a_function_from_a_plain_script_without_main_guard(tmp_path):
    script = tmp_path / "plain_sweep.py"
    script.write_text(
        "import kerasfleet\n"
        "OFFSET = 100\n"
        "def helper(x):\n"
        "    return x * 2 + OFFSET\n"
        "def trial(x, seed):\n"
        "    return {'score': helper(x) + seed}\n"
        "print('script body ran', flush=True)\n"
        "result = kerasfleet.sweep(trial, {'x': [1, 2]}, seeds=(0, 1), store='runs.sqlite', workers=2)\n"
        "print('RESULT', sorted((t['config']['x'], t['seed'], t['metrics']['score']) for t in result.trials))\n"
        "print('FN', kerasfleet.sweeps.read_store('runs.sqlite')[0])\n"
        "closure_offset = 7\n"
        "result = kerasfleet.sweep(lambda x, seed: {'v': x + closure_offset}, {'x': [1]}, store=None, workers=1)\n"
        "print('LAMBDA', result.trials[0]['metrics'])\n"
    )
    out = subprocess.run([sys.executable, str(script)], env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("script body ran") == 1  # workers never ran the script
    assert "RESULT [(1, 0, 102), (1, 1, 103), (2, 0, 104), (2, 1, 105)]" in out.stdout
    assert "FN __main__:trial" in out.stdout and "LAMBDA {'v': 8}" in out.stdout


def test_a_lambda_and_a_closure_travel_by_value():
    base = 40

    def make(offset):
        return lambda x, seed: {"v": x + offset + base}

    result = kerasfleet.sweep(make(2), {"x": [0, 1]}, store=None, workers=2)
    assert sorted(t["metrics"]["v"] for t in result.trials) == [42, 43]
    assert_clean()


def test_an_importable_function_object_travels_by_name_with_a_progress_bar(tmp_path, capsys):
    import sweep_fns
    from kerasfleet.sweeps.function import function_ref

    assert function_ref(sweep_fns.score).pickled is None and function_ref(sweep_fns.score).name == "sweep_fns:score"
    result = kerasfleet.sweep(sweep_fns.score, {"x": [1]}, seeds=(0, 5), store=tmp_path / "s.sqlite", workers=1, progress=True)
    assert [t["metrics"]["score"] for t in result.trials] == [10, 15]
    bar = capsys.readouterr().err
    assert "kerasfleet sweep" in bar and "2/2" in bar and "done=2 running=0 failed=0 best score=15" in bar


def test_a_store_holds_one_function_and_one_writer(tmp_path):
    store = tmp_path / "runs.sqlite"
    kerasfleet.sweep("sweep_fns:score", {"x": [1]}, store=store, workers=1)
    with pytest.raises(InputError, match=r"hold trials of sweep_fns:pid \(one function per store\).*written for sweep_fns:score"):
        kerasfleet.sweep("sweep_fns:pid", {"i": [1]}, store=store, workers=1)
    with Store(store, "sweep_fns:score"):
        with pytest.raises(InputError, match="another running process holds its lock"):
            kerasfleet.sweep("sweep_fns:score", {"x": [2]}, store=store, workers=1)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE users (name TEXT)")
    with pytest.raises(InputError, match=r"holds other tables \(\['users'\]\)"):
        kerasfleet.sweep("sweep_fns:score", {"x": [2]}, store=other, workers=1)
    assert_clean()


# -- bad input: refused before any process starts -------------------------------------------------
BAD = [
    ({"grid": {}}, "non-empty dict of value lists"),
    ({"grid": {"x": 1}}, r"a list of candidate values\. Received: x=1 \(for a single value write x=\[1\]\)"),
    ({"grid": {"x": "abc"}}, "list of candidate values"),
    ({"grid": {"x": []}}, r"at least one value for each grid key"),
    ({"grid": {"seed": [1]}}, "no 'seed' key"),
    ({"grid": {"x": [object()]}}, "Expected config values to be JSON"),
    ({"grid": {"x": [1]}, "seeds": [0.5]}, r"ints in \[0, 2\*\*32\)"),
    ({"grid": {"x": [1]}, "seeds": "0"}, "list of ints"),
    ({"grid": {"x": [1]}, "seeds": [1, 1]}, "distinct seeds"),
    ({"grid": {"x": [1]}, "seeds": [-1]}, r"ints in \[0, 2\*\*32\)"),
    ({"fn": "no_such_module:run", "grid": {"x": [1]}}, r"no module named 'no_such_module' on sys.path .*PYTHONPATH"),
    ({"fn": "sweep_fns:nope", "grid": {"x": [1]}}, r"sweep_fns.py\) to define 'nope' at top level"),
    ({"fn": "sweep_fns", "grid": {"x": [1]}}, r"fn as 'module:function'"),
    ({"fn": 42, "grid": {"x": [1]}}, "Expected fn to be a function"),
    ({"grid": {"y": [1]}}, r"accept fn\(\*\*config, seed=seed\) with config keys \['y'\]"),
    ({"grid": {"x": [1]}, "sampler": "tpe"}, "Expected sampler to be 'grid', 'random' or an optuna Study"),
    ({"grid": {"x": [1]}, "configs": [{"x": 1}]}, "grid or configs, not both"),
    ({}, "Received: neither"),
    ({"grid": {"x": [1]}, "n_trials": 3}, "no n_trials with sampler='grid'"),
    ({"grid": {"x": [1, 2]}, "sampler": "random"}, "n_trials to be a positive int"),
    ({"grid": {"x": [1, 2]}, "sampler": "random", "n_trials": 3}, r"n_trials <= the grid's 2 distinct configs"),
    ({"configs": [{"x": 1}, {"x": 1}]}, "distinct configs"),
    ({"configs": {"x": 1}}, "list of dicts"),
    ({"grid": {"x": [1]}, "timeout": 0}, "timeout to be a positive number"),
    ({"grid": {"x": [1]}, "workers": 0}, "workers to be a positive int"),
    ({"grid": {"x": [1]}, "threads_per_trial": 1.5}, "threads_per_trial to be a positive int"),
    ({"grid": {"x": [1]}, "devices": "tpu"}, "devices to be 'auto', 'cpu', 'gpu'"),
    ({"grid": {"x": [1]}, "backend": "theano"}, "Expected backend"),
    ({"grid": {"x": [1]}, "mode": "best"}, "mode to be 'max', 'min'"),
    ({"grid": {"x": [1]}, "store": "/no/such/folder/runs.sqlite"}, "path in an existing folder"),
]


@pytest.mark.parametrize("kwargs, match", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_input_is_refused_before_any_process_starts(tmp_path, kwargs, match):
    kwargs = {"fn": "sweep_fns:score", "store": str(tmp_path / "runs.sqlite"), **kwargs}
    fn = kwargs.pop("fn")
    started = time.monotonic()
    with pytest.raises(InputError, match=match):
        kerasfleet.sweep(fn, **kwargs)
    assert time.monotonic() - started < 2.0
    assert leftovers()[0] == [] and not (tmp_path / "runs.sqlite").exists()


def test_a_function_that_does_not_load_in_a_worker_stops_the_sweep_with_its_traceback(tmp_path):
    store = tmp_path / "runs.sqlite"
    with pytest.raises(InputError, match=r"Expected the trial function sweep_fns_broken:run to load in a worker") as info:
        kerasfleet.sweep("sweep_fns_broken:run", configs=[{}], store=store, workers=1)
    assert "this module cannot be imported" in str(info.value.__cause__)
    assert read_store(store)[1] == []
    assert_clean()


# -- samplers -------------------------------------------------------------------------------------
def test_random_sampler_draws_the_same_distinct_configs_each_time(tmp_path):
    grid = {"x": list(range(10)), "k": [0, 100, 200]}
    first = kerasfleet.sweep("sweep_fns:score", grid, sampler="random", n_trials=5, store=tmp_path / "a.sqlite", workers=2)
    second = kerasfleet.sweep("sweep_fns:score", grid, sampler="random", n_trials=5, store=tmp_path / "b.sqlite", workers=2)
    configs = [json.dumps(t["config"], sort_keys=True) for t in first.trials]
    assert len(set(configs)) == 5 and configs == [json.dumps(t["config"], sort_keys=True) for t in second.trials]
    assert_clean()


def test_an_optuna_study_asks_here_and_is_told_the_mean_over_seeds(tmp_path):
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    grid = {"x": optuna.distributions.FloatDistribution(0.0, 1.0), "k": [0, 5]}
    result = kerasfleet.sweep(
        "sweep_fns:score", grid, sampler=study, n_trials=6, seeds=(0, 1), metric="score", store=tmp_path / "s.sqlite", workers=2
    )
    assert len(study.trials) == 6 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    for t in study.trials:
        x, k = t.params["x"], t.params["k"]
        assert t.value == pytest.approx(x * 10 + k + 0.5)  # mean over seeds 0 and 1
    assert result.counts["done"] == len(result.trials) and len(result.trials) <= 12
    assert result.best()["mean"] == pytest.approx(study.best_value)
    with pytest.raises(InputError, match="metric="):
        kerasfleet.sweep("sweep_fns:score", grid, sampler=study, n_trials=1, store=None)
    assert_clean()


# -- workers: reuse and recycling -----------------------------------------------------------------
def test_workers_are_reused_then_recycled_after_max_trials_per_worker():
    result = kerasfleet.sweep("sweep_fns:pid", {"i": list(range(6))}, store=None, workers=1, max_trials_per_worker=2)
    pids = [t["metrics"]["pid"] for t in sorted(result.trials, key=lambda t: t["config"]["i"])]
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[4] == pids[5] and len(set(pids)) == 3
    assert all(t["worker_pid"] == t["metrics"]["pid"] for t in result.trials)
    assert_clean()


def test_a_free_worker_gets_a_config_it_already_ran_else_one_nobody_started():
    """A model of the same shape then compiles once per worker, as in a sequential loop."""
    from kerasfleet.sweeps.spec import pick, trials_for

    todo = trials_for("f", [{"c": 0}, {"c": 1}, {"c": 2}], seeds=(0, 1))
    c0, c1, c2 = (todo[i].config_id for i in (0, 2, 4))
    assert pick(todo, warm=set(), started=set()) == 0  # a fresh worker: the first config
    assert pick(todo, warm=set(), started={c0}) == 2  # c0 runs elsewhere: a config nobody started
    assert pick(todo, warm={c1}, started={c0, c1}) == 2  # its own config, even behind others
    assert pick(todo, warm={c2}, started={c0, c1}) == 4
    assert pick(todo[:4], warm={c2}, started={c0, c1}) == 0  # nothing matches: never idle, the first


def test_a_worker_whose_memory_grew_past_the_limit_is_recycled():
    result = kerasfleet.sweep("sweep_fns:hog", {"i": [0, 1, 2]}, store=None, workers=1, max_worker_memory_mb=1.0)
    assert len({t["metrics"]["pid"] for t in result.trials}) == 3
    result = kerasfleet.sweep("sweep_fns:hog", {"i": [0, 1, 2]}, store=None, workers=1, max_trials_per_worker=None)
    assert len({t["metrics"]["pid"] for t in result.trials}) == 1
    assert_clean()


# -- real Keras training -------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_same_seed_same_config_same_metrics_whatever_ran_before_in_the_worker(backend):
    grid = {"units": [4]}
    # One thread per trial in both runs: a different thread count may sum in another order.
    same = {"store": None, "threads_per_trial": 1, "backend": backend}
    first = kerasfleet.sweep("sweep_fns:train_tiny_keras", grid, seeds=(0, 1), workers=2, **same)
    # One worker, the seeds in the other order: seed 0 now runs after seed 1 in the same process.
    second = kerasfleet.sweep("sweep_fns:train_tiny_keras", grid, seeds=(1, 0), workers=1, **same)
    assert first.counts == second.counts == {"done": 2}, first.trials[0]["error"]
    a = {t["seed"]: t["metrics"] for t in first.trials}
    b = {t["seed"]: t["metrics"] for t in second.trials}
    assert a == b, (a, b)
    assert a[0]["backend"] == (0 if backend == "jax" else 1)
    assert a[0]["loss"] != a[1]["loss"]  # the seed matters
    assert len({t["worker_pid"] for t in second.trials}) == 1
    assert_clean()


def test_jax_trials_share_one_compilation_cache_and_give_the_same_metrics(tmp_path):
    grid = {"units": [4]}
    same = {"store": None, "threads_per_trial": 1, "backend": "jax", "workers": 1, "seeds": (0, 1)}
    folder = tmp_path / "xla"
    cached = kerasfleet.sweep("sweep_fns:train_tiny_keras", grid, compile_cache=folder, **same)
    entries = sorted(p.name for p in folder.glob("*-cache"))
    assert entries, "no compiled program was stored"
    again = kerasfleet.sweep("sweep_fns:train_tiny_keras", grid, compile_cache=folder, **same)
    # Every program of the second sweep was read back: nothing new compiled and stored.
    assert sorted(p.name for p in folder.glob("*-cache")) == entries
    plain = kerasfleet.sweep("sweep_fns:train_tiny_keras", grid, compile_cache=False, **same)
    metrics = [{t["seed"]: t["metrics"] for t in r.trials} for r in (cached, again, plain)]
    assert metrics[0] == metrics[1] == metrics[2] and len(metrics[0]) == 2
    with pytest.raises(InputError, match=r"Expected compile_cache to be True .* Received: compile_cache=3"):
        kerasfleet.sweep("sweep_fns:score", {"x": [1]}, store=None, compile_cache=3)
    assert_clean()


def test_tensorflow_is_seeded_when_a_trial_imports_it_and_not_imported_otherwise():
    # One JAX worker: TF is not imported for seeding (first trial), then a trial imports it (the
    # import hook seeds it), then a trial finds it imported (Keras seeds it): the same draw.
    configs = [{"use_tf": 0}, {"use_tf": 1}, {"use_tf": 2}]
    result = kerasfleet.sweep("sweep_fns:tensorflow_seeded", configs=configs, store=None, workers=1, backend="jax")
    got = [t["metrics"] for t in sorted(result.trials, key=lambda t: t["config"]["use_tf"])]
    assert [m["had_tf"] for m in got] == [0, 0, 1], got
    assert got[1]["draw"] == got[2]["draw"] != 0.0
    other = kerasfleet.sweep("sweep_fns:tensorflow_seeded", configs=[{"use_tf": 1}], seeds=(1,), store=None, workers=1)
    assert other.trials[0]["metrics"]["draw"] != got[1]["draw"]  # the seed matters
    assert_clean()


# -- the command line ------------------------------------------------------------------------------
def test_cli_sweep_then_results(tmp_path):
    store = tmp_path / "runs.sqlite"
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"x": [1, 2], "k": [0]}))
    cli = [sys.executable, "-m", "kerasfleet"]
    args = ["sweep", "sweep_fns:score", "--grid", str(grid), "--seeds", "0,1,2", "--timeout", "60", "--store", str(store)]
    out = subprocess.run(cli + args + ["--workers", "2"], env=ENV, cwd=HERE, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SweepResult(6 trials: 6 done" in out.stdout
    out = subprocess.run(
        cli + ["results", str(store), "--metric", "score"], env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == f"{store}: trials of sweep_fns:score"
    header = next(i for i, line in enumerate(lines) if line.startswith("k "))
    assert lines[header + 1].split() == ["0", "2", "21", "±", "1", "3", "0"]  # mean 21 ± 1 over seeds 0, 1, 2
    out = subprocess.run(cli + ["results", str(tmp_path / "nope.sqlite")], env=ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "no file" in out.stderr
    assert_clean()
