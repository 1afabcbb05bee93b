"""The Ray actor a `RayWorker` drives: the runtime's worker session in a Ray worker process.

    start(sys_path, cwd, env, cpus, node, init) -> Ready | Fatal     (once)
    call(msg[, staged payload])                 -> Done | Failed | None (each message)

It runs the same handlers (engines, sweeps, scoring) and the same `runtime.worker.Session` as
a local worker process, so a payload means the same thing everywhere. Before the handler is
built - before Keras or a backend is imported - the worker environment (backend, thread
budget, no GPU for CPU workers) is put in place and, on the node its slot was planned for, the
process is pinned to the slot's cores, as a local worker's bootstrap does.

Files the handler needs (the model, its ONNX export) are shipped through the object store
(`Shipped`): written once per node under `<cache>/ray-files/<sha256>-<name>`, then the
handler's config points at the node's copy.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from ..cache import cache_dir
from ..runtime.bootstrap import pin_threads
from ..runtime.protocol import Call, Done, Failed, Fatal, Ready, WorkerInit
from ..runtime.worker import Session, load_factory, remote_error

SHIPPED_HANDLER = "kerasfleet.cluster.actor:shipped_handler"


@dataclass(frozen=True)
class ShippedFile:
    ref: Any  # an ObjectRef to the file's bytes, owned by the caller
    sha256: str
    name: str


@dataclass(frozen=True)
class Shipped:
    """A handler whose config names files of the caller's machine: shipped, then rewritten."""

    handler: str
    config: Any
    files: dict[str, ShippedFile]  # config field -> the file's bytes


def shipped_handler(shipped: Shipped) -> Any:
    changes = {field: str(materialize(f)) for field, f in shipped.files.items()}
    return load_factory(shipped.handler)(dataclasses.replace(shipped.config, **changes))


def materialize(f: ShippedFile) -> Path:
    """The node's copy of a shipped file, written once (atomically) by the first actor that needs it."""
    folder = cache_dir() / "ray-files"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{f.sha256[:32]}-{f.name}"
    if not path.exists():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(ray.get(f.ref))
        os.replace(tmp, path)
    return path


@ray.remote(max_restarts=0, max_task_retries=0)
class WorkerActor:
    def __init__(self) -> None:
        self.session: Session | None = None

    def start(
        self, sys_path: list[str], cwd: str, env: dict[str, str], cpus: tuple[int, ...], node: str, init: WorkerInit
    ) -> Ready | Fatal:
        started = time.perf_counter()
        os.environ.update(env)
        if cpus and hasattr(os, "sched_getaffinity") and ray.get_runtime_context().get_node_id() == node:
            # Only on its planned node, and only onto cores this process may use: a replacement
            # placed on another node (its own was lost) keeps Ray's placement as it is.
            if set(cpus) <= os.sched_getaffinity(0):
                pin_threads(tuple(cpus))
        sys.path[:] = [p for p in sys_path if p not in sys.path] + sys.path
        if os.path.isdir(cwd):
            os.chdir(cwd)
        try:
            handler = load_factory(init.handler)(init.config)
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the caller
            return Fatal(remote_error(exc))
        self.session = Session(handler)
        return Ready(os.getpid(), dict(handler.info), time.perf_counter() - started)

    def call(self, msg: Any, staged: Any = None) -> Done | Failed | None:
        if staged is not None:  # a Staged payload: Ray resolved its reference before this call
            msg = Call(msg.task_id, staged)
        assert self.session is not None
        return self.session.handle(msg)
