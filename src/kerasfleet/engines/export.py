"""The ONNX engine's model: exported once through Keras's own exporter, checked, cached.

    caller                                  export process (spawned, KERAS_BACKEND=tensorflow)
    ──────                                  ──────────────────────────────────────────────────
    sha256(model file) -> cache hit? ──no──► load (safe_mode), call once on a sample batch,
                                            model.export(format="onnx"), run the file in ONNX
                                            Runtime on the same batch, compare every output
    <cache>/<key>.onnx + <key>.json    ◄──── ("ok", meta) | ("refused", numbers) | ("error", ...)
    <cache>/<key>.sample.npz           ◄──── the sample batch and Keras's outputs on it (other
                                            runtimes reading the file are checked against it)
    <cache>/<key>.refused.json         ◄──── (a refusal is remembered: the same key never exports again)

The export runs in its own process so that the caller never imports Keras or TensorFlow, and
always on the TensorFlow backend (the `.keras` format is backend-neutral; tf2onnx is the
exporter Keras itself uses there). A file whose outputs differ from Keras's beyond tolerance
is refused with the numbers, never used. ONNX workers then import only NumPy and ONNX Runtime.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ..cache import cache_dir, locked, model_hash, short_hash, write_atomic
from ..errors import ModelLoadError, RemoteTraceback, WorkerError
from ..runtime import RECORD, LocalWorker, Supervisor, WorkerInit, WorkerSlot
from .model_file import ModelFile, Signature

# ONNX Runtime and XLA/TF kernels sum in different orders: float32 results agree to about 1e-6
# relative; a real conversion error is orders of magnitude larger.
RTOL = 1e-4
ATOL = 1e-5
SAMPLE_ROWS = 64
EXPORT_TIMEOUT_S = 600.0
_FORMAT = 2  # bump when the cached files' layout changes
# Whatever can change the exported graph or the parity check's verdict without changing the
# model file. TensorFlow is installed under either name; a missing one is part of the key too.
_TOOLS = ("keras", "tensorflow", "tensorflow-cpu", "tf2onnx", "onnx", "onnxruntime")


class ExportRefused(ModelLoadError):
    """The exported ONNX model does not reproduce Keras's outputs within tolerance."""


@dataclass(frozen=True)
class OnnxModel:
    path: Path
    meta: dict[str, Any]

    @property
    def sample(self) -> Path:
        """The sample batch (`in_<i>`) and Keras's outputs on it (`out_<i>`), saved by the export."""
        return self.path.with_suffix(".sample.npz")


