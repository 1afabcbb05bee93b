"""The runtime: worker processes and the supervisor that runs any kind of task on them.

    plan.py        workers, threads, cores and GPUs (pure logic over the machine's facts)
    machine.py     the machine's facts: usable cores (affinity and cgroup quota), GPUs, memory
    protocol.py    the messages (dataclasses) between supervisor and workers
    bootstrap.py   a worker's first steps: environment, affinity, then imports
    worker.py      the worker's loop and the TaskHandler protocol
    handles.py     WorkerHandle (the interface) and LocalWorker (a subprocess)
    supervisor.py  the task supervisor thread: submit -> Future, retry policies, deadlines
    buffers.py     shared memory (or file-backed maps) described by small BufferSpecs

Imports nothing from the layers above (engines, tune, prediction, cli). Names load lazily: a
worker starts with `kerasfleet.runtime.bootstrap`, which must not import NumPy (or anything
that starts threads) before its environment and affinity are in place.
"""

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "RECORD",
    "REQUEUE",
    "BufferSpec",
    "Context",
    "Echo",
    "LocalWorker",
    "Noop",
    "OpenBuffer",
    "Plan",
    "RetryPolicy",
    "SharedBuffers",
    "Sleep",
    "Supervisor",
    "WorkerHandle",
    "WorkerInit",
    "WorkerSlot",
    "available_memory",
    "cpu_flags",
    "default_backend",
    "describe_exit",
    "make_plan",
    "usable_cpus",
    "visible_gpus",
    "worker_environment",
]

_LAZY = {
    "BufferSpec": ".buffers",
    "Context": ".supervisor",
    "Echo": ".protocol",
    "LocalWorker": ".handles",
    "Noop": ".protocol",
    "OpenBuffer": ".buffers",
    "Plan": ".plan",
    "RECORD": ".supervisor",
    "REQUEUE": ".supervisor",
    "RetryPolicy": ".supervisor",
    "SharedBuffers": ".buffers",
    "Sleep": ".protocol",
    "Supervisor": ".supervisor",
    "WorkerHandle": ".handles",
    "WorkerInit": ".protocol",
    "WorkerSlot": ".plan",
    "available_memory": ".machine",
    "cpu_flags": ".machine",
    "default_backend": ".machine",
    "describe_exit": ".handles",
    "make_plan": ".plan",
    "usable_cpus": ".machine",
    "visible_gpus": ".machine",
    "worker_environment": ".plan",
}

if TYPE_CHECKING:
    from .buffers import BufferSpec, OpenBuffer, SharedBuffers
    from .handles import LocalWorker, WorkerHandle, describe_exit
    from .machine import available_memory, cpu_flags, default_backend, usable_cpus, visible_gpus
    from .plan import Plan, WorkerSlot, make_plan, worker_environment
    from .protocol import Echo, Noop, Sleep, WorkerInit
    from .supervisor import RECORD, REQUEUE, Context, RetryPolicy, Supervisor


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kerasfleet.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
