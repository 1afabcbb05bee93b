"""Engines: what turns rows into outputs, in a worker or in the caller's process.

    base.py          Key, Outputs, the Engine protocol, batch-size defaults
    registry.py      engines by name; EngineConfig, the recipe a worker builds one from
    keras_engine.py  the model compiled per shape (jax.jit / tf.function / torch)
    onnx_engine.py   ONNX Runtime
    export.py        the checked ONNX export, cached
    model_file.py    the model as a file, its signature, read without importing Keras
    handler.py       the worker side: the runtime's task handler for predictions
    runner.py        an engine in the caller's process

Imports only `runtime` below it. Nothing here imports a framework at module level.
"""

from .base import Engine, Key, Outputs, OutputSpec, bucket, buckets, default_batch_size, real_dtype, row_bytes
from .registry import ENGINES, EngineConfig, build_engine

__all__ = [
    "ENGINES",
    "Engine",
    "EngineConfig",
    "Key",
    "OutputSpec",
    "Outputs",
    "bucket",
    "buckets",
    "build_engine",
    "default_batch_size",
    "real_dtype",
    "row_bytes",
]
