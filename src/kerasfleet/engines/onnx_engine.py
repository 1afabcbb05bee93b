"""ONNX Runtime as an engine: no Keras import, the worker's thread budget, full graph optimisation."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Key, Outputs, OutputSpec, real_dtype


class OnnxEngine:
    name = "onnx"
    backend = "onnxruntime"
    # ONNX Runtime plans the graph once per session; a new batch size compiles nothing.
    traces = 0

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

    def run_batch(self, key: Key, arrays: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        return self._run(arrays)

    def _run(self, arrays: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        return list(self.session.run(self.output_names, dict(zip(self.input_names, arrays))))

    def outputs(self, key: Key) -> Outputs:
        if key not in self._outputs:
            batch_size, rows = key
            self._dtypes[key] = [np.dtype(dtype) for _, dtype in rows]
            results = self._run([np.zeros((max(batch_size, 1), *shape), dtype=np.dtype(dtype)) for shape, dtype in rows])
            specs = tuple(OutputSpec(n, r.shape[1:], real_dtype(r.dtype).str) for n, r in zip(self.names, results))
            self._outputs[key] = Outputs(self.structure, specs)
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
