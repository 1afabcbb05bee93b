"""The ONNX engine's model: exported once through Keras's own exporter, checked, cached.

    caller                                  export process (spawned, KERAS_BACKEND=tensorflow)
    ──────                                  ──────────────────────────────────────────────────
    sha256(model file) -> cache hit? ──no──► load (safe_mode), call once on a sample batch,
                                            model.export(format="onnx"), run the file in ONNX
                                            Runtime on the same batch, compare every output
    <cache>/<hash>.onnx + <hash>.json  ◄──── ("ok", meta) | ("refused", numbers) | ("error", ...)

The export runs in its own process so that the caller never imports Keras or TensorFlow, and
always on the TensorFlow backend (the `.keras` format is backend-neutral; tf2onnx is the
exporter Keras itself uses there). A file whose outputs differ from Keras's beyond tolerance
is refused with the numbers, never used. ONNX workers then import only NumPy and ONNX Runtime.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cache import cache_dir, model_hash
from ..errors import ModelLoadError, RemoteTraceback, WorkerError
from ..runtime import RECORD, LocalWorker, Supervisor, WorkerInit, WorkerSlot
from .model_file import ModelFile, Signature

# ONNX Runtime and XLA/TF kernels sum in different orders: float32 results agree to about 1e-6
# relative; a real conversion error is orders of magnitude larger.
RTOL = 1e-4
ATOL = 1e-5
SAMPLE_ROWS = 64
EXPORT_TIMEOUT_S = 600.0
_FORMAT = 1  # bump when the cached files' layout changes


class ExportRefused(ModelLoadError):
    """The exported ONNX model does not reproduce Keras's outputs within tolerance."""


@dataclass(frozen=True)
class OnnxModel:
    path: Path
    meta: dict[str, Any]


