"""Where workers go on a cluster: the runtime's plan, per node (pure logic, no Ray import).

Each node gets what `runtime.make_plan` gives one machine with that node's cores, GPUs and
memory: one worker per GPU, else workers x threads = the node's cores. The slots of all nodes
are interleaved (node 0's first, node 1's first, ...), so `workers=N` below the cluster's
capacity spreads over the nodes instead of filling the first one. A slot's cores are indices
on its own node; an actor pins itself to them when it runs on that node.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from ..runtime import Plan, WorkerSlot, make_plan


@dataclass(frozen=True)
class NodeFacts:
    node_id: str
    cpus: int
    gpus: int
    memory: int  # bytes Ray may give tasks on the node


@dataclass(frozen=True)
class Staged:
    """A payload put in the object store once by the caller; its tasks carry only the reference.

    A requeued task (its actor died) is sent again without copying its rows again, and Ray
    fetches the rows to the actor's node before the call starts.
    """

    ref: Any
    label: str = ""


def cluster_plan(
    nodes: list[NodeFacts], workers: int | None, threads_per_worker: int | None, devices: Any
) -> tuple[Plan, tuple[str, ...]]:
    """(the plan over every node, the node id of each slot)."""
    nodes = [n for n in nodes if n.cpus >= 1 or n.gpus >= 1]
    if not nodes:
        raise InputError("Expected a Ray cluster with at least one node that has CPUs. Received: no such node.")
    gpu_total = sum(n.gpus for n in nodes)
    want_gpu = devices == "gpu" or (devices == "auto" and gpu_total > 0)
    if devices not in ("auto", "cpu", "gpu"):
        raise InputError(f"Expected devices to be 'auto', 'cpu' or 'gpu' on a cluster. Received: devices={devices!r}.")
    if devices == "gpu" and gpu_total == 0:
        raise InputError("Expected at least one GPU in the Ray cluster for devices='gpu'. Received: none.")
    per_node: list[list[tuple[WorkerSlot, str]]] = []
    for node in nodes:
        if want_gpu and node.gpus == 0:
            continue
        if not want_gpu and threads_per_worker is not None and threads_per_worker > node.cpus:
            continue  # an actor asking for more CPUs than the node has would never be placed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # capacity is checked below, across the cluster
            plan = make_plan(
                None,
                threads_per_worker,
                devices="gpu" if want_gpu else "cpu",
                cpus=range(max(node.cpus, 1)),
                gpus=[str(i) for i in range(node.gpus)],
                memory=node.memory,
            )
        per_node.append([(slot, node.node_id) for slot in plan.slots])
    if not per_node:
        raise InputError(
            f"Expected a node with at least threads_per_worker={threads_per_worker} CPUs in the Ray cluster. "
            f"Received: nodes with {sorted(n.cpus for n in nodes)} CPUs."
        )
    interleaved = [pair for i in range(max(map(len, per_node))) for slots in per_node if i < len(slots) for pair in (slots[i],)]
    if workers is not None:
        if workers > len(interleaved):
            capacity = ", ".join(f"{n.node_id[:8]}: {n.cpus} CPUs, {n.gpus} GPUs" for n in nodes)
            raise InputError(
                f"Expected at most {len(interleaved)} workers on this Ray cluster ({capacity}). Received: workers={workers}. "
                "Lower workers (or threads_per_worker), or add nodes."
            )
        interleaved = interleaved[:workers]
    slots = tuple(WorkerSlot(i, s.cpus, s.threads, s.gpu) for i, (s, _) in enumerate(interleaved))
    threads = slots[0].threads
    cpus = tuple(range(sum(n.cpus for n in nodes)))
    gpus = tuple(s.gpu for s in slots if s.gpu is not None)
    plan = Plan("gpu" if want_gpu else "cpu", len(slots), threads, slots, cpus, gpus, False)
    return plan, tuple(node for _, node in interleaved)
