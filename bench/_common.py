"""Shared by the benchmarks: the machine's facts, its fp32 GEMM ceiling, FLOPs per row.

Also the joblib peer's task: it lives in an importable module so that loky pickles it by
reference and its per-worker model cache survives between tasks (a function defined in the
script's `__main__` is pickled by value, with a fresh copy of its globals in every task, so a
"cache" there would load the model for every task).
"""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata
from typing import Any

import numpy as np


def cores() -> int:
    return len(os.sched_getaffinity(0))


def cpu_facts() -> tuple[str, bool]:
    """CPU model name and whether it has AVX-512 (from /proc/cpuinfo)."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model or platform.machine(), "avx512f" in flags


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def machine_facts() -> str:
    """One line of facts for the top of a benchmark's output (import keras first for its backend)."""
    import keras

    model, avx512 = cpu_facts()
    packages = ("numpy", "keras", "jax", "tensorflow", "tensorflow-cpu", "torch", "onnxruntime", "kerasfleet")
    versions = ", ".join(f"{p} {_version(p)}" for p in packages if _version(p) != "-")
    return (
        f"# {model}, {cores()} usable cores (of {os.cpu_count()}), AVX-512 {'yes' if avx512 else 'no'}, "
        f"{platform.machine()}, python {platform.python_version()}\n# {versions}; keras backend {keras.backend.backend()}"
    )


def matmul_rate(threads: int, m: int, k: int, n: int, seconds: float = 2.0) -> float:
    """fp32 GFLOP/s of ONNX Runtime MatMul (m x k) @ (k x n) on `threads` threads."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "gemm",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [k, n]),
        ],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every ONNX Runtime since 1.10 reads (a newer onnx writes a newer IR)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.random((m, k), dtype=np.float32), "b": rng.random((k, n), dtype=np.float32)}
    session.run(None, feeds)
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, feeds)
        runs += 1
    return 2 * m * k * n * runs / (time.perf_counter() - started) / 1e9


def gemm_peak(threads: int, n: int = 2048, seconds: float = 2.0) -> float:
    """fp32 GEMM throughput in GFLOP/s: ONNX Runtime MatMul n x n on `threads` threads."""
    return matmul_rate(threads, n, n, n, seconds)


# Square GEMMs and the cache-sized shapes of 256-wide Dense layers at bulk batch sizes: the
# 2048^2 MatMul alone is not the machine's best GEMM (the MLP's layers beat it).
CEILING_SHAPES = ((2048, 2048, 2048), (1024, 1024, 1024), (512, 512, 512), (4096, 256, 256), (1024, 256, 256))


def gemm_ceiling(threads: int, seconds: float = 1.0) -> tuple[float, tuple[int, int, int]]:
    """The best fp32 GFLOP/s over CEILING_SHAPES on `threads` threads, and the shape that gave it."""
    rates = {shape: matmul_rate(threads, *shape, seconds=seconds) for shape in CEILING_SHAPES}
    shape = max(rates, key=lambda s: rates[s])
    return rates[shape], shape


def flops_per_row(model: Any) -> int:
    """Multiply-adds x 2 of the Dense and convolution layers for one row (the rest is ignored).

    Dense: 2 * in * out (times the positions, for inputs of rank > 2); Conv2D:
    2 * k_h * k_w * c_in/groups * c_out * out_h * out_w; DepthwiseConv2D likewise with one input
    channel per filter. Nested models are walked.
    """
    import keras

    total = 0
    for layer in model.layers:
        if hasattr(layer, "layers"):
            total += flops_per_row(layer)
            continue
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            continue
        weights = int(np.prod(kernel.shape))
        out_shape = tuple(layer.output.shape[1:])
        if isinstance(layer, keras.layers.Dense):
            total += 2 * weights * int(np.prod(out_shape[:-1], dtype=np.int64))
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            spatial = out_shape[1:] if layer.data_format == "channels_first" else out_shape[:-1]
            total += 2 * weights * int(np.prod(spatial, dtype=np.int64))
    return total


# -- the joblib peer's task ---------------------------------------------------------------------
_cached: dict[str, Any] = {}


def joblib_task(path: str, chunk: np.ndarray, batch_size: int) -> np.ndarray:
    """Loads the model once per worker process (cached), then predicts the chunk."""
    import keras

    if path not in _cached:
        _cached[path] = keras.saving.load_model(path)
    return _cached[path].predict(chunk, verbose=0, batch_size=batch_size)


def crps_quadrature(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """The seed's NumPy scoring case: a CRPS of a logistic forecast centred on the prediction,
    by trapezoidal quadrature over 64 points (about 5 us of NumPy a row); one score per row
    (importable: workers load it)."""
    grid = np.linspace(-6.0, 6.0, 64)
    y = np.asarray(y_true, np.float64).reshape(len(y_true), -1)[:, :1]
    mu = np.asarray(y_pred, np.float64).reshape(len(y_pred), -1)[:, :1]
    cdf = 1.0 / (1.0 + np.exp(-(grid[None, :] - mu) * 2.0))
    return np.trapezoid((cdf - (grid[None, :] >= y)) ** 2, grid, axis=1)


def body_layers(name: str) -> list[Any]:
    """The bench MLP's or small CNN's layers up to (not including) the output layer."""
    import keras

    if name == "mlp":
        return [keras.Input((32,)), keras.layers.Dense(256, activation="relu"), keras.layers.Dense(256, activation="relu")]
    return [
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
    ]
