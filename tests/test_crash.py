"""Workers that die or fail: a table of crash cases, each checked for results and leftovers.

Faults are injected inside the worker (KERASFLEET_FAULT, read once at worker start) so each
case is deterministic: "transient" faults fire once (a marker file), "poison" faults fire on
every attempt at the same rows.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import kerasfleet
from conftest import HERE, assert_clean, load_x, load_y, wait_until
from kerasfleet.errors import RemoteTraceback

BACKEND = "jax"


@pytest.fixture(scope="module")
def folder(zoo):
    return zoo(BACKEND)


def run_with_fault(monkeypatch, folder, fault, x, **kwargs):
    monkeypatch.setenv("KERASFLEET_FAULT", fault)
    try:
        return kerasfleet.predict(
            folder / "mlp.keras", x, workers=2, batch_size=100, backend=BACKEND, engine="keras", progress=False, **kwargs
        )
    finally:
        assert_clean()


@pytest.mark.parametrize("kind", ["kill", "segfault", "exit", "badpickle"])
def test_transient_crash_is_requeued_and_results_are_identical(monkeypatch, folder, tmp_path, kind):
    x = load_x(folder, "mlp")
    got = run_with_fault(monkeypatch, folder, f"{kind}@1500@{tmp_path / 'fired'}", x)
    assert (tmp_path / "fired").exists()  # the fault really happened
    np.testing.assert_allclose(got, load_y(folder, "mlp")["output_0"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kind, cause",
    [("kill", "killed by SIGKILL"), ("segfault", "killed by SIGSEGV - a segmentation fault"), ("exit", "exit code 3")],
)
def test_poison_rows_fail_the_call_naming_rows_and_cause(monkeypatch, folder, kind, cause):
    x = load_x(folder, "mlp")
    with pytest.raises(kerasfleet.WorkerCrashedError, match=rf"died 3 times while predicting rows \d+:\d+ .*{cause}") as info:
        run_with_fault(monkeypatch, folder, f"{kind}@1500", x)
    lo, hi = (int(v) for v in str(info.value).split("rows ")[1].split(" ")[0].split(":"))
    assert lo <= 1500 < hi


def test_exception_in_worker_reaches_caller_with_its_traceback(monkeypatch, folder):
    x = load_x(folder, "mlp")
    with pytest.raises(
        kerasfleet.WorkerError, match=r"raised RuntimeError while predicting rows \d+:\d+: injected fault at row 10"
    ) as info:
        run_with_fault(monkeypatch, folder, "raise@10", x)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "maybe_fire" in info.value.__cause__.tb  # the worker's own frames


def test_million_rows_with_a_worker_sigkilled_mid_run(monkeypatch, folder, tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1_000_000, 32)).astype("float32")
    monkeypatch.setenv("KERASFLEET_FAULT", f"kill@600000@{tmp_path / 'fired'}")
    with kerasfleet.Fleet(folder / "mlp.keras", workers=2, backend=BACKEND, engine="keras") as fleet:
        got = fleet.predict(x, progress=False)
        assert fleet.restarts == 1 and (tmp_path / "fired").exists()
        monkeypatch.delenv("KERASFLEET_FAULT")
    assert_clean()
    # The reference: the same fleet machinery with no fault (parity with model.predict is
    # checked in test_parity), so the comparison is exact.
    with kerasfleet.Fleet(folder / "mlp.keras", workers=2, backend=BACKEND, engine="keras") as fleet:
        np.testing.assert_array_equal(got, fleet.predict(x, progress=False))
        # Killed from outside while idle: the next call gets a replacement and still works.
        victim = fleet.pids[0]
        os.kill(victim, signal.SIGKILL)
        np.testing.assert_array_equal(fleet.predict(x[:5000]), got[:5000])
        wait_until(lambda: victim not in fleet.pids, 30, "the killed worker replaced")
        assert fleet.restarts == 1
        fleet.wait_ready(timeout=120)
    assert_clean()


def test_ctrl_c_stops_everything_promptly(folder, tmp_path):
    script = tmp_path / "interrupt.py"
    script.write_text(
        "import sys, numpy as np, kerasfleet\n"
        "if __name__ == '__main__':\n"
        f"    fleet = kerasfleet.Fleet({str(folder / 'mlp.keras')!r}, workers=2, backend='jax', batch_size=16, engine='keras')\n"
        "    fleet.wait_ready(timeout=240)\n"
        "    print(*fleet.pids, flush=True)\n"
        "    fleet.predict(np.zeros((20_000_000, 32), 'float32'), progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2, proc.stderr.read()
        time.sleep(2.0)  # well inside the call
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        proc.wait(timeout=20)
        assert time.monotonic() - started < 10
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert "KeyboardInterrupt" in proc.stderr.read()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    assert [f for f in os.listdir("/dev/shm") if f.startswith(f"kerasfleet_{proc.pid}_")] == []


def test_fatal_load_error_in_workers_is_reported(monkeypatch, folder, tmp_path):
    # Passes the parent's checks (a valid zip with a config) but the weights are missing.
    import zipfile

    broken = tmp_path / "broken.keras"
    with zipfile.ZipFile(folder / "mlp.keras") as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            if item.filename != "model.weights.h5":
                dst.writestr(item, src.read(item))
    with pytest.raises(kerasfleet.ModelLoadError, match="The workers could not load the model"):
        kerasfleet.predict(broken, load_x(folder, "mlp"), workers=2, backend=BACKEND, engine="keras")
    with kerasfleet.Fleet(broken, workers=1, backend=BACKEND, engine="keras") as fleet:
        with pytest.raises(kerasfleet.ModelLoadError, match="Expected a model.weights.h5"):
            fleet.wait_ready(timeout=120)  # the cause itself, not a generic "broken"
        with pytest.raises(kerasfleet.FleetClosedError, match="broken"):
            fleet.predict(load_x(folder, "mlp"))
    assert_clean()
