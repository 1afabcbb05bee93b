"""`cluster=`: the same predict / evaluate / sweep calls on a Ray cluster.

    layout.py    the plan over the cluster's nodes (pure logic: cores and GPUs of each node)
    connection.py  check `cluster=`, import Ray (only here, only when asked), connect or start it
    ray_backend.py  RayCluster: nodes, plan, spawning actors, staging data in the object store
    handle.py    RayWorker: a runtime `WorkerHandle` whose process is a Ray actor
    actor.py     the actor: the runtime's worker session (same handlers, same engines)

Workers are Ray actors behind the runtime's `WorkerHandle` interface, so the supervisor's
retry policies, deadlines, retirement and crash accounting are the ones local workers get.
Nothing here imports Ray at import time: `import kerasfleet` never does; Ray is imported by
`connect()` when a call passes `cluster=` other than None.
"""

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["RayCluster", "Staged", "check_cluster", "connect"]

_LAZY = {
    "RayCluster": ".ray_backend",
    "Staged": ".layout",
    "check_cluster": ".connection",
    "connect": ".connection",
}

if TYPE_CHECKING:
    from .connection import check_cluster, connect
    from .layout import Staged
    from .ray_backend import RayCluster


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kerasfleet.cluster' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
