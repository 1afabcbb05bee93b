"""Tuning: the measured trial and the one resolver for engine, plan, batch size and precision.

    trial.py      engine="auto"'s trial over engines, splits and batch sizes; the plan cache
    precision.py  precision=: int8/bf16/fp16 candidates, the accuracy gate, the verdict cache
    resolver.py   what "auto" and precision= mean, for fleets and in-process paths

Imports `engines` and `runtime` below it; fleets to measure are passed in by the layer above.
"""

from ..errors import PrecisionRefused
from .precision import PRECISIONS, Gate, PrecisionChoice, cached_choices, check_precision, describe_verdict
from .resolver import (
    ENGINE_CHOICES,
    FP32,
    InProcessChoice,
    PrecisionRequest,
    Resolution,
    check_engine,
    resolve,
    resolve_in_process,
)
from .trial import DEFAULT_TRIAL_S, TunedPlan, cached_plan, get_plan, machine_key, plan_path, synthetic_inputs, tune

__all__ = [
    "DEFAULT_TRIAL_S",
    "ENGINE_CHOICES",
    "FP32",
    "PRECISIONS",
    "Gate",
    "InProcessChoice",
    "PrecisionChoice",
    "PrecisionRefused",
    "PrecisionRequest",
    "Resolution",
    "TunedPlan",
    "cached_choices",
    "cached_plan",
    "check_engine",
    "check_precision",
    "describe_verdict",
    "get_plan",
    "machine_key",
    "plan_path",
    "resolve",
    "resolve_in_process",
    "synthetic_inputs",
    "tune",
]
