"""`RayCluster`: the one object the layers above use to run on Ray (imported only by `connect`).

    plan(workers, threads, devices)  the runtime's plan per node (layout.py), and each slot's node
    spawner(init, backend, nodes)    slot -> RayWorker, for `runtime.Supervisor`
    stage(payload)                   put a payload (a chunk's rows) in the object store once
    ship(init, files)                the handler's files (model, ONNX export) through the object store,
                                     put by a thread while the actors start (a future of the init)

Data never goes through /dev/shm on a cluster: a chunk's input rows are `ray.put` by the caller
(one copy into the local object store, then Ray moves them to the actor's node), its outputs
come back as the call's return value; `.npy` inputs and `out=` files are mapped by the actors
by path, which must then be on storage every node reads.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ..runtime import Plan, WorkerInit, WorkerSlot, worker_environment
from .actor import SHIPPED_HANDLER, Shipped, ShippedFile, WorkerActor
from .handle import RayWorker
from .layout import NodeFacts, Staged, cluster_plan


class RayCluster:
    def __init__(self, ray: Any) -> None:
        self.ray = ray

    def nodes(self) -> list[NodeFacts]:
        facts = []
        for node in self.ray.nodes():
            if not node.get("Alive"):
                continue
            res = node.get("Resources", {})
            facts.append(NodeFacts(node["NodeID"], int(res.get("CPU", 0)), int(res.get("GPU", 0)), int(res.get("memory", 0))))
        return facts

    def plan(self, workers: int | None, threads_per_worker: int | None, devices: Any) -> tuple[Plan, tuple[str, ...]]:
        # Over the nodes' whole capacity: actors that do not fit now (another fleet holds the
        # cores) wait for it, up to the fleet's start_timeout, rather than share cores.
        return cluster_plan(self.nodes(), workers, threads_per_worker, devices)

    def spawner(
        self, init: WorkerInit | Future[WorkerInit], backend: str, nodes: tuple[str, ...]
    ) -> Callable[[WorkerSlot], RayWorker]:
        # The caller's KERASFLEET_* settings (cache folder, test fault injection) reach the
        # actors as they reach local workers through the inherited environment.
        passed = {k: v for k, v in os.environ.items() if k.startswith("KERASFLEET_")}
        if isinstance(init, WorkerInit):
            ready: Future[WorkerInit] = Future()
            ready.set_result(init)
            init = ready

        def spawn(slot: WorkerSlot) -> RayWorker:
            env = {**worker_environment(slot, backend), **passed}
            if slot.gpu is not None:
                del env["CUDA_VISIBLE_DEVICES"]  # Ray gives the actor its GPU (num_gpus=1)
            return RayWorker(self.ray, WorkerActor, slot, init, env, nodes[slot.index])

        return spawn

    def stage(self, payload: Any, label: str = "") -> Staged:
        return Staged(self.ray.put(payload), label)

    def ship(self, init: WorkerInit, files: Mapping[str, str | os.PathLike[str] | None]) -> Future[WorkerInit]:
        """`init` with the named config fields' files shipped through the object store, soon.

        The files are read here (an unreadable one fails the caller at once, as before); they
        are hashed and put in the object store by a thread, while the actors' processes start:
        a process's first put alone takes about 0.1 s (the store's connection), and hashing
        and copying a large model file another fraction of a second per 100 MB. Each actor
        gets its `start` call once the files are in the store.
        """
        data = {field: (Path(path).name, Path(path).read_bytes()) for field, path in files.items() if path is not None}
        shipped: Future[WorkerInit] = Future()

        def put() -> None:
            try:
                refs = {
                    field: ShippedFile(self.ray.put(content), hashlib.sha256(content).hexdigest(), name)
                    for field, (name, content) in data.items()
                }
                shipped.set_result(WorkerInit(SHIPPED_HANDLER, Shipped(init.handler, init.config, refs), init.sys_path, init.cwd))
            except BaseException as exc:  # noqa: BLE001 - the actors report it as their start's failure
                shipped.set_exception(exc)

        threading.Thread(target=put, name="kerasfleet-ship", daemon=True).start()
        return shipped
