"""precision=: int8, bf16 and fp16 only when they keep the answers, measured on the user's rows.

    rows (calibration=, else the first rows of the input)
      ├─ the first 128 (at most a quarter)  ──► calibrate the static int8 file
      └─ the next up to 1024 (held out)     ──► the accuracy gate, against fp32 Keras outputs
                                                 (Keras in one runtime worker, the caller's backend)

    candidates (engine "auto": all; "onnx" / "openvino": that runtime's)
      int8   ort-static (QDQ on ONNX Runtime), ort-dynamic, openvino-int8 (the QDQ file on OpenVINO)
      bf16   openvino-bf16  (OpenVINO's inference precision hint; needs AVX512_BF16 or AMX-BF16)
      fp16   openvino-fp16  (needs AVX512_FP16 or AMX-FP16)
    each: rows/s on the held-out rows (every usable core) and the gate's numbers; the fastest
    that passes wins - unless the fp32 export runs faster still, which then runs instead (said
    in the verdict's note and a warning). None passes -> PrecisionRefused with every
    candidate's numbers.

The gate: max and mean abs difference over every output and, for classifier-shaped outputs
(float, one vector per row of at least 2 values), top-1 agreement. It passes when the top-1
disagreement is at most `max_top1_disagreement` (0.005) and, if `atol` is set, the max abs
difference is at most `atol`. An output with no threshold that applies (not classifier-shaped,
no `atol`) refuses: a reduced precision is never used without a check that could fail.

The verdict (choice or refusal) is JSON in `<cache>/precision/`, keyed by the model, the
machine, the precision, the engine asked for, the thresholds and the calibration rows when
given explicitly (rows taken from the input are not part of the key: the first call's rows
decide, later calls reuse the verdict). fp32 never comes here: it is the export as it is.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import cache_dir, locked, model_hash, short_hash, write_atomic
from ..engines import Engine, EngineConfig, build_engine, default_batch_size, row_bytes
from ..engines import export as exporting  # looked up at call time: tests replace it
from ..engines.export import ATOL, RTOL, OnnxModel
from ..engines.handler import HANDLER, PredictInline
from ..engines.model_file import ModelFile
from ..errors import FleetError, InputError, PrecisionRefused
from ..runtime import LocalWorker, Supervisor, WorkerInit, cpu_flags, make_plan, usable_cpus, worker_environment
from .trial import machine_key

PRECISIONS = ("fp32", "int8", "bf16", "fp16")
MAX_TOP1_DISAGREEMENT = 0.005
CALIBRATION_ROWS = 128
GATE_ROWS = 1024
MIN_ROWS = 64
_MAX_GATE_BYTES = 64 << 20
_TIMED_S = 0.3
_REFERENCE_TIMEOUT_S = 600.0
_FORMAT = 1
# The instructions that make a precision fast on a CPU (else it is emulated, slower than fp32).
_NEEDS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}
_OV_HINT = {"bf16": "bf16", "fp16": "f16"}


@dataclass(frozen=True)
class Gate:
    """The accuracy gate's thresholds (see the module docstring)."""

    max_top1_disagreement: float = MAX_TOP1_DISAGREEMENT
    atol: float | None = None

    def __post_init__(self) -> None:
        v = self.max_top1_disagreement
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise InputError(f"Expected max_top1_disagreement to be a number in [0, 1]. Received: max_top1_disagreement={v!r}.")
        a = self.atol
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or a < 0):
            raise InputError(f"Expected atol to be a number >= 0, or None. Received: atol={a!r}.")

    def judge(self, numbers: dict[str, Any]) -> tuple[bool, str]:
        """(passed, why not) for a candidate's gate numbers."""
        top1 = numbers.get("top1_agreement")
        if numbers.get("non_finite"):
            return False, "non-finite outputs (NaN or inf) where fp32 Keras gives finite ones"
        if top1 is not None and 1.0 - top1 > self.max_top1_disagreement + 1e-12:
            return False, f"top-1 disagreement {1.0 - top1:.2%} > max_top1_disagreement {self.max_top1_disagreement:.2%}"
        ungated = numbers.get("ungated_outputs", [] if top1 is not None else ["every output"])
        if ungated and self.atol is None:
            # Top-1 agreement says nothing of a regression head next to a classifier head.
            return (
                False,
                f"no threshold applies to {', '.join(map(str, ungated))} (not classifier-shaped): pass atol= to gate "
                "them by max abs difference",
            )
        if self.atol is not None and numbers["max_abs"] > self.atol:
            return False, f"max abs difference {numbers['max_abs']:.3g} > atol {self.atol:g}"
        return True, ""


