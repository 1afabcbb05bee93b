"""The worker's loop: build the handler once, then run calls until told to stop.

The runtime does not know what a worker computes. `WorkerInit.handler` names a factory
("module:function") that the worker imports and calls once; the object it returns
(`TaskHandler`) runs the payloads of `Call`s and maps the buffers of `Attach`ed contexts.
Built-in payloads (`Noop`, `Echo`, `Sleep`) need no handler, so the supervisor can be tested
and benchmarked on bare workers that import nothing heavy.

An exception in a call goes back as `Failed` with the formatted traceback, and the worker
carries on; an exception while building the handler goes back as `Fatal`, and the worker
exits.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
import time
import traceback
from typing import Any, Protocol

from .protocol import Attach, Call, Detach, Done, Echo, Failed, Fatal, Noop, Ready, RemoteError, Sleep, Stop, WorkerInit


class TaskHandler(Protocol):
    """What a worker runs; built once per worker by the factory `WorkerInit.handler` names."""

    info: dict[str, Any]  # sent to the supervisor in `Ready` (backend, warm-up results, ...)

    def attach(self, context_id: int, payload: Any) -> None: ...

    def detach(self, context_id: int) -> None: ...

    def run(self, payload: Any) -> Any: ...


class BareHandler:
    """The handler of workers that only run built-in payloads."""

    info: dict[str, Any] = {}

    def __init__(self, config: Any = None) -> None:
        self.info = {"config": config}

    def attach(self, context_id: int, payload: Any) -> None:
        pass

    def detach(self, context_id: int) -> None:
        pass

    def run(self, payload: Any) -> Any:
        raise TypeError(f"Expected a built-in payload (Noop, Echo, Sleep) in a bare worker. Received: {type(payload).__name__}.")


def bare_handler(config: Any) -> BareHandler:
    return BareHandler(config)


def remote_error(exc: BaseException) -> RemoteError:
    return RemoteError(type(exc).__name__, str(exc), traceback.format_exc())


def load_factory(spec: str) -> Any:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


class Fault:
    """Test-only fault injection (KERASFLEET_FAULT="kind@row[@marker]"), read once at start.

    Fires in a call whose payload covers `row` (payloads with `start`/`stop`), or with
    row "probe" in a call that compiles a new shape. kinds: kill
    (SIGKILL), segfault, exit, raise, badpickle, and slow ("slow@MS": every call carrying rows
    sleeps MS milliseconds, so a test can act while a call is running); with a marker path the fault fires only while
    that file does not exist (it is created on firing), i.e. once across restarts.
    """

    def __init__(self, text: str | None) -> None:
        self.kind: str | None = None
        self.row, self.marker = -1, None
        if text:
            parts = text.split("@")
            self.kind, self.row = parts[0], -2 if parts[1] == "probe" else int(parts[1])
            self.marker = parts[2] if len(parts) > 2 else None

    def maybe_fire(self, conn: Any, payload: Any) -> None:
        if self.kind is None:
            return
        if self.kind == "slow":  # "slow@MS": every call that carries rows sleeps MS milliseconds
            if getattr(payload, "start", None) is not None:
                time.sleep(self.row / 1000)
            return
        if self.row == -2:  # "kind@probe": fires while compiling a new shape
            if type(payload).__name__ != "Probe":
                return
        else:
            start, stop = getattr(payload, "start", None), getattr(payload, "stop", None)
            if start is None or stop is None or not start <= self.row < stop:
                return
        if self.marker is not None:
            if os.path.exists(self.marker):
                return
            open(self.marker, "w").close()
        if self.kind == "kill":
            os.kill(os.getpid(), 9)
        elif self.kind == "segfault":
            import ctypes

            ctypes.string_at(0)
        elif self.kind == "exit":
            os._exit(3)
        elif self.kind == "badpickle":
            conn.send_bytes(b"\x80\x05not a pickle")
        elif self.kind == "raise":
            raise RuntimeError(f"injected fault at row {self.row}")


def _builtin(payload: Any) -> Any:
    if isinstance(payload, Echo):
        return payload.value
    if isinstance(payload, Sleep):
        time.sleep(payload.seconds)
    return None


class Session:
    """A worker's state between messages: its handler, its fault injection, the contexts that
    failed to attach. Shared by the process loop below and by a Ray actor (`kerasfleet.cluster`),
    so both run a message exactly the same way."""

    def __init__(self, handler: TaskHandler, conn: Any = None) -> None:
        self.handler = handler
        self.conn = conn
        self.fault = Fault(os.environ.get("KERASFLEET_FAULT"))
        self.broken_contexts: dict[int, BaseException] = {}

    def handle(self, msg: Any) -> Done | Failed | None:
        """Run one message; the reply for a `Call`, None for `Attach` / `Detach`."""
        if type(msg) is Call:
            payload = msg.payload
            try:
                context = getattr(payload, "context_id", None)
                if context is not None and context in self.broken_contexts:
                    raise self.broken_contexts[context]
                self.fault.maybe_fire(self.conn, payload)
                result = _builtin(payload) if isinstance(payload, _BUILTINS) else self.handler.run(payload)
            except Exception as exc:  # noqa: BLE001
                return Failed(msg.task_id, remote_error(exc))
            return Done(msg.task_id, result)
        if type(msg) is Attach:
            try:
                self.handler.attach(msg.context_id, msg.payload)
            except Exception as exc:  # noqa: BLE001 - reported by the context's calls
                self.broken_contexts[msg.context_id] = exc
        elif type(msg) is Detach:
            self.broken_contexts.pop(msg.context_id, None)
            self.handler.detach(msg.context_id)
        return None


_BUILTINS = (Noop, Echo, Sleep)


def serve(conn: Any, init: WorkerInit) -> None:
    started = time.perf_counter()
    try:
        handler: TaskHandler = load_factory(init.handler)(init.config)
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the caller
        conn.send(Fatal(remote_error(exc)))
        return
    conn.send(Ready(os.getpid(), dict(handler.info), time.perf_counter() - started))
    session = Session(handler, conn)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the caller is gone
        if type(msg) is Stop:
            sys.stdout.flush()
            return
        reply = session.handle(msg)
        if reply is None:
            continue
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:  # a result that does not pickle
            conn.send(Failed(reply.task_id, remote_error(exc)))
