"""How the supervisor reaches a worker: a small handle interface, and local processes.

The supervisor only ever calls what `WorkerHandle` declares, so a worker that is not a local
process (a Ray actor, later) plugs in by implementing it. `LocalWorker` is a subprocess started
by `bootstrap.main`, with one `multiprocessing` connection for messages, a pidfd (or the
connection's EOF) as its death sentinel, and its stderr read by the supervisor: forwarded to
the caller's stderr as it comes, with the last lines kept for error messages.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import deque
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

from .plan import WorkerSlot
from .protocol import WorkerInit

# Lines of a worker's stderr kept for the error message when it fails to start or dies.
STDERR_TAIL_LINES = 30
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding `kerasfleet/`


class WorkerHandle(Protocol):
    slot: WorkerSlot
    pid: int | None

    def send(self, msg: Any) -> None:
        """Send a message; raises OSError (or ValueError) if the worker is gone."""

    def recv(self) -> Any:
        """The next message; raises EOFError/OSError if the worker is gone."""

    def poll(self) -> bool: ...

    def waitables(self) -> list[Any]:
        """Objects for `multiprocessing.connection.wait` that become ready on news or death."""

    def classify(self, obj: Any) -> str:
        """What a ready waitable means: "messages" to receive, "death", or "other" (see `service`)."""

    def service(self, obj: Any) -> None:
        """`obj`, classified "other", is ready: read it (e.g. the worker's stderr)."""

    def is_alive(self) -> bool: ...

    def kill(self) -> None: ...

    def describe_exit(self) -> str: ...

    def stderr_tail(self) -> str: ...

    def close(self) -> None: ...


class LocalWorker:
    """A worker process on this machine."""

    def __init__(self, slot: WorkerSlot, init: WorkerInit, env: dict[str, str]) -> None:
        self.slot = slot
        parent, child = Pipe(duplex=True)
        full_env = {**os.environ, **env}  # a copy: the caller's os.environ is never touched
        full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        cpus = json.dumps(list(slot.cpus))
        # Pinned before any import, so every thread a library starts inherits the worker's cores.
        code = (
            f"import os, sys; cpus = {cpus}; cpus and hasattr(os, 'sched_setaffinity') and os.sched_setaffinity(0, cpus); "
            f"sys.path.insert(0, {_PACKAGE_ROOT!r}); from kerasfleet.runtime.bootstrap import main; "
            f"main({child.fileno()}, {cpus!r}, {os.getpid()})"
        )
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", code],
                env=full_env,
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                close_fds=True,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.pid: int | None = self.process.pid
        self.conn: Connection = parent
        self._tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._partial = b""
        assert self.process.stderr is not None
        self._stderr: Any = self.process.stderr
        self._stderr_fd: int | None = self._stderr.fileno()
        os.set_blocking(self._stderr.fileno(), False)
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(self.process.pid)
        except (AttributeError, OSError):
            pass
        try:
            self.conn.send((list(sys.path), os.getcwd()))
            self.conn.send(init)  # e.g. a custom object that does not pickle raises here
        except BaseException:
            self.close()
            raise

    def send(self, msg: Any) -> None:
        self.conn.send(msg)

    def recv(self) -> Any:
        return self.conn.recv()

    def poll(self) -> bool:
        return self.conn.poll()

    def waitables(self) -> list[Any]:
        objs: list[Any] = [self.conn]
        if self._stderr_fd is not None:
            objs.append(self._stderr_fd)
        if self._pidfd is not None:
            objs.append(self._pidfd)
        return objs

    def classify(self, obj: Any) -> str:
        if obj is self.conn:
            return "messages"
        if self._pidfd is not None and obj == self._pidfd:
            return "death"
        return "other"

    def service(self, obj: Any) -> None:
        if obj == self._stderr_fd and self._stderr_fd is not None:
            self._read_stderr()

    def _read_stderr(self) -> None:
        assert self._stderr_fd is not None
        try:
            data = os.read(self._stderr_fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._stderr_fd = None  # EOF: the worker is gone or closed its stderr
            return
        try:
            os.write(2, data)  # as if inherited: the user sees the worker's warnings
        except OSError:
            pass
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[-4096:]
        self._tail.extend(line.decode(errors="replace") for line in lines)

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.kill()
            except OSError:
                pass

    def exitcode(self, timeout: float = 0.5) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def describe_exit(self) -> str:
        return describe_exit(self.exitcode())

    def stderr_tail(self) -> str:
        if self._stderr_fd is not None:
            self._read_stderr()
        lines = list(self._tail) + ([self._partial.decode(errors="replace")] if self._partial else [])
        return "\n".join(line for line in lines if line.strip())

    def close(self) -> None:
        """Reap the process and close every descriptor (after it exited or was killed)."""
        self.kill()
        try:
            self.process.wait(5.0)
        except subprocess.TimeoutExpired:
            pass
        for closer in (self.conn.close, self._stderr.close):
            try:
                closer()
            except OSError:
                pass
        if self._pidfd is not None:
            try:
                os.close(self._pidfd)
            except OSError:
                pass
            self._pidfd = None


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = {
            "SIGKILL": " - killed from outside, often by the out-of-memory killer",
            "SIGSEGV": " - a segmentation fault in native code",
            "SIGBUS": " - a bus error, often a full /dev/shm",
        }.get(name, "")
        return f"killed by {name}{hint}"
    return f"exit code {exitcode}"