@dataclass
class PrecisionChoice:
    """What a reduced precision runs as, why, and the numbers that let it."""

    precision: str
    variant: str
    engine: str
    file: str
    meta: dict[str, Any]
    ov_precision: str
    rows_per_s: float
    fp32_rows_per_s: float
    gate: dict[str, Any]
    thresholds: dict[str, Any]
    candidates: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""

    @property
    def onnx(self) -> OnnxModel:
        return OnnxModel(Path(self.file), self.meta)

    def describe(self) -> str:
        g = self.gate
        top1 = f"top-1 agreement {g['top1_agreement']:.2%}, " if g.get("top1_agreement") is not None else ""
        return (
            f"{self.precision} as {self.variant} ({self.engine}): {self.rows_per_s:,.0f} rows/s, "
            f"{self.rows_per_s / max(self.fp32_rows_per_s, 1e-9):.2f}x the best fp32 export engine; "
            f"gate on {g['rows']} held-out rows: {top1}max abs diff {g['max_abs']:.3g}, mean abs diff {g['mean_abs']:.3g}"
        ) + (f" ({self.note})" if self.note else "")


def check_precision(precision: Any, engine: str) -> None:
    """Refuse an unknown precision, or one the engine asked for cannot run, before any work."""
    if precision not in PRECISIONS:
        raise InputError(f"Expected precision to be one of {list(PRECISIONS)}. Received: precision={precision!r}.")
    if precision == "fp32":
        return
    if engine == "keras":
        raise InputError(
            f"Expected engine 'auto', 'onnx' or 'openvino' with precision={precision!r} (reduced precisions run on the "
            "checked export). Received: engine='keras'. Use engine='auto'."
        )
    if precision in _NEEDS and engine == "onnx":
        raise InputError(
            f"Expected engine 'auto' or 'openvino' with precision={precision!r} on a CPU (ONNX Runtime has no fast "
            f"{precision} CPU kernels; OpenVINO's precision hint does). Received: engine='onnx'."
        )


def check_hardware(precision: str, flags: frozenset[str] | None = None) -> None:
    """bf16 and fp16 need their instructions on this CPU; elsewhere, a clear refusal."""
    needed = _NEEDS.get(precision)
    if needed is None:
        return
    have = cpu_flags() if flags is None else flags
    if not any(f in have for f in needed):
        shown = ", ".join(sorted(f for f in have if f.startswith(("avx", "amx")))) or "none reported"
        raise InputError(
            f"Expected a CPU with {' or '.join(f.upper() for f in needed)} for precision={precision!r} (without them it is "
            f"emulated, slower than fp32). Received: a CPU with {shown}. Use precision='int8' (gated) or 'fp32', "
            "or a GPU (see bench/gpu_precision.py)."
        )


def choice_path(model: ModelFile, precision: str, engine: str, gate: Gate, backend: str, calibration_id: str) -> Path:
    parts = short_hash(_FORMAT, gate.max_top1_disagreement, gate.atol, calibration_id, _openvino_version())
    return cache_dir() / "precision" / f"{model_hash(model.path)}-{machine_key(backend)}-{precision}-{engine}-{parts}.json"


def cached_choices(model: ModelFile, backend: str) -> list[dict[str, Any]]:
    """Every stored verdict (choices and refusals) for this model on this machine, for info/tune/profile."""
    folder = cache_dir() / "precision"
    found = []
    for path in sorted(folder.glob(f"{model_hash(model.path)}-{machine_key(backend)}-*.json")):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass
    return found


