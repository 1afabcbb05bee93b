"""kerasfleet: Keras models on all of a machine's cores and GPUs.

    kerasfleet.predict(model, x)          one call, same result as model.predict(x)
    kerasfleet.Fleet(model)               warm workers for repeated calls and streams
    kerasfleet.Predictor(model)           low latency in this process, no retracing after warm-up
    kerasfleet.make_plan()                workers, threads, cores and GPUs it would use
    kerasfleet.keep_actors()              a block whose one-shot predict(cluster=) calls reuse their Ray actors
    kerasfleet.evaluate(model, x, y)      model.evaluate's dict, over the fleet; NumPy per-row scores in workers
    kerasfleet.serve(models) / Server     an HTTP server (KServe V2, TF Serving REST) with dynamic batching
    kerasfleet.sweep(fn, grid, seeds=)    every config x seed in worker processes, timeouts, SQLite, resume
    kerasfleet.Loader(dataset)            a PyDataset whose batches are made in worker processes
    kerasfleet.data_parallel()            models built and fit inside train data-parallel (JAX, TF)

Attributes load lazily: `import kerasfleet` costs milliseconds and imports no framework, and a
spawned worker can set its thread budget before NumPy or Keras start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Fleet",
    "FleetClosedError",
    "Loader",
    "FleetError",
    "InputError",
    "ModelLoadError",
    "Plan",
    "PrecisionRefused",
    "TaskTimeoutError",
    "Predictor",
    "Server",
    "WorkerCrashedError",
    "WorkerError",
    "WorkerStartError",
    "__version__",
    "data_parallel",
    "devices",
    "evaluate",
    "keep_actors",
    "make_plan",
    "predict",
    "serve",
    "SweepResult",
    "sweep",
]

_LAZY = {
    "Fleet": ".prediction.fleet",
    "predict": ".prediction.api",
    "keep_actors": ".prediction.kept",
    "evaluate": ".evaluation.evaluate",
    "Predictor": ".prediction.predictor",
    "make_plan": ".runtime.plan",
    "Server": ".serving.server",
    "serve": ".serving.server",
    "Plan": ".runtime.plan",
    "FleetError": ".errors",
    "FleetClosedError": ".errors",
    "InputError": ".errors",
    "ModelLoadError": ".errors",
    "PrecisionRefused": ".errors",
    "TaskTimeoutError": ".errors",
    "WorkerError": ".errors",
    "WorkerCrashedError": ".errors",
    "WorkerStartError": ".errors",
    "sweep": ".sweeps.api",
    "SweepResult": ".sweeps.results",
    "Loader": ".training.loader",
    "data_parallel": ".training.parallel",
    "devices": ".training.parallel",
}

if TYPE_CHECKING:
    from .errors import (
        FleetClosedError,
        FleetError,
        InputError,
        ModelLoadError,
        PrecisionRefused,
        TaskTimeoutError,
        WorkerCrashedError,
        WorkerError,
        WorkerStartError,
    )
    from .evaluation.evaluate import evaluate
    from .prediction.api import predict
    from .prediction.fleet import Fleet
    from .prediction.kept import keep_actors
    from .prediction.predictor import Predictor
    from .runtime.plan import Plan, make_plan
    from .serving.server import Server, serve
    from .sweeps.api import sweep
    from .sweeps.results import SweepResult
    from .training.loader import Loader
    from .training.parallel import data_parallel, devices


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kerasfleet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
