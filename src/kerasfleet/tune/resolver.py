"""One resolver: what `engine="auto"` means, for fleets and in-process paths alike.

"auto" is the fastest verified engine for this model on this machine:

- fleets (`predict`, `Fleet`, the CLI): the measured plan (see `trial.py`), cached per model and
  machine - its engine, its workers x threads split (unless the caller fixed one) and its
  batch size (unless given). GPU plans and models with variable row shapes use the Keras
  engine: the trial measures CPU configurations on fixed shapes.
- in-process (`Predictor`, one-shot `predict` on few rows): the plan's in-process candidate,
  ONNX Runtime, which the trial measures only when the export passed its parity check; with
  no plan yet, the parity check itself decides (ONNX if it passes, else Keras with a warning).

An explicit engine ("keras", "onnx") is used as given; "onnx" exports (or reads the cached
export) here, before any worker starts, so a refused export fails the call early.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from ..engines import ENGINES, default_batch_size, row_bytes
from ..engines import export as exporting  # looked up at call time: tests replace it
from ..engines.export import OnnxModel
from ..engines.model_file import ModelFile
from ..errors import FleetError, InputError
from ..runtime import Plan, make_plan
from .trial import FleetFactory, TunedPlan, cached_plan, get_plan

ENGINE_CHOICES = ("auto", *ENGINES)


@dataclass
class Resolution:
    engine: str
    plan: Plan
    batch_size: int | None
    tuned: TunedPlan | None = None
    onnx: OnnxModel | None = None

    def batch_for(self, rows: tuple[tuple[tuple[int, ...], str], ...]) -> int:
        """The batch size: given, tuned, or about 4 MB of input for this engine and device."""
        return self.batch_size or default_batch_size(row_bytes(rows), self.plan.device, self.engine)

    def in_process_wins(self, rows: int) -> bool:
        """True when ONNX Runtime in the caller finishes `rows` before this plan's fleet would."""
        return self.tuned is not None and self.tuned.use_in_process(rows)


def check_engine(engine: Any) -> None:
    if engine not in ENGINE_CHOICES:
        raise InputError(f"Expected engine to be one of {list(ENGINE_CHOICES)}. Received: engine={engine!r}.")


def resolve(
    model: ModelFile,
    *,
    engine: str,
    workers: int | None,
    threads_per_worker: int | None,
    devices: Any,
    batch_size: int | None,
    backend: str,
    custom_objects: dict[str, Any] | None,
    safe_mode: bool,
    fleet_factory: FleetFactory,
    plan: Plan | None = None,
) -> Resolution:
    """Engine, plan and batch size for a fleet; measures (once per model and machine) if needed.

    `plan`: a plan made elsewhere (a Ray cluster's, over its nodes) that "auto" keeps: only
    the engine and batch size come from the measured plan of this machine.
    """
    check_engine(engine)
    given_plan = plan is not None
    plan = plan if plan is not None else make_plan(workers, threads_per_worker, devices=devices)
    tuned = None
    if engine == "auto":
        if plan.device != "cpu" or not model.signature.fixed:
            engine = "keras"
        else:
            tuned = get_plan(
                model, backend=backend, custom_objects=custom_objects, safe_mode=safe_mode, fleet_factory=fleet_factory
            )
            engine = tuned.engine
            if workers is None and threads_per_worker is None and not given_plan:
                plan = make_plan(tuned.workers, tuned.threads_per_worker, devices=devices)
            batch_size = batch_size or tuned.batch_size
    onnx = exporting.export(model, custom_objects=custom_objects, safe_mode=safe_mode) if engine == "onnx" else None
    return Resolution(engine, plan, batch_size, tuned, onnx)


def resolve_in_process(
    model: ModelFile, *, engine: str, backend: str, custom_objects: dict[str, Any] | None, safe_mode: bool
) -> tuple[str, OnnxModel | None]:
    """The engine for a path in this process: ("onnx", export) or ("keras", None)."""
    check_engine(engine)
    if engine == "keras":
        return "keras", None
    if engine == "auto":
        tuned = cached_plan(model, backend)
        if tuned is not None and not tuned.in_process_rows_per_s:
            return "keras", None  # the trial found no verified ONNX export for this model
    try:
        return "onnx", exporting.export(model, custom_objects=custom_objects, safe_mode=safe_mode)
    except (FleetError, ImportError) as exc:
        if engine == "onnx":
            raise
        warnings.warn(
            f"kerasfleet: the ONNX engine is not used ({exc}); falling back to the Keras engine.", RuntimeWarning, stacklevel=3
        )
        return "keras", None