def describe_verdict(verdict: dict[str, Any]) -> str:
    if verdict.get("refused"):
        return f"{verdict['precision']} refused: {verdict['message']}"
    return PrecisionChoice(**verdict["choice"]).describe()


def calibration_id(arrays: list[np.ndarray[Any, Any]] | None) -> str:
    """The key part of explicitly given calibration rows (their bytes), or "input"."""
    if arrays is None:
        return "input"
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(str((a.shape, a.dtype.str)).encode())
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()[:16]


def choose_precision(
    model: ModelFile,
    *,
    precision: str,
    engine: str,
    rows: Callable[[], list[np.ndarray[Any, Any]]] | None,
    given: list[np.ndarray[Any, Any]] | None,
    gate: Gate,
    backend: str,
    custom_objects: dict[str, Any] | None,
    safe_mode: bool,
) -> PrecisionChoice:
    """The stored verdict for this model, machine, precision and gate, or a new one (once, locked).

    `given` are rows the user passed as `calibration=` (part of the key); else `rows()` gives
    the input's first rows, read only when no verdict is stored. Raises PrecisionRefused.
    """
    check_precision(precision, engine)
    check_hardware(precision)
    path = choice_path(model, precision, engine, gate, backend, calibration_id(given))
    verdict = _read(path)
    if verdict is None:
        with locked(path):
            verdict = _read(path)
            if verdict is None:
                pool = given if given is not None else rows() if rows is not None else None
                if pool is None:
                    raise InputError(
                        f"Expected calibration= rows for precision={precision!r}: the first use calibrates and runs the "
                        "accuracy gate on them, and there are no input rows yet. Received: calibration=None. Pass a few "
                        f"hundred representative rows (at least {MIN_ROWS}), as for predict."
                    )
                verdict = _measure(model, precision, engine, pool, gate, backend, custom_objects, safe_mode)
                write_atomic(path, json.dumps(verdict, indent=1))
    if verdict.get("refused"):
        raise PrecisionRefused(verdict["message"])
    return PrecisionChoice(**verdict["choice"])


def _read(path: Path) -> dict[str, Any] | None:
    try:
        verdict: dict[str, Any] = json.loads(path.read_text())
        return verdict
    except (OSError, ValueError):
        return None


def _openvino_version() -> str | None:
    from ..engines.openvino_engine import openvino_version

    return openvino_version()


