"""The compiled Keras inference path a worker runs (imported only inside workers).

`model.predict` builds a data adapter and a dataset on every call; here the model is compiled
once per (batch size, row shapes) into a backend-native function - `jax.jit` over
`stateless_call` on JAX, `tf.function` on TensorFlow, inference mode on torch - and every batch
is padded to that fixed size, so a chunk of any length never causes a retrace.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._errors import InputError

Key = tuple[int, tuple[tuple[tuple[int, ...], str], ...]]  # (batch size, ((row shape, dtype), ...))


@dataclass(frozen=True)
class OutputSpec:
    name: str
    shape: tuple[int, ...]  # per row
    dtype: str


@dataclass(frozen=True)
class Outputs:
    """How `model.predict` shapes the outputs: one array, a list, or a dict keyed by name."""

    structure: str  # "single", "list" or "dict"
    specs: tuple[OutputSpec, ...]

    def pack(self, arrays: Sequence[Any]) -> Any:
        """One array per output -> what `model.predict` returns: an array, a list or a dict."""
        if self.structure == "dict":
            return {o.name: a for o, a in zip(self.specs, arrays)}
        return list(arrays) if self.structure == "list" else arrays[0]


class KerasEngine:
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
        if model is None:
            model = keras.saving.load_model(model_path, custom_objects=custom_objects, safe_mode=safe_mode, compile=False)
        self.model = model
        # Python bodies of compiled functions run only while tracing: counting them counts traces.
        self.python_traces = 0
        self.input_structure = input_structure
        self.input_names = list(input_names) if input_names is not None else None
        self._compiled: dict[Key, tuple[Callable[[list[np.ndarray[Any, Any]]], list[np.ndarray[Any, Any]]], list[np.ndarray[Any, Any]]]] = {}
        self.traces = 0
        self._outputs: dict[Key, Outputs] = {}

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
            tv = [v.value for v in model.trainable_variables]
            ntv = [v.value for v in model.non_trainable_variables]
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
                with torch.inference_mode():
                    return model(x, training=False)

            return torch_call
        return lambda x: model(x, training=False)

    def compiled(self, key: Key) -> tuple[Callable[[list[np.ndarray[Any, Any]]], list[np.ndarray[Any, Any]]], list[np.ndarray[Any, Any]]]:
        """The function for `key` and its staging buffers; built and warmed on first use."""
        if key not in self._compiled:
            batch_size, rows = key
            fn = self._build(batch_size)
            staging = [np.zeros((batch_size, *shape), dtype=np.dtype(dtype)) for shape, dtype in rows]
            convert = self.keras.ops.convert_to_numpy

            def run(arrays: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
                return [np.asarray(convert(o)) for o in self._flatten(fn(self._pack(arrays)))[2]]

            # Trace and compile now, not inside the first chunk; learn the outputs on the way.
            structure, names, flat = self._flatten(fn(self._pack(staging)))
            arrays = [np.asarray(convert(o)) for o in flat]
            if any(a.ndim == 0 or a.shape[0] != batch_size for a in arrays):
                raise InputError(
                    f"Expected every model output to keep the batch axis ({batch_size} rows in). "
                    f"Received: output shapes {[a.shape for a in arrays]}."
                )
            self._outputs[key] = Outputs(structure, tuple(OutputSpec(n, a.shape[1:], a.dtype.str) for n, a in zip(names, arrays)))
            self.traces += 1
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
                dst[lo:hi] = res[:n]


class OnnxEngine:
    """ONNX Runtime in a worker: no Keras import, the worker's thread budget, full graph optimisation."""

    backend = "onnxruntime"

    def __init__(self, onnx_path: str, meta: dict[str, Any], *, threads: int, gpu: bool) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if gpu and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(onnx_path, options, providers=providers)
        self.input_names: list[str] = list(meta["inputs"])
        self.output_names: list[str] = list(meta["outputs"])
        self.structure: str = meta["structure"]
        self.names: list[str] = list(meta["output_names"])
        self._outputs: dict[Key, Outputs] = {}
        self._dtypes: dict[Key, list[np.dtype[Any]]] = {}
        self.traces = 0
        self.python_traces = 0  # ONNX Runtime never traces

    def run_batch(self, key: Key, arrays: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        return self._run(arrays)

    def _run(self, arrays: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        return list(self.session.run(self.output_names, dict(zip(self.input_names, arrays))))

    def outputs(self, key: Key) -> Outputs:
        if key not in self._outputs:
            batch_size, rows = key
            self._dtypes[key] = [np.dtype(dtype) for _, dtype in rows]
            results = self._run([np.zeros((batch_size, *shape), dtype=np.dtype(dtype)) for shape, dtype in rows])
            self._outputs[key] = Outputs(self.structure, tuple(OutputSpec(n, r.shape[1:], r.dtype.str) for n, r in zip(self.names, results)))
        return self._outputs[key]

    def predict_rows(
        self,
        key: Key,
        inputs: list[np.ndarray[Any, Any]],
        outputs: list[np.ndarray[Any, Any]],
        start: int,
        stop: int,
    ) -> None:
        self.outputs(key)
        dtypes = self._dtypes[key]
        batch = key[0]
        for lo in range(start, stop, batch):
            hi = min(lo + batch, stop)
            # ONNX Runtime takes any batch size: the last batch runs unpadded.
            arrays = [np.ascontiguousarray(src[lo:hi], dtype=dtype) for src, dtype in zip(inputs, dtypes)]
            for dst, res in zip(outputs, self._run(arrays)):
                dst[lo:hi] = res
