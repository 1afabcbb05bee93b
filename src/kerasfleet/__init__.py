"""kerasfleet: Keras models on all of a machine's cores and GPUs.

    kerasfleet.predict(model, x)          one call, same result as model.predict(x)
    kerasfleet.Fleet(model)               warm workers for repeated calls and streams
    kerasfleet.Predictor(model)           low latency in this process, no retracing after warm-up
    kerasfleet.make_plan()                workers, threads, cores and GPUs it would use

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
    "FleetError",
    "InputError",
    "ModelLoadError",
    "Plan",
    "Predictor",
    "WorkerCrashedError",
    "WorkerError",
    "__version__",
    "make_plan",
    "predict",
]

_LAZY = {
    "Fleet": "._fleet",
    "predict": "._predict",
    "make_plan": "._plan",
    "Predictor": "._predictor",
    "Plan": "._plan",
    "FleetError": "._errors",
    "FleetClosedError": "._errors",
    "InputError": "._errors",
    "ModelLoadError": "._errors",
    "WorkerError": "._errors",
    "WorkerCrashedError": "._errors",
}

if TYPE_CHECKING:
    from ._errors import FleetClosedError, FleetError, InputError, ModelLoadError, WorkerCrashedError, WorkerError
    from ._fleet import Fleet
    from ._plan import Plan, make_plan
    from ._predict import predict
    from ._predictor import Predictor


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kerasfleet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
