"""Engines by name, and the picklable recipe a worker builds its engine from.

| name | what runs | built from |
| --- | --- | --- |
| `"keras"` | the model compiled per shape: `jax.jit`, `tf.function` or torch inference mode | the model file (or an in-memory model, in-process) |
| `"onnx"` | ONNX Runtime on the parity-checked export; Keras is never imported | the exported `.onnx` file |
| `"openvino"` | OpenVINO on the same export (checked against Keras once more); Keras is never imported | the exported `.onnx` file |

A reduced precision (`tune/precision.py`) is a file and a hint, not an engine: its int8 file
(QDQ) runs on `"onnx"` or `"openvino"`, bf16/fp16 is OpenVINO's `ov_precision` hint.

Adding an engine is one entry in `ENGINES` and, if it needs an export,
a field in `EngineConfig`; the worker, the runner and the resolver use engines only through
`build_engine` and the `Engine` protocol.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from .base import Engine, Key


@dataclass(frozen=True)
class EngineConfig:
    name: str
    model_path: str
    input_structure: str
    input_names: tuple[str, ...] | None
    custom_objects: dict[str, Any] | None
    modules: tuple[str, ...]
    safe_mode: bool
    threads: int = 1
    onnx_path: str | None = None
    onnx_meta: dict[str, Any] | None = None
    warm_key: Key | None = None
    ov_precision: str = "f32"  # OpenVINO's inference precision hint: "f32", "bf16" or "f16"


def _keras(config: EngineConfig, model: Any) -> Engine:
    from .keras_engine import KerasEngine

    return KerasEngine(
        config.model_path,
        input_structure=config.input_structure,
        input_names=config.input_names,
        custom_objects=config.custom_objects,
        modules=config.modules,
        safe_mode=config.safe_mode,
        model=model,
    )


def _onnx(config: EngineConfig, model: Any) -> Engine:
    from .onnx_engine import OnnxEngine

    if config.onnx_path is None or config.onnx_meta is None:
        raise InputError("Expected an exported ONNX file for engine='onnx'. Received: none (export first).")
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1")
    return OnnxEngine(config.onnx_path, config.onnx_meta, threads=config.threads, gpu=gpu)


def _openvino(config: EngineConfig, model: Any) -> Engine:
    from .openvino_engine import OpenVinoEngine

    if config.onnx_path is None or config.onnx_meta is None:
        raise InputError("Expected an exported ONNX file for engine='openvino'. Received: none (export first).")
    return OpenVinoEngine(config.onnx_path, config.onnx_meta, threads=config.threads, precision=config.ov_precision)


ENGINES: dict[str, Callable[[EngineConfig, Any], Engine]] = {"keras": _keras, "onnx": _onnx, "openvino": _openvino}


def build_engine(config: EngineConfig, model: Any = None) -> Engine:
    """The engine `config` names; `model` (an in-memory keras.Model) spares loading the file."""
    factory = ENGINES.get(config.name)
    if factory is None:
        raise InputError(f"Expected engine to be one of {sorted(ENGINES)}. Received: engine={config.name!r}.")
    return factory(config, model)
