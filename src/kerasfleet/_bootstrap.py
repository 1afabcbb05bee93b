"""A worker's first steps, before anything heavy is imported.

Spawned workers start here. Thread budgets only take effect if they are in the environment
before a runtime starts (OpenBLAS at NumPy import, TF's pools at its first op, XLA's at backend
start), and a thread inherits its CPU affinity only from the thread that creates it. So this
module imports nothing but the standard library, sets the environment, pins every thread that
already exists (the spawned interpreter may have re-imported the caller's main script), and
only then imports the worker proper and unpickles its arguments.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any


def pin_threads(cpus: tuple[int, ...]) -> None:
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass


def worker_entry(conn: Any, env: dict[str, str], cpus: tuple[int, ...], init: bytes) -> None:
    # Ctrl-C in a terminal reaches the whole process group; the caller decides and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for key, value in env.items():
        os.environ[key] = value
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    pin_threads(cpus)
    from ._worker import serve

    try:
        serve(conn, pickle.loads(init))
    finally:
        # Skip interpreter teardown: TF and XLA can take seconds (or crash) unwinding their
        # runtimes, and a worker has nothing left to save.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def spawn_environment(env: dict[str, str]) -> Iterator[None]:
    """Put `env` in this process's environment while a worker is spawned.

    A spawned worker inherits the environment at exec, so the thread budget is in place even
    for the caller's main script, which the worker re-imports before any kerasfleet code runs
    (and which may import a framework). The bootstrap sets it again, for safety.
    """
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