def export(
    model: ModelFile,
    *,
    custom_objects: dict[str, Any] | None,
    safe_mode: bool,
    out: Path | None = None,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> OnnxModel:
    """The checked ONNX file for `model`, from the cache or exported now (a few seconds).

    Raises ExportRefused, also when an earlier export under the same key was refused: a model
    that does not convert stays refused until something in its key changes.
    """
    key = export_key(model, custom_objects, safe_mode, rtol, atol)
    folder = cache_dir() / "onnx"
    onnx_path, meta_path, refused_path = folder / f"{key}.onnx", folder / f"{key}.json", folder / f"{key}.refused.json"
    meta = _cached(onnx_path, meta_path, refused_path)
    if meta is None:
        # Two processes (or threads) asking for the same export: one runs it, the other waits
        # here and then finds the stored result instead of exporting a second time.
        with locked(folder / key):
            meta = _cached(onnx_path, meta_path, refused_path)
            if meta is None:
                meta = _export_and_store(model, key, custom_objects, safe_mode, rtol, atol)
    if out is not None:
        Path(out).write_bytes(onnx_path.read_bytes())
        return OnnxModel(Path(out), meta)
    return OnnxModel(onnx_path, meta)


def export_key(model: ModelFile, custom_objects: dict[str, Any] | None, safe_mode: bool, rtol: float, atol: float) -> str:
    """The cache key of `model`'s export: the model file and everything else that decides the result.

    The tolerance is in it (a stricter check must run again, not reuse a pass), and so are the
    exporter's and runtime's versions, the source of the custom classes (the file stores only
    their names: an edited layer must be exported again) and safe_mode (it decides what loads).
    """
    custom = tuple(sorted((str(name), _object_source(value)) for name, value in (custom_objects or {}).items()))
    modules = tuple((m, _module_source_hash(m)) for m in model.signature.custom_modules)
    parts = short_hash(tool_versions(), modules, custom, bool(safe_mode), float(rtol), float(atol))
    return f"{model_hash(model.path)}-v{_FORMAT}-r{rtol:g}-a{atol:g}-{parts}"


@functools.lru_cache(maxsize=1)
def tool_versions() -> tuple[tuple[str, str | None], ...]:
    """(distribution, version or None) of the export's tools, read from their metadata.

    Read once per process and without importing them: the caller never imports TensorFlow.
    """
    versions: list[tuple[str, str | None]] = []
    for name in _TOOLS:
        try:
            versions.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            versions.append((name, None))
    return tuple(versions)


def _module_source_hash(module: str) -> str:
    """sha256 of the module's file, found without importing it (its parent packages may be)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    origin = spec.origin if spec is not None else None
    if origin is None or not os.path.isfile(origin):
        return "unavailable"  # the export itself says what is missing
    with open(origin, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:32]


def _object_source(value: Any) -> str:
    try:
        return inspect.getsource(value)
    except (OSError, TypeError):  # defined in a REPL, built by type(), or not a class/function
        target = value if hasattr(value, "__qualname__") else type(value)
        return f"{getattr(target, '__module__', '')}.{target.__qualname__}"


def _cached(onnx_path: Path, meta_path: Path, refused_path: Path) -> dict[str, Any] | None:
    """The stored export's meta, None when there is none; raises the stored refusal."""
    if refused_path.is_file():
        raise ExportRefused(json.loads(refused_path.read_text())["message"])
    if onnx_path.is_file() and meta_path.is_file():
        meta: dict[str, Any] = json.loads(meta_path.read_text())
        return meta
    return None


def _export_and_store(
    model: ModelFile, key: str, custom_objects: dict[str, Any] | None, safe_mode: bool, rtol: float, atol: float
) -> dict[str, Any]:
    folder = cache_dir() / "onnx"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{key}.{os.getpid()}.tmp.onnx"
    result = _run_export(ExportTask(str(model.path), str(tmp), custom_objects, model.signature, safe_mode, rtol, atol))
    if result[0] in ("refused", "error"):
        tmp.with_suffix(".sample.npz").unlink(missing_ok=True)
    if result[0] == "refused":
        tmp.unlink(missing_ok=True)
        # Remembered: the parity check is deterministic for a key, so running it again would
        # only repeat the same verdict after the same slow export.
        write_atomic(folder / f"{key}.refused.json", json.dumps({"message": result[1]}, indent=1))
        raise ExportRefused(result[1])
    if result[0] == "error":
        # Not remembered: a crash, a timeout or a missing package may not happen next time.
        tmp.unlink(missing_ok=True)
        error = ModelLoadError(f"The ONNX export failed: {result[1]}")
        error.__cause__ = RemoteTraceback(result[2])
        raise error
    meta: dict[str, Any] = result[1]
    # The .onnx and its sample first, then its meta: a reader that finds the meta finds both.
    os.replace(tmp.with_suffix(".sample.npz"), folder / f"{key}.sample.npz")
    os.replace(tmp, folder / f"{key}.onnx")
    write_atomic(folder / f"{key}.json", json.dumps(meta, indent=1))
    return meta


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
    # Kept with the file: an engine that reads it (OpenVINO) is checked on the same batch.
    saved: dict[str, Any] = {f"in_{i}": a for i, a in enumerate(arrays)}
    saved.update({f"out_{i}": np.asarray(r) for i, r in enumerate(refs)})
    np.savez(str(Path(out).with_suffix(".sample.npz")), **saved)
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
