"""OpenVINO as an engine: it reads the parity-checked ONNX export and compiles it for the CPU.

The same file ONNX Runtime runs, so no second exporter; the same parity rule (rtol 1e-4,
atol 1e-5 against Keras's outputs on the export's sample batch) before it is used, checked
once per export and OpenVINO version and remembered next to the export:

    <cache>/onnx/<key>.openvino-<version>.json   {"ok": true, numbers} or {"ok": false, message}

`precision` is OpenVINO's inference precision hint: "f32" (exact, the default), "bf16"
(AVX512_BF16 / AMX), "f16". A QDQ (int8) file runs its quantized layers in int8 whatever
the hint. Keras is never imported.
"""

from __future__ import annotations

import json
import sys
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import write_atomic
from ..errors import ModelLoadError
from .base import GraphEngine, Key, Outputs

_IMPORT_LOCK = threading.Lock()


def import_openvino() -> Any:
    """`import openvino`, without the usage report its import sends.

    Importing `openvino` imports its model converter, which reports the import to Google
    Analytics through `openvino_telemetry` unless the user opted out in ~/intel: from a
    background thread it forks a process (in a caller that may run JAX or TensorFlow threads,
    which fork can deadlock) that posts for up to 3 s. kerasfleet imports OpenVINO on the
    user's behalf (the `auto` trial, workers), so it is imported with `openvino_telemetry`
    unavailable: the converter falls back to its own no-op stub, for the rest of the process.
    A process that imported OpenVINO before kerasfleet did keeps what it chose. (While this
    import runs, another thread's `import openvino_telemetry` fails: a short window, once.)
    """
    with _IMPORT_LOCK:
        if "openvino" in sys.modules:
            import openvino

            return openvino
        saved = {name: sys.modules[name] for name in list(sys.modules) if name.split(".")[0] == "openvino_telemetry"}
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # `import` raises ImportError
        try:
            import openvino

            return openvino
        finally:
            sys.modules.pop("openvino_telemetry", None)
            sys.modules.update(saved)


class EngineRefused(ModelLoadError):
    """An engine's results on the checked export differ from Keras's beyond tolerance."""


class OpenVinoEngine(GraphEngine):
    name = "openvino"
    backend = "openvino"
    # One compiled model with a dynamic batch dimension: a new batch size traces nothing.
    traces = 0

    def __init__(self, onnx_path: str, meta: dict[str, Any], *, threads: int, precision: str = "f32") -> None:
        ov = import_openvino()
        core = ov.Core()
        config = {
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": precision,
            # One stream, one request at a time: the worker (or the caller) runs batches in
            # turn; throughput mode would split its few threads into streams.
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            # The worker is already pinned to its cores; OpenVINO must not re-pin its threads.
            "ENABLE_CPU_PINNING": False,
        }
        self.compiled = core.compile_model(core.read_model(onnx_path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.input_names: list[str] = list(meta["inputs"])
        self.structure: str = meta["structure"]
        self.names: list[str] = list(meta["output_names"])
        ports = list(self.compiled.inputs)
        self._inputs = [_port(ports, name, i) for i, name in enumerate(self.input_names)]
        outs = list(self.compiled.outputs)
        self._outputs_ports = [_port(outs, name, i) for i, name in enumerate(meta["outputs"])]
        self._outputs: dict[Key, Outputs] = {}
        self._dtypes: dict[Key, list[np.dtype[Any]]] = {}

    def _run(self, arrays: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        results = self.request.infer({port: np.ascontiguousarray(a) for port, a in zip(self._inputs, arrays)})
        # The request's output tensors are reused by the next call: copy them out.
        return [np.array(results[port]) for port in self._outputs_ports]


def _port(ports: list[Any], name: str, index: int) -> Any:
    """The compiled model's port named `name` (ONNX names survive the conversion), else by position."""
    for port in ports:
        if name in port.get_names():
            return port
    return ports[index]


def openvino_version() -> str | None:
    try:
        return metadata.version("openvino")
    except metadata.PackageNotFoundError:
        return None


def check_parity(onnx_path: Path, meta: dict[str, Any], sample: Path, *, rtol: float, atol: float) -> dict[str, Any]:
    """OpenVINO (fp32) against Keras's outputs on the export's sample batch; remembered per version.

    Returns the numbers ({"max_abs", "max_rel", "output"}); raises EngineRefused with them
    beyond tolerance, or when OpenVINO cannot read or compile the file.
    """
    version = openvino_version()
    if version is None:
        raise ImportError(
            "Expected the openvino package for engine='openvino'. Received: not installed; pip install 'kerasfleet[openvino]'."
        )
    verdict_path = onnx_path.with_name(f"{onnx_path.stem}.openvino-{version}-r{rtol:g}-a{atol:g}.json")
    try:
        verdict: dict[str, Any] = json.loads(verdict_path.read_text())
    except (OSError, ValueError):
        verdict = _check(onnx_path, meta, sample, rtol, atol)
        write_atomic(verdict_path, json.dumps(verdict, indent=1))
    if not verdict["ok"]:
        raise EngineRefused(verdict["message"])
    numbers: dict[str, Any] = verdict["numbers"]
    return numbers


def _check(onnx_path: Path, meta: dict[str, Any], sample: Path, rtol: float, atol: float) -> dict[str, Any]:
    with np.load(sample) as data:
        inputs = [data[f"in_{i}"] for i in range(len(meta["inputs"]))]
        expected = [data[f"out_{i}"] for i in range(len(meta["output_names"]))]
    try:
        engine = OpenVinoEngine(str(onnx_path), meta, threads=1)
        got = engine._run(inputs)
    except Exception as exc:  # noqa: BLE001 - any conversion or compile error is a refusal, said once
        return {"ok": False, "message": f"OpenVINO cannot run this model's ONNX export: {type(exc).__name__}: {exc}".strip()}
    worst = {"output": None, "max_abs": 0.0, "max_rel": 0.0}
    for name, out, ref in zip(meta["output_names"], got, expected):
        if out.shape != ref.shape:
            return {
                "ok": False,
                "message": f"OpenVINO's output {name!r} has shape {out.shape}; Keras gives {ref.shape}. Refused.",
            }
        diff = np.abs(out.astype("float64") - ref.astype("float64"))
        max_abs = float(diff.max()) if diff.size else 0.0
        max_rel = float((diff / np.maximum(np.abs(ref), 1e-12)).max()) if diff.size else 0.0
        if max_abs >= float(worst["max_abs"] or 0.0):
            worst = {"output": name, "max_abs": max_abs, "max_rel": max_rel}
        if not np.allclose(out, ref, rtol=rtol, atol=atol):
            return {
                "ok": False,
                "message": f"Expected OpenVINO to match Keras within rtol={rtol}, atol={atol} on the export's sample batch. "
                f"Received: output {name!r} differs by max abs {max_abs:.3g}, max relative {max_rel:.3g}. "
                "Refused; use engine='onnx' or 'keras'.",
            }
    return {"ok": True, "numbers": worst}
