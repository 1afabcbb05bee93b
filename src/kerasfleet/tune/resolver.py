"""One resolver: what `engine="auto"` means, for fleets and in-process paths alike.

"auto" is the fastest verified engine for this model on this machine:

- fleets (`predict`, `Fleet`, the CLI): the measured plan (see `trial.py`), cached per model and
  machine - its engine, its workers x threads split (unless the caller fixed one) and its
  batch size (unless given). GPU plans and models with variable row shapes use the Keras
  engine: the trial measures CPU configurations on fixed shapes.
- in-process (`Predictor`, one-shot `predict` on few rows): the plan's in-process candidate,
  ONNX Runtime, which the trial measures only when the export passed its parity check; with
  no plan yet, the parity check itself decides (ONNX if it passes, else Keras with a warning).

An explicit engine ("keras", "onnx", "openvino") is used as given; "onnx" and "openvino"
export (or read the cached export) here, before any worker starts, and "openvino" checks its
parity too, so a refused export fails the call early.

`precision` other than "fp32" (see `precision.py`) resolves to the file, engine and hint the
gate let through, on CPU workers; its plan is the default split unless one is given.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from ..engines import ENGINES, default_batch_size, row_bytes
from ..engines import export as exporting  # looked up at call time: tests replace it
from ..engines.export import ATOL, RTOL, OnnxModel
from ..engines.model_file import ModelFile
from ..errors import FleetError, InputError
from ..runtime import Plan, make_plan
from .precision import Gate, PrecisionChoice, check_precision, choose_precision
from .trial import FleetFactory, TunedPlan, cached_plan, get_plan

ENGINE_CHOICES = ("auto", *ENGINES)


@dataclass
class Resolution:
    engine: str
    plan: Plan
    batch_size: int | None
    tuned: TunedPlan | None = None
    onnx: OnnxModel | None = None
    precision: PrecisionChoice | None = None

    @property
    def ov_precision(self) -> str:
        """OpenVINO's precision hint for the engine ("f32" unless bf16/fp16 was chosen)."""
        return self.precision.ov_precision if self.precision is not None else "f32"

    def batch_for(self, rows: tuple[tuple[tuple[int, ...], str], ...]) -> int:
        """The batch size: given, tuned, or about 4 MB of input for this engine and device."""
        return self.batch_size or default_batch_size(row_bytes(rows), self.plan.device, self.engine)

    def in_process_wins(self, rows: int) -> bool:
        """True when ONNX Runtime in the caller finishes `rows` before this plan's fleet would."""
        return self.precision is None and self.tuned is not None and self.tuned.use_in_process(rows)


@dataclass(frozen=True)
class PrecisionRequest:
    """precision= and what it needs: the gate's thresholds and the rows to calibrate and gate on.

    `given` are rows passed as calibration= (arrays in the signature's order); `rows` reads the
    input's first rows, called only when no verdict is stored yet.
    """

    precision: str = "fp32"
    gate: Gate = Gate()
    given: list[Any] | None = None
    rows: Any = None

    def choose(
        self, model: ModelFile, engine: str, backend: str, custom_objects: dict[str, Any] | None, safe_mode: bool
    ) -> PrecisionChoice:
        return choose_precision(
            model,
            precision=self.precision,
            engine=engine,
            rows=self.rows,
            given=self.given,
            gate=self.gate,
            backend=backend,
            custom_objects=custom_objects,
            safe_mode=safe_mode,
        )


FP32 = PrecisionRequest()


def export_for(engine: str, model: ModelFile, custom_objects: dict[str, Any] | None, safe_mode: bool) -> OnnxModel | None:
    """The checked export an explicit engine reads ("onnx", "openvino"), None for "keras"."""
    if engine not in ("onnx", "openvino"):
        return None
    onnx = exporting.export(model, custom_objects=custom_objects, safe_mode=safe_mode)
    if engine == "openvino":
        from ..engines.openvino_engine import check_parity

        check_parity(onnx.path, onnx.meta, onnx.sample, rtol=RTOL, atol=ATOL)
    return onnx


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
    precision: PrecisionRequest = FP32,
) -> Resolution:
    """Engine, plan and batch size for a fleet; measures (once per model and machine) if needed.

    `plan`: a plan made elsewhere (a Ray cluster's, over its nodes) that "auto" keeps: only
    the engine and batch size come from the measured plan of this machine.
    """
    check_engine(engine)
    check_precision(precision.precision, engine)
    given_plan = plan is not None
    plan = plan if plan is not None else make_plan(workers, threads_per_worker, devices=devices)
    if precision.precision != "fp32":
        if plan.device != "cpu":
            raise InputError(
                f"Expected CPU workers for precision={precision.precision!r} (on GPUs it is measured by "
                "bench/gpu_precision.py, not yet a fleet option). Received: a GPU plan; pass devices='cpu'."
            )
        choice = precision.choose(model, engine, backend, custom_objects, safe_mode)
        return Resolution(choice.engine, plan, batch_size, None, choice.onnx, choice)
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
    return Resolution(engine, plan, batch_size, tuned, export_for(engine, model, custom_objects, safe_mode))


@dataclass(frozen=True)
class InProcessChoice:
    engine: str
    onnx: OnnxModel | None
    precision: PrecisionChoice | None = None

    @property
    def ov_precision(self) -> str:
        return self.precision.ov_precision if self.precision is not None else "f32"


def resolve_in_process(
    model: ModelFile,
    *,
    engine: str,
    backend: str,
    custom_objects: dict[str, Any] | None,
    safe_mode: bool,
    precision: PrecisionRequest = FP32,
) -> InProcessChoice:
    """The engine for a path in this process: the plan's in-process engine (ONNX or OpenVINO on
    the export), Keras, or the reduced precision the gate let through."""
    check_engine(engine)
    check_precision(precision.precision, engine)
    if precision.precision != "fp32":
        choice = precision.choose(model, engine, backend, custom_objects, safe_mode)
        return InProcessChoice(choice.engine, choice.onnx, choice)
    if engine == "keras":
        return InProcessChoice("keras", None)
    asked = engine
    if engine == "auto":
        tuned = cached_plan(model, backend)
        if tuned is not None and not tuned.in_process_rows_per_s:
            return InProcessChoice("keras", None)  # the trial found no verified ONNX export for this model
        engine = tuned.in_process_engine if tuned is not None else "onnx"
    try:
        return InProcessChoice(engine, export_for(engine, model, custom_objects, safe_mode))
    except (FleetError, ImportError) as exc:
        if asked != "auto":
            raise
        warnings.warn(
            f"kerasfleet: the {engine} engine is not used ({exc}); falling back to the Keras engine.",
            RuntimeWarning,
            stacklevel=3,
        )
        return InProcessChoice("keras", None)
