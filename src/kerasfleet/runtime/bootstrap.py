"""A worker's first steps, before anything heavy is imported.

Workers are started with `subprocess` running this module's `main`, not with
`multiprocessing`'s spawn: spawn re-runs the caller's main script in every worker (a script
without `if __name__ == "__main__":` then starts workers from its workers and dies), and it
passes the environment only by mutating the caller's `os.environ`. Here the thread budget is
in the environment given at exec, the caller's `__main__` is never imported, and the only
link to the caller is one `multiprocessing` connection on an inherited file descriptor.

Order matters: thread budgets only take effect before a runtime starts, and a thread inherits
its CPU affinity only from the thread that creates it. So this module imports nothing but the
standard library, pins the (single) thread, asks to die with its parent, and only then reads
its `WorkerInit` and imports the worker proper.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection

_PR_SET_PDEATHSIG = 1


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


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this worker when the thread that started it ends.

    The supervisor thread starts every worker and lives as long as its fleet, so a caller
    killed by SIGKILL (or the OOM killer) never leaves workers behind.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect (we were reparented)
        os._exit(1)


def main(fd: int, cpus_json: str, parent: int) -> None:
    # Ctrl-C in a terminal reaches the whole process group; the caller decides and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)
    pin_threads(tuple(json.loads(cpus_json)))
    conn = Connection(fd)
    try:
        # builtins only: the caller's import path must be in place before its classes unpickle.
        sys_path, cwd = conn.recv()
        sys.path[:] = [p for p in sys_path if p not in sys.path] + sys.path
        if cwd:
            try:
                os.chdir(cwd)
            except OSError:
                pass
        from .protocol import Fatal
        from .worker import remote_error, serve

        try:
            init = conn.recv()
        except Exception as exc:  # noqa: BLE001 - e.g. a custom class that does not import here
            conn.send(Fatal(remote_error(exc)))
            return
        serve(conn, init)
    except (EOFError, OSError):
        pass  # the caller went away before we were ready
    except BaseException:  # noqa: BLE001 - never vanish silently: the supervisor shows stderr's tail
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    finally:
        # Skip interpreter teardown: TF and XLA can take seconds (or crash) unwinding their
        # runtimes, and a worker has nothing left to save.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
