"""The compiled Keras inference path a worker runs (imported only inside workers).

`model.predict` builds a data adapter and a dataset on every call; here the model is compiled
once per (batch size, row shapes) into a backend-native function - `jax.jit` over
`stateless_call` on JAX, `tf.function` on TensorFlow, inference mode on torch - and every batch
is padded to that fixed size, so a chunk of any length never causes a retrace.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from .base import Key, Outputs, OutputSpec, real_dtype


class KerasEngine:
    name = "keras"

    def __init__(
        self,
        model_path: str,
        *,
        input_structure: str,
        input_names: Sequence[str] | None,
        custom_objects: dict[str, Any] | None,
        modules: Sequence[str],
        safe_mode: bool,
        model: Any = None,
    ) -> None:
        import keras

        for module in modules:
            # Registered serialisables register themselves on import.
            importlib.import_module(module)
        self.keras = keras
        self.backend = keras.backend.backend()
        # A model handed in lives on in the caller's hands (it may be trained further).
        self.live_weights = model is not None
        if model is None:
            model = keras.saving.load_model(model_path, custom_objects=custom_objects, safe_mode=safe_mode, compile=False)
        self.model = model
        # Python bodies of compiled functions run only while tracing: counting them counts traces
        # (JAX, TF). Torch runs eagerly: there a new input shape is the event that costs a
        # first-call setup, so the torch forward counts the shapes it has not seen.
        self.python_traces = 0
        self._torch_shapes: set[tuple[tuple[int, ...], ...]] = set()
        self.input_structure = input_structure
        self.input_names = list(input_names) if input_names is not None else None
        self._compiled: dict[
            Key, tuple[Callable[[list[np.ndarray[Any, Any]]], list[np.ndarray[Any, Any]]], list[np.ndarray[Any, Any]]]
        ] = {}
        self._outputs: dict[Key, Outputs] = {}

    @property
    def traces(self) -> int:
        return self.python_traces

    # -- building --------------------------------------------------------------------------
    def _pack(self, arrays: list[Any]) -> Any:
        if self.input_structure == "dict":
            assert self.input_names is not None
            return dict(zip(self.input_names, arrays))
        if self.input_structure == "list" or len(arrays) > 1:
            return list(arrays)
        return arrays[0]

    def _flatten(self, out: Any) -> tuple[str, list[str], list[Any]]:
        if isinstance(out, dict):
            keys = list(out)
            return "dict", keys, [out[k] for k in keys]
        if isinstance(out, (list, tuple)):
            names = list(getattr(self.model, "output_names", None) or [])
            if len(names) != len(out):
                names = [f"output_{i}" for i in range(len(out))]
            return "list", names, list(out)
        return "single", ["output_0"], [out]

    def _build(self, batch_size: int) -> Callable[[Any], Any]:
        model = self.model
        if self.backend == "jax":
            import jax

            def forward(tv: Any, ntv: Any, x: Any) -> Any:
                self.python_traces += 1
                y, _ = model.stateless_call(tv, ntv, x, training=False)
                return y

            jitted = jax.jit(forward)
            trainable, non_trainable = model.trainable_variables, model.non_trainable_variables
            if self.live_weights:
                # An in-memory model may be trained further after the engine was built: read its
                # weights at every call (as Keras's own predict does), not once.
                return lambda x: jitted([v.value for v in trainable], [v.value for v in non_trainable], x)
            # A model loaded from its file here belongs to this engine alone: its weights never
            # change, and reading them once saves about 60 us per call (measured, bench/engines.py).
            tv, ntv = [v.value for v in trainable], [v.value for v in non_trainable]
            return lambda x: jitted(tv, ntv, x)
        if self.backend == "tensorflow":
            import tensorflow as tf

            def tf_forward(x: Any) -> Any:
                self.python_traces += 1
                return model(x, training=False)

            traced: Callable[[Any], Any] = tf.function(tf_forward, jit_compile=False, reduce_retracing=False)
            return traced
        if self.backend == "torch":
            import torch

            def torch_call(x: Any) -> Any:
                arrays = x.values() if isinstance(x, dict) else x if isinstance(x, list) else [x]
                shapes = tuple(tuple(a.shape) for a in arrays)
                if shapes not in self._torch_shapes:
                    self._torch_shapes.add(shapes)
                    self.python_traces += 1
                with torch.inference_mode():
                    return model(x, training=False)

            return torch_call
        return lambda x: model(x, training=False)

    def compiled(
        self, key: Key
    ) -> tuple[Callable[[list[np.ndarray[Any, Any]]], list[np.ndarray[Any, Any]]], list[np.ndarray[Any, Any]]]:
        """The function for `key` and its staging buffers; built and warmed on first use."""
        if key not in self._compiled:
            batch_size, rows = key
            fn = self._build(batch_size)
            staging = [np.zeros((batch_size, *shape), dtype=np.dtype(dtype)) for shape, dtype in rows]
            convert = self.keras.ops.convert_to_numpy

            def to_numpy(o: Any) -> np.ndarray[Any, Any]:
                a = np.asarray(convert(o))
                return a if a.dtype.kind in "biuf" else a.astype(real_dtype(a.dtype))  # bfloat16 -> float32

            def run(arrays: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
                return [to_numpy(o) for o in self._flatten(fn(self._pack(arrays)))[2]]

            # Trace and compile now, not inside the first chunk; learn the outputs on the way.
            structure, names, flat = self._flatten(fn(self._pack(staging)))
            arrays = [to_numpy(o) for o in flat]
            if any(a.ndim == 0 or a.shape[0] != batch_size for a in arrays):
                raise InputError(
                    f"Expected every model output to keep the batch axis ({batch_size} rows in). "
                    f"Received: output shapes {[a.shape for a in arrays]}."
                )
            self._outputs[key] = Outputs(
                structure, tuple(OutputSpec(n, a.shape[1:], real_dtype(a.dtype).str) for n, a in zip(names, arrays))
            )
            self._compiled[key] = (run, staging)
        return self._compiled[key]

    def outputs(self, key: Key) -> Outputs:
        self.compiled(key)
        return self._outputs[key]

    def run_batch(self, key: Key, arrays: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        """One compiled call on arrays of exactly key's batch size."""
        return self.compiled(key)[0](arrays)

    # -- running ---------------------------------------------------------------------------
    def predict_rows(
        self,
        key: Key,
        inputs: list[np.ndarray[Any, Any]],
        outputs: list[np.ndarray[Any, Any]],
        start: int,
        stop: int,
    ) -> None:
        """Predict rows [start, stop) of `inputs` into the same rows of `outputs`."""
        run, staging = self.compiled(key)
        batch = key[0]
        for lo in range(start, stop, batch):
            hi = min(lo + batch, stop)
            n = hi - lo
            arrays = []
            for buf, src in zip(staging, inputs):
                rows = src[lo:hi]
                if n == batch and rows.dtype == buf.dtype and rows.flags.c_contiguous:
                    arrays.append(rows)  # a full batch goes straight from shared memory
                else:
                    # Converts dtype, or pads the last partial batch (the tail rows keep stale
                    # values, harmless as they are cut off below).
                    buf[:n] = rows
                    arrays.append(buf)
            results = run(arrays)
            for dst, res in zip(outputs, results):
                # bfloat16 (an ml_dtypes type) lands in the float32 buffer as real floats
                dst[lo:hi] = res[:n] if res.dtype == dst.dtype else res[:n].astype(dst.dtype)