def split_rows(pool: list[np.ndarray[Any, Any]]) -> tuple[list[np.ndarray[Any, Any]], list[np.ndarray[Any, Any]]]:
    """(calibration rows, held-out gate rows): the first min(128, n/4), then up to 1024 (64 MB)."""
    n = int(pool[0].shape[0])
    if n < MIN_ROWS:
        raise InputError(
            f"Expected at least {MIN_ROWS} rows to calibrate and gate a reduced precision (a quarter calibrates, the "
            f"rest is held out for the accuracy gate). Received: {n} rows. Pass more rows as calibration=."
        )
    n_cal = min(CALIBRATION_ROWS, n // 4)
    per_row = sum(int(a[:1].nbytes) for a in pool)
    n_gate = min(GATE_ROWS, n - n_cal, max(MIN_ROWS, _MAX_GATE_BYTES // max(per_row, 1)))
    return [np.asarray(a[:n_cal]) for a in pool], [np.asarray(a[n_cal : n_cal + n_gate]) for a in pool]


def _measure(
    model: ModelFile,
    precision: str,
    engine: str,
    pool: list[np.ndarray[Any, Any]],
    gate: Gate,
    backend: str,
    custom_objects: dict[str, Any] | None,
    safe_mode: bool,
) -> dict[str, Any]:
    signature = model.signature
    if signature.inputs is None or not signature.fixed:
        raise InputError(
            f"Expected fixed per-row input shapes for precision={precision!r} (the export and the gate need them). "
            "Received: undeclared or variable shapes; use precision='fp32'."
        )
    rows_key = signature.row_specs()
    pool = [np.asarray(a, dtype=np.dtype(dtype)) for a, (_, dtype) in zip(pool, rows_key)]
    calibration, held = split_rows(pool)
    onnx = exporting.export(model, custom_objects=custom_objects, safe_mode=safe_mode)
    reference = keras_reference(model, held, backend=backend, custom_objects=custom_objects, safe_mode=safe_mode)
    threads = len(usable_cpus())
    batch = default_batch_size(row_bytes(rows_key), "cpu", "onnx")
    key = (batch, rows_key)
    folder = cache_dir() / "precision"
    folder.mkdir(parents=True, exist_ok=True)
    ov_ok, ov_note = _openvino_usable(onnx)
    want_ort = engine in ("auto", "onnx")
    want_ov = engine in ("auto", "openvino")
    if engine == "openvino" and not ov_ok:
        raise InputError(f"Expected OpenVINO to run this model for engine='openvino'. Received: {ov_note}")

    def base(name: str, path: Path, hint: str = "f32") -> Engine:
        config = EngineConfig(
            name=name,
            model_path=str(model.path),
            input_structure=signature.structure,
            input_names=None,
            custom_objects=None,
            modules=(),
            safe_mode=safe_mode,
            threads=threads,
            onnx_path=str(path),
            onnx_meta=onnx.meta,
            ov_precision=hint,
        )
        return build_engine(config)

    # fp32 engines on the same rows in the same run: what a reduced precision must beat.
    # Only the runtimes `engine=` allows: the fp32 fallback must not switch to one ruled out.
    fp32_engines: dict[str, Engine] = {}
    if want_ort:
        fp32_engines["onnx"] = base("onnx", onnx.path)
    if want_ov and ov_ok:
        fp32_engines["openvino"] = base("openvino", onnx.path)
    plans: list[tuple[str, str, str, str | None]] = []  # (variant, engine, ov hint, int8 file variant)
    if precision == "int8":
        if want_ort:
            plans += [("ort-static", "onnx", "f32", "static"), ("ort-dynamic", "onnx", "f32", "dynamic")]
        if want_ov and ov_ok:
            plans.append(("openvino-int8", "openvino", "f32", "static"))
    elif ov_ok:
        plans.append((f"openvino-{precision}", "openvino", _OV_HINT[precision], None))
    candidates: list[dict[str, Any]] = []
    runners: dict[str, Engine] = {f"{name}-fp32": e for name, e in fp32_engines.items()}
    stem = f"{onnx.path.stem}-{calibration_id(calibration)}"
    for variant, engine_name, hint, int8 in plans:
        entry: dict[str, Any] = {"variant": variant, "engine": engine_name}
        try:
            path = onnx.path
            if int8 is not None:
                from ..engines.quantize import quantize

                path = folder / f"{stem}-{int8}.onnx"
                if not path.is_file():
                    quantize(onnx.path, onnx.meta, int8, calibration, path)
            runner = base(engine_name, path, hint)
            got = _predict(runner, key, held)
            entry.update(gate_numbers(reference, got))
            entry["passed"], entry["reason"] = gate.judge(entry)
            entry.update(file=str(path), ov_precision=hint)
            runners[variant] = runner
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run is refused with its reason
            entry.update(passed=False, reason=f"cannot run: {type(exc).__name__}: {exc}"[:400])
        candidates.append(entry)
    rates = _rates(runners, key, held)
    fp32 = {name: rates[f"{name}-fp32"] for name in fp32_engines}
    for entry in candidates:
        if entry["variant"] in rates:
            entry["rows_per_s"] = round(rates[entry["variant"]], 1)
    best_fp32 = max(fp32.values())
    passed = [c for c in candidates if c["passed"]]
    thresholds = {"max_top1_disagreement": gate.max_top1_disagreement, "atol": gate.atol}
    table = [{k: v for k, v in c.items() if k not in ("file",)} for c in candidates]
    fp32_note = ", ".join(f"{k} fp32 {v:,.0f} rows/s" for k, v in fp32.items())
    if not passed:
        lines = "; ".join(f"{c['variant']}: {_numbers(c)} - {c['reason']}" for c in candidates) or ov_note
        return {
            "refused": True,
            "precision": precision,
            "message": f"Expected {precision} outputs within the accuracy gate ({_thresholds(gate)}) on {len(held[0])} held-out "
            f"rows. Received: {lines}. Refused, never used: keep precision='fp32' ({fp32_note}), or loosen the thresholds "
            "if these differences are acceptable.",
            "candidates": table,
            "thresholds": thresholds,
        }
    best = max(passed, key=lambda c: c["rows_per_s"])
    note = ""
    fastest_fp32 = max(fp32, key=lambda k: fp32[k])
    if best["rows_per_s"] < fp32[fastest_fp32]:
        # Slower than exact answers: the fp32 export runs instead (never less accurate than asked).
        note = (
            f"no {precision} candidate beat fp32 here (best {best['variant']} at "
            f"{best['rows_per_s'] / fp32[fastest_fp32]:.2f}x); the fp32 export runs on {fastest_fp32}"
        )
        exact = gate_numbers(reference, _predict(fp32_engines[fastest_fp32], key, held))
        best = {
            "variant": f"{fastest_fp32}-fp32",
            "engine": fastest_fp32,
            "file": str(onnx.path),
            "ov_precision": "f32",
            "rows_per_s": round(fp32[fastest_fp32], 1),
            **exact,
        }
        warnings.warn(f"kerasfleet: {note}.", RuntimeWarning, stacklevel=4)
    numbers = {k: best[k] for k in ("max_abs", "mean_abs", "top1_agreement", "rows")}
    choice = PrecisionChoice(
        precision=precision,
        variant=best["variant"],
        engine=best["engine"],
        file=best["file"],
        meta=onnx.meta,
        ov_precision=best["ov_precision"],
        rows_per_s=best["rows_per_s"],
        fp32_rows_per_s=round(best_fp32, 1),
        gate=numbers,
        thresholds=thresholds,
        candidates=[*({"variant": f"{k}-fp32", "engine": k, "rows_per_s": round(v, 1)} for k, v in fp32.items()), *table],
        note=note,
    )
    return {"refused": False, "precision": precision, "choice": asdict(choice)}


def _numbers(c: dict[str, Any]) -> str:
    if "max_abs" not in c:
        return "no numbers"
    top1 = f"top-1 agreement {c['top1_agreement']:.2%}, " if c.get("top1_agreement") is not None else ""
    return f"{top1}max abs diff {c['max_abs']:.3g}, mean abs diff {c['mean_abs']:.3g}"


def _thresholds(gate: Gate) -> str:
    text = f"max_top1_disagreement={gate.max_top1_disagreement:g}"
    return text + (f", atol={gate.atol:g}" if gate.atol is not None else "")


def _openvino_usable(onnx: OnnxModel) -> tuple[bool, str]:
    """OpenVINO installed and matching Keras on the export's sample (fp32), else why not."""
    try:
        from ..engines.openvino_engine import check_parity

        check_parity(onnx.path, onnx.meta, onnx.sample, rtol=RTOL, atol=ATOL)
    except (ImportError, FleetError) as exc:
        return False, f"OpenVINO not used: {exc}"
    return True, ""


def gate_numbers(reference: list[np.ndarray[Any, Any]], got: list[np.ndarray[Any, Any]]) -> dict[str, Any]:
    """Max and mean abs difference over every output; top-1 agreement over classifier-shaped ones (the lowest)."""
    max_abs, total, count = 0.0, 0.0, 0
    top1: float | None = None
    non_finite = False
    ungated: list[str] = []
    for i, (ref, out) in enumerate(zip(reference, got)):
        ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
        # A NaN would vanish in max() and pass any atol: a candidate that is not finite where
        # fp32 is fails outright.
        if np.any(np.isfinite(ref64) & ~np.isfinite(out64)):
            non_finite = True
        diff = np.abs(out64 - ref64)
        finite = diff[np.isfinite(diff)]
        if finite.size:
            max_abs = max(max_abs, float(finite.max()))
            total += float(finite.sum())
            count += finite.size
        if ref.ndim == 2 and ref.shape[1] >= 2 and ref.dtype.kind == "f":
            agree = float(np.mean(ref.argmax(axis=1) == out.argmax(axis=1)))
            top1 = agree if top1 is None else min(top1, agree)
        else:
            ungated.append(f"output {i}")
    return {
        "max_abs": max_abs,
        "mean_abs": total / max(count, 1),
        "top1_agreement": top1,
        "rows": int(reference[0].shape[0]),
        "non_finite": non_finite,
        "ungated_outputs": ungated,
    }


def _predict(engine: Engine, key: Any, arrays: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
    rows = int(arrays[0].shape[0])
    outputs = engine.outputs(key).empty(rows)
    engine.predict_rows(key, arrays, outputs, 0, rows)
    return outputs


def _rates(engines: dict[str, Engine], key: Any, arrays: list[np.ndarray[Any, Any]]) -> dict[str, float]:
    """Rows/s of each engine over the held-out rows: the best of 3 rounds, the engines in turn.

    Alternating rounds and keeping each one's best: on a shared machine a neighbour's burst
    only ever slows a run, and no engine pays alone for the machine settling down.
    """
    for engine in engines.values():
        _predict(engine, key, arrays)  # warm every engine at this size first
    rows = int(arrays[0].shape[0])
    best = dict.fromkeys(engines, 0.0)
    for _ in range(3):
        for name, engine in engines.items():
            passes, started = 0, time.perf_counter()
            while True:
                _predict(engine, key, arrays)
                passes += 1
                elapsed = time.perf_counter() - started
                if elapsed >= _TIMED_S / 3:
                    break
            best[name] = max(best[name], rows * passes / elapsed)
    return best


def keras_reference(
    model: ModelFile, arrays: list[np.ndarray[Any, Any]], *, backend: str, custom_objects: dict[str, Any] | None, safe_mode: bool
) -> list[np.ndarray[Any, Any]]:
    """fp32 Keras outputs for `arrays`, from one runtime worker (the compiled Keras engine) on every core.

    The caller never imports Keras; the rows travel in the messages, a few MB at a time.
    """
    signature = model.signature
    assert signature.inputs is not None
    rows_key = signature.row_specs()
    plan = make_plan(1, len(usable_cpus()), devices="cpu")
    batch = default_batch_size(row_bytes(rows_key), "cpu", "keras")
    config = EngineConfig(
        name="keras",
        model_path=str(model.path),
        input_structure=signature.structure,
        input_names=tuple(s.name for s in signature.inputs),
        custom_objects=custom_objects,
        modules=signature.custom_modules,
        safe_mode=safe_mode,
        threads=plan.threads_per_worker,
    )
    init = WorkerInit(HANDLER, config)
    supervisor = Supervisor(
        lambda slot: LocalWorker(slot, init, worker_environment(slot, backend)),
        plan.slots,
        start_timeout=_REFERENCE_TIMEOUT_S,
        max_start_failures=1,
        name="kerasfleet-gate-reference",
    )
    try:
        rows = int(arrays[0].shape[0])
        step = max(1, min(batch, (4 << 20) // max(1, row_bytes(rows_key))))
        parts = []
        for lo in range(0, rows, step):
            chunk = tuple(np.ascontiguousarray(a[lo : lo + step]) for a in arrays)
            n = int(chunk[0].shape[0])
            size = min(step, 1 << max(0, n - 1).bit_length())
            parts.append(
                supervisor.submit(
                    PredictInline((size, rows_key), chunk), timeout=_REFERENCE_TIMEOUT_S, label="fp32 Keras reference"
                ).result()
            )
    finally:
        supervisor.close()
    return [np.concatenate(cols) for cols in zip(*parts)]
