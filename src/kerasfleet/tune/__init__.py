"""Tuning: the measured trial and the one resolver for engine, plan and batch size.

    trial.py     engine="auto"'s trial over engines, splits and batch sizes; the plan cache
    resolver.py  what "auto" means, for fleets and in-process paths

Imports `engines` and `runtime` below it; fleets to measure are passed in by the layer above.
"""

from .resolver import ENGINE_CHOICES, Resolution, check_engine, resolve, resolve_in_process
from .trial import DEFAULT_TRIAL_S, TunedPlan, cached_plan, get_plan, machine_key, plan_path, synthetic_inputs, tune

__all__ = [
    "DEFAULT_TRIAL_S",
    "ENGINE_CHOICES",
    "Resolution",
    "TunedPlan",
    "cached_plan",
    "check_engine",
    "get_plan",
    "machine_key",
    "plan_path",
    "resolve",
    "resolve_in_process",
    "synthetic_inputs",
    "tune",
]