def export(
    model: ModelFile,
    *,
    custom_objects: dict[str, Any] | None,
    safe_mode: bool,
    out: Path | None = None,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> OnnxModel:
    """The checked ONNX file for `model`, from the cache or exported now (a few seconds)."""

    # The tolerance is part of the key: a stricter check must run again, not reuse a pass.
    key = f"{model_hash(model.path)}-v{_FORMAT}-r{rtol:g}-a{atol:g}"
    folder = cache_dir() / "onnx"
    onnx_path, meta_path = folder / f"{key}.onnx", folder / f"{key}.json"
    if not (onnx_path.is_file() and meta_path.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{key}.{os.getpid()}.tmp.onnx"
        result = _run_export(ExportTask(str(model.path), str(tmp), custom_objects, model.signature, safe_mode, rtol, atol))
        if result[0] == "refused":
            tmp.unlink(missing_ok=True)
            raise ExportRefused(result[1])
        if result[0] == "error":
            tmp.unlink(missing_ok=True)
            error = ModelLoadError(f"The ONNX export failed: {result[1]}")
            error.__cause__ = RemoteTraceback(result[2])
            raise error
        os.replace(tmp, onnx_path)  # atomic: a concurrent reader sees the whole file or none
        meta_path.write_text(json.dumps(result[1], indent=1))
    meta = json.loads(meta_path.read_text())
    if out is not None:
        Path(out).write_bytes(onnx_path.read_bytes())
        return OnnxModel(Path(out), meta)
    return OnnxModel(onnx_path, meta)


@dataclass(frozen=True)
class ExportTask:
    model_path: str
    out: str
    custom_objects: dict[str, Any] | None
    signature: Signature
    safe_mode: bool
    rtol: float
    atol: float


class ExportHandler:
    """The export worker's handler (runtime task handler): one ExportTask per call."""

    info: dict[str, Any] = {}

    def __init__(self, config: Any = None) -> None:
        import warnings

        warnings.filterwarnings("ignore")  # tf2onnx's deprecation noise is not the user's concern

    def attach(self, context_id: int, payload: Any) -> None:
        pass

    def detach(self, context_id: int) -> None:
        pass

    def run(self, task: ExportTask) -> tuple[Any, ...]:
        return _export_in_process(
            task.model_path, task.out, task.custom_objects, task.signature, task.safe_mode, task.rtol, task.atol
        )


def export_handler(config: Any) -> ExportHandler:
    return ExportHandler(config)


def _run_export(task: ExportTask) -> tuple[Any, ...]:
    """Run the export in a fresh worker of the runtime on the TensorFlow backend, CPU only."""
    env = {"KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    init = WorkerInit("kerasfleet.engines.export:export_handler", None)
    supervisor = Supervisor(
        lambda slot: LocalWorker(slot, init, env),
        (WorkerSlot(0, (), 1, None),),
        start_timeout=EXPORT_TIMEOUT_S,
        max_start_failures=1,
        name="kerasfleet-export",
    )
    try:
        result: tuple[Any, ...] = supervisor.submit(
            task, retry=RECORD, timeout=EXPORT_TIMEOUT_S, label="exporting the model to ONNX"
        ).result()
        return result
    except WorkerError as exc:
        cause = exc.__cause__
        return ("error", str(exc), cause.tb if isinstance(cause, RemoteTraceback) else "")
    finally:
        supervisor.close()


def _export_in_process(
    model_path: str, out: str, custom_objects: Any, signature: Any, safe_mode: bool, rtol: float, atol: float
) -> tuple[Any, ...]:
    import importlib

    import keras
    import numpy as np
    import onnxruntime as ort

    for module in signature.custom_modules:
        importlib.import_module(module)
    model = keras.saving.load_model(model_path, custom_objects=custom_objects, safe_mode=safe_mode, compile=False)
    if signature.inputs is None:
        return (
            "error",
            "Expected a model with declared inputs (Functional or Sequential) for ONNX export. Received: a subclassed model.",
            "",
        )
    rng = np.random.default_rng(0)
    sample = {}
    for spec in signature.inputs:
        shape = (SAMPLE_ROWS, *[d or 8 for d in spec.shape])
        if np.dtype(spec.dtype).kind in "iub":
            sample[spec.name] = rng.integers(0, 2, shape).astype(spec.dtype)
        else:
            sample[spec.name] = rng.normal(size=shape).astype(spec.dtype)
    arrays = [sample[s.name] for s in signature.inputs]
    packed: Any = dict(sample) if signature.structure == "dict" else arrays if signature.structure == "list" else arrays[0]
    expected = model.predict(packed, verbose=0)  # also "calls the model once", which export needs
    model.export(out, format="onnx", verbose=False)

    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    onnx_inputs = [i.name for i in session.get_inputs()]
    by_name = {s.name: s.name for s in signature.inputs}
    if set(onnx_inputs) == set(by_name):
        feed_names = [s.name for s in signature.inputs]
    elif len(onnx_inputs) == len(arrays):
        feed_names = onnx_inputs
    else:
        return ("error", f"Expected {len(arrays)} ONNX inputs. Received: {onnx_inputs}.", "")
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, dict(zip(feed_names, arrays)))))

    if isinstance(expected, dict):
        structure, names, refs = "dict", list(expected), list(expected.values())
    elif isinstance(expected, (list, tuple)):
        names = list(getattr(model, "output_names", None) or [f"output_{i}" for i in range(len(expected))])
        structure, refs = "list", list(expected)
    else:
        structure, names, refs = "single", ["output_0"], [expected]
    onnx_outputs = [n if n in got else None for n in names]
    if None in onnx_outputs:
        if len(got) != len(refs):
            return ("error", f"Expected {len(refs)} ONNX outputs. Received: {list(got)}.", "")
        onnx_outputs = list(got)  # unnamed ("Identity:0"): the exporter keeps Keras's order
    worst = {"output": None, "max_abs": 0.0, "max_rel": 0.0}
    for name, onnx_name, ref in zip(names, onnx_outputs, refs):
        out_arr = got[str(onnx_name)]
        if out_arr.shape != ref.shape:
            return ("refused", f"The ONNX model's output {name!r} has shape {out_arr.shape}; Keras gives {ref.shape}. Refused.")
        diff = np.abs(out_arr.astype("float64") - ref.astype("float64"))
        max_abs = float(diff.max())
        max_rel = float((diff / np.maximum(np.abs(ref), 1e-12)).max())
        if max_abs > float(worst["max_abs"] or 0.0):
            worst = {"output": name, "max_abs": max_abs, "max_rel": max_rel}
        if not np.allclose(out_arr, ref, rtol=rtol, atol=atol):
            return (
                "refused",
                f"Expected the ONNX model to match Keras within rtol={rtol}, atol={atol} on a {SAMPLE_ROWS}-row sample. "
                f"Received: output {name!r} differs by max abs {max_abs:.3g}, max relative {max_rel:.3g}. "
                "The export is refused; use engine='keras'.",
            )
    meta = {
        "inputs": feed_names,
        "outputs": onnx_outputs,
        "structure": structure,
        "output_names": names,
        "parity": worst,
        "keras": keras.__version__,
        "onnxruntime": ort.__version__,
    }
    return ("ok", meta)
