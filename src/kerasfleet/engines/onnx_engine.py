"""ONNX Runtime as an engine: no Keras import, the worker's thread budget, full graph optimisation."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import GraphEngine, Key, Outputs


class OnnxEngine(GraphEngine):
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

    def _run(self, arrays: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        return list(self.session.run(self.output_names, dict(zip(self.input_names, arrays))))
