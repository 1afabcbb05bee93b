"""`RayWorker`: the runtime's `WorkerHandle` for a worker that is a Ray actor.

The supervisor waits on file descriptors, Ray on futures; a pipe joins them. Every actor call
returns an `ObjectRef`; its future's callback (a Ray thread) appends the reply (`Ready`,
`Done`, `Failed`) to an inbox and writes a byte to the pipe, whose read end is the handle's one
waitable. A call that fails because the actor is gone (killed, crashed, its node lost)
appends an end-of-file mark instead: `recv` raises `EOFError`, which the supervisor treats as
a death, as for a local worker's closed pipe - it requeues or fails the actor's tasks by their
retry policy and starts a replacement (soft node affinity: on another node when its own is
gone).

Ray runs an actor's calls from one caller in the order they were sent, so `Attach` before
`Call` and the PREFETCH of two calls per worker behave as over a local pipe.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from concurrent.futures import Future
from typing import Any

from ..runtime.plan import WorkerSlot
from ..runtime.protocol import Call, Failed, Ready, RemoteError, Stop, WorkerInit
from .layout import Staged

_EOF = object()


class RayWorker:
    def __init__(
        self, ray: Any, actor_class: Any, slot: WorkerSlot, init: Future[WorkerInit], env: dict[str, str], node: str
    ) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._ray = ray
        self.slot = slot
        self.pid: int | None = None
        self.node = node
        self._lock = threading.Lock()
        self._inbox: deque[Any] = deque()
        self._eof = False
        self._exit = "still running"
        # soft: a replacement whose node was lost goes to another node instead of waiting forever.
        # Created before the pipe: a failed creation (the supervisor retries) leaks no fd.
        self.actor = actor_class.options(
            num_cpus=slot.threads,
            num_gpus=1 if slot.gpu is not None else 0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True),
        ).remote()
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        # The actor's process starts now; its `start` call goes once the init's files are in
        # the object store (at once for a replacement: the future is long done).
        where = (list(sys.path), os.getcwd(), env, slot.cpus, node)
        init.add_done_callback(lambda shipped: self._start(where, shipped))

    # -- the supervisor thread ---------------------------------------------------------------
    def send(self, msg: Any) -> None:
        if self._eof:
            raise OSError(f"the Ray actor is gone ({self._exit})")
        if type(msg) is Stop:
            self._end("stopped")  # nothing to save in an actor: stopping is ending it
            return
        if type(msg) is Call and isinstance(msg.payload, Staged):
            # The reference as a top-level argument: Ray fetches the rows to the actor's node
            # (while its previous call runs) and hands the call the payload itself.
            ref = self.actor.call.remote(Call(msg.task_id, None), msg.payload.ref)
        else:
            ref = self.actor.call.remote(msg)
        self._watch(ref, msg.task_id if type(msg) is Call else None)

    def poll(self) -> bool:
        try:
            while os.read(self._r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        return bool(self._inbox)

    def recv(self) -> Any:
        with self._lock:
            if not self._inbox:
                raise EOFError("no message")
            msg = self._inbox.popleft()
        if msg is _EOF:
            raise EOFError(self._exit)
        return msg

    def waitables(self) -> list[Any]:
        return [self._r] if self._r >= 0 else []

    def classify(self, obj: Any) -> str:
        return "messages"

    def service(self, obj: Any) -> None:
        pass

    def is_alive(self) -> bool:
        return not self._eof

    def kill(self) -> None:
        self._end("killed")

    def describe_exit(self) -> str:
        return self._exit

    def stderr_tail(self) -> str:
        return ""  # Ray forwards an actor's output to the driver's stderr itself (log_to_driver)

    def close(self) -> None:
        self._end("closed")
        with self._lock:
            for fd in (self._r, self._w):
                if fd >= 0:
                    os.close(fd)
            self._r = self._w = -1

    # -- any thread ---------------------------------------------------------------------------
    def _start(self, where: tuple[Any, ...], shipped: Future[WorkerInit]) -> None:
        """The supervisor's thread or the shipping one: send the actor its `start` call."""
        try:
            init = shipped.result()
        except BaseException as exc:  # noqa: BLE001 - reported as this actor's failed start
            self._end(f"its files could not be shipped: {type(exc).__name__}: {exc}")
            return
        if self._eof:  # a worker killed meanwhile gets no call
            return
        try:
            self._watch(self.actor.start.remote(*where, init), None)
        except BaseException as exc:  # noqa: BLE001 - a done-callback's exception would only be logged
            self._end(f"its start call failed: {type(exc).__name__}: {exc}")

    def _end(self, reason: str) -> None:
        if not self._eof:
            try:
                self._ray.kill(self.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone, or Ray shutting down
                pass
        self._gone(reason)

    def _watch(self, ref: Any, task_id: int | None) -> None:
        ref.future().add_done_callback(lambda future: self._arrived(future, task_id))

    def _arrived(self, future: Any, task_id: int | None) -> None:
        """A Ray thread: an actor call finished."""
        from ray.exceptions import RayActorError, RayTaskError

        try:
            msg = future.result()
        except RayActorError as exc:
            self._gone(f"the Ray actor died: {_first_line(exc)}")
            return
        except RayTaskError as exc:
            if task_id is None:
                self._gone(f"the Ray actor failed: {_first_line(exc)}")
                return
            # The call raised outside the session (e.g. its result did not serialize).
            msg = Failed(
                task_id, RemoteError(type(exc.cause).__name__ if exc.cause else "RayTaskError", _first_line(exc), str(exc))
            )
        except BaseException as exc:  # noqa: BLE001 - an object lost with its node, Ray shutting down
            self._gone(f"its result was lost: {type(exc).__name__}: {_first_line(exc)}")
            return
        if msg is None:
            return  # Attach / Detach
        if type(msg) is Ready:
            self.pid = msg.pid
        self._push(msg)

    def _gone(self, reason: str) -> None:
        with self._lock:
            if self._eof:
                return
            self._eof = True
            self._exit = reason
        self._push(_EOF)

    def _push(self, msg: Any) -> None:
        with self._lock:
            self._inbox.append(msg)
            if self._w >= 0:
                try:
                    os.write(self._w, b"x")
                except OSError:
                    pass  # the pipe is full: the supervisor wakes anyway


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
