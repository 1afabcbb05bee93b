"""The messages between the supervisor and a worker: small frozen dataclasses, never tuples.

    supervisor                                    worker
    ──────────                                    ──────
    (spawn with WorkerInit on the pipe)    ->     build the handler (load model, warm up)
                                           <-     Ready(pid, info, startup_s) | Fatal(error)
    Attach(context_id, payload)            ->     handler.attach: e.g. map a job's buffers
    Call(task_id, payload)                 ->     handler.run(payload) (or a built-in payload)
                                           <-     Done(task_id, result) | Failed(task_id, error)
    Detach(context_id)                     ->     handler.detach
    Stop() or EOF                          ->     exit

A payload is a small dataclass naming the kind of work (predict rows, probe a shape, a no-op,
later evaluate, trial, load a batch); bulk data never travels in messages - it sits in shared
buffers the payload points to, except for small inline requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class WorkerInit:
    """What a worker needs before its first task.

    `handler` is "module:factory", imported inside the worker: the runtime knows nothing of
    models or engines; the layer above plugs in what the worker runs. `sys_path` is the
    caller's, so modules next to the caller's script import in the worker without the worker
    ever running that script.
    """

    handler: str
    config: Any
    sys_path: tuple[str, ...] = ()
    cwd: str | None = None


@dataclass(frozen=True)
class RemoteError:
    """An exception raised in a worker, as text (its class may not exist in the caller)."""

    type_name: str
    message: str
    traceback: str


# -- supervisor -> worker -------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    task_id: int
    payload: Any


@dataclass(frozen=True)
class Attach:
    context_id: int
    payload: Any


@dataclass(frozen=True)
class Detach:
    context_id: int


@dataclass(frozen=True)
class Stop:
    pass


# -- worker -> supervisor -------------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    pid: int
    info: dict[str, Any] = field(default_factory=dict)
    startup_s: float = 0.0


@dataclass(frozen=True)
class Fatal:
    error: RemoteError


@dataclass(frozen=True)
class Done:
    task_id: int
    result: Any = None


@dataclass(frozen=True)
class Failed:
    task_id: int
    error: RemoteError


# -- built-in payloads every worker understands (no handler involved) ------------------------
@dataclass(frozen=True)
class Noop:
    """Does nothing: measures the runtime's own overhead per task."""


@dataclass(frozen=True)
class Echo:
    value: Any


@dataclass(frozen=True)
class Sleep:
    """Sleeps in the worker (a stand-in for a long task in tests of deadlines and cancelling)."""

    seconds: float
