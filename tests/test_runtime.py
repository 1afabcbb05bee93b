"""The task supervisor on bare workers (no framework): futures, threads, deadlines, deaths, cancels."""

import os
import signal
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor

import pytest

from conftest import assert_clean, wait_until
from kerasfleet.errors import FleetClosedError, TaskTimeoutError, WorkerCrashedError, WorkerStartError
from kerasfleet.runtime import RECORD, REQUEUE, Echo, LocalWorker, Noop, Sleep, Supervisor, WorkerInit, make_plan

BARE = WorkerInit("kerasfleet.runtime.worker:bare_handler", None)


def start(init=BARE, workers=2, **kwargs):
    plan = make_plan(workers)
    sup = Supervisor(lambda slot: LocalWorker(slot, init, {}), plan.slots, **kwargs)
    return sup


def test_a_long_lived_fleet_replaces_a_dead_worker_after_the_start_deadline():
    sup = start(start_timeout=2.0)
    try:
        sup.wait_ready(30)
        time.sleep(2.5)  # every start deadline has passed
        victim = sup.workers()[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        assert sup.submit(Echo(1)).result(timeout=30) == 1
        wait_until(lambda: victim not in [w["pid"] for w in sup.workers()], 30, "the killed worker replaced")
        sup.wait_ready(30)
        assert len(sup.workers()) == 2
        assert sup.broken is None and sup.restarts == 1
    finally:
        sup.close()
    assert_clean()


def test_workers_that_die_while_starting_show_their_stderr():
    sup = start(WorkerInit("runtime_helpers:dying_handler", None), workers=1, max_start_failures=2)
    try:
        with pytest.raises(
            WorkerStartError,
            match=r"(?s)keep dying while starting \(3 times, last: exit code 1\).*boom: this worker cannot start",
        ):
            sup.submit(Noop()).result(timeout=60)
        with pytest.raises(FleetClosedError, match="broken"):
            sup.submit(Noop())
    finally:
        sup.close()
    assert_clean()


def test_workers_that_hang_while_starting_are_killed_at_their_start_deadline():
    sup = start(WorkerInit("runtime_helpers:hanging_handler", None), workers=1, start_timeout=1.0, max_start_failures=1)
    started = time.monotonic()
    try:
        with pytest.raises(
            WorkerStartError, match=r"(?s)2 times, last: not ready after 1 s \(start_timeout\).*hanging while starting"
        ):
            sup.submit(Noop()).result(timeout=30)
        assert time.monotonic() - started < 2 * 1.0 + 3.0
    finally:
        sup.close()
    assert_clean()


def test_workers_start_when_the_caller_is_pid_1(tmp_path):
    """In a container without an init process the caller is PID 1 (its workers' parent)."""
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None or subprocess.run(["unshare", "--fork", "--pid", "--mount-proc", "true"]).returncode:
        pytest.skip("needs unshare with a new PID namespace (root), as on the project's machines")
    script = tmp_path / "as_pid_1.py"
    script.write_text(
        "import os\n"
        "from kerasfleet.runtime import Echo, LocalWorker, Supervisor, WorkerInit, make_plan\n"
        "assert os.getpid() == 1\n"
        "init = WorkerInit('kerasfleet.runtime.worker:bare_handler', None)\n"
        "sup = Supervisor(lambda slot: LocalWorker(slot, init, {}), make_plan(1).slots, max_start_failures=0)\n"
        "print('echo', sup.submit(Echo(42)).result(timeout=30))\n"
        "sup.close()\n"
    )
    result = subprocess.run(
        ["unshare", "--fork", "--pid", "--mount-proc", sys.executable, str(script)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "echo 42" in result.stdout, result.stderr[-2000:]


def test_close_fails_what_is_left_and_leaves_nothing():
    sup = start(workers=1)
    sup.wait_ready(30)
    running = sup.submit(Sleep(30))
    waiting = sup.submit(Echo(2))
    time.sleep(0.3)
    started = time.monotonic()
    sup.close()
    assert time.monotonic() - started < 5
    for f in (running, waiting):
        with pytest.raises(FleetClosedError):
            f.result(timeout=5)
    with pytest.raises(FleetClosedError, match="closed"):
        sup.submit(Noop())
    assert_clean()


def test_starting_workers_leaves_the_callers_environment_alone():
    before = dict(os.environ)
    seen = []

    def watch():
        for _ in range(50):
            seen.append("OMP_NUM_THREADS" in os.environ and os.environ["OMP_NUM_THREADS"] != before.get("OMP_NUM_THREADS"))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    plan = make_plan(2)
    from kerasfleet.runtime import worker_environment

    sup = Supervisor(lambda slot: LocalWorker(slot, BARE, worker_environment(slot, "jax")), plan.slots)
    try:
        sup.wait_ready(30)
        watcher.join(10)
        assert dict(os.environ) == before and not any(seen)
        for w in sup.workers():
            with open(f"/proc/{w['pid']}/environ", "rb") as f:
                assert b"OMP_NUM_THREADS=1" in f.read().split(b"\0")
    finally:
        sup.close()


# -- on one warm pair of bare workers, shared by the tests below (created after the tests
# above, which check that nothing is left behind) ------------------------------------------
@pytest.fixture(scope="module")
def sup():
    s = start(start_timeout=60)
    s.wait_ready(60)
    yield s
    s.close()
    assert_clean()


def test_results_come_back_through_futures_from_many_threads(sup):
    def burst(k):
        futures = [sup.submit(Echo((k, i))) for i in range(200)]
        return [f.result(timeout=30) for f in futures]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(burst, range(8), timeout=60))
    assert results == [[(k, i) for i in range(200)] for k in range(8)]
    assert all(w["ready"] for w in sup.workers()) and len(sup.workers()) == 2


def test_a_task_past_its_deadline_is_killed_its_worker_replaced_others_finish(sup):
    before = set(w["pid"] for w in sup.workers())
    started = time.monotonic()
    slow = sup.submit(Sleep(30), timeout=1.0, retry=RECORD, label="sleeping in a test")
    others = [sup.submit(Echo(i)) for i in range(50)]
    with pytest.raises(
        TaskTimeoutError, match=r"sleeping in a test ran past its 1 s deadline; its worker \(pid \d+\) was killed and replaced"
    ):
        slow.result(timeout=10)
    assert time.monotonic() - started < 1.0 + 1.0
    assert [f.result(timeout=10) for f in others] == list(range(50))
    sup.wait_ready(30)
    after = set(w["pid"] for w in sup.workers())
    assert len(after) == 2 and len(after - before) == 1  # exactly one replacement


@pytest.mark.parametrize("policy, outcome", [(REQUEUE, "result"), (RECORD, "crash")])
def test_a_worker_killed_mid_task_follows_the_retry_policy(sup, policy, outcome):
    sup.wait_ready(30)
    future = sup.submit(Sleep(1.5), retry=policy, timeout=None, label="a task whose worker is killed")
    time.sleep(0.3)
    busy = [w["pid"] for w in sup.workers()]
    # The task sits on one of the two workers: kill both (the idle one is only replaced).
    for pid in busy:
        os.kill(pid, signal.SIGKILL)
    if outcome == "result":
        assert future.result(timeout=30) is None  # requeued on a replacement and finished there
    else:
        with pytest.raises(
            WorkerCrashedError, match=r"A worker died once while a task whose worker is killed \(last: pid \d+, killed by SIGKILL"
        ):
            future.result(timeout=30)
    sup.wait_ready(30)
    assert sup.submit(Echo("alive")).result(timeout=30) == "alive"


def test_cancelling_a_task_waiting_behind_a_running_one_spares_the_running_one(sup):
    sup.wait_ready(30)
    restarts = sup.restarts
    running = [sup.submit(Sleep(0.8), retry=RECORD) for _ in range(2)]  # one per worker
    waiting = [sup.submit(Echo(i)) for i in range(2)]  # prefetched behind them
    time.sleep(0.3)
    for future in waiting:
        assert sup.cancel(future)
        with pytest.raises(CancelledError):
            future.result(timeout=10)
    assert [f.result(timeout=10) for f in running] == [None, None]  # no worker was killed
    assert sup.restarts == restarts


def test_cancel_a_queued_task_and_a_running_one(sup):
    sup.wait_ready(30)
    blockers = [sup.submit(Sleep(1.0)) for _ in range(4)]  # both workers busy, two waiting
    queued = sup.submit(Echo("never"))
    assert sup.cancel(queued) and queued.cancelled()
    running = sup.submit(Sleep(60), timeout=None)
    time.sleep(1.5)
    started = time.monotonic()
    assert sup.cancel(running)
    with pytest.raises(CancelledError):
        running.result(timeout=20)
    assert time.monotonic() - started < 10
    assert [b.result(timeout=30) for b in blockers] == [None] * 4
