"""What every engine shares: the key of a compiled shape, the outputs' layout, the protocol.

An engine turns rows into outputs in one process. It is prepared per `Key` - (batch size,
((per-row shape, dtype), ...)) - which is where compiled engines trace and compile, and it
writes results by row index into arrays it is given, so workers fill shared buffers in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

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

    def empty(self, rows: int) -> list[np.ndarray[Any, Any]]:
        return [np.empty((rows, *o.shape), np.dtype(o.dtype)) for o in self.specs]


class Engine(Protocol):
    """The interface every engine implements (a registry entry in `registry.py`)."""

    name: str
    backend: str

    def outputs(self, key: Key) -> Outputs:
        """Prepare `key` (trace, compile, warm up) if new; what the model returns for it."""

    def run_batch(self, key: Key, arrays: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        """One call on arrays of exactly key's batch size (Keras) or any size (ONNX)."""

    def predict_rows(
        self, key: Key, inputs: list[np.ndarray[Any, Any]], outputs: list[np.ndarray[Any, Any]], start: int, stop: int
    ) -> None:
        """Predict rows [start, stop) of `inputs` into the same rows of `outputs`."""

    @property
    def traces(self) -> int:
        """Times the engine traced or compiled for a new input shape since it was built."""


class GraphEngine:
    """What ONNX Runtime and OpenVINO share: a graph over the ONNX export, run batch by batch.

    A subclass sets `structure`, `names` and the two caches, and implements `_run`. Both take
    any batch size, so the last batch runs unpadded.
    """

    structure: str
    names: list[str]
    _outputs: dict[Key, Outputs]
    _dtypes: dict[Key, list[np.dtype[Any]]]

    def _run(self, arrays: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        raise NotImplementedError

    def run_batch(self, key: Key, arrays: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        return self._run(arrays)

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
            arrays = [np.ascontiguousarray(src[lo:hi], dtype=dtype) for src, dtype in zip(inputs, dtypes)]
            for dst, res in zip(outputs, self._run(arrays)):
                dst[lo:hi] = res


def real_dtype(dtype: Any) -> np.dtype[Any]:
    """The NumPy dtype outputs are returned in: bfloat16 (not a NumPy type) becomes float32."""
    dtype = np.dtype(dtype)
    return dtype if dtype.kind in "biuf" else np.dtype("float32")


def default_batch_size(row_bytes: int, device: str = "cpu", engine: str = "keras") -> int:
    """A batch of about 4 MB of input on CPU (16 MB on GPU), a power of two in [16, 1024 or 4096].

    ONNX Runtime on CPU runs as fast at 16 rows as at 1024 and loses cache locality beyond
    (measured on the small CNN: 11.6k rows/s per thread at 16-64 rows, 9.5k at 1024), so its
    target is 512 KB; OpenVINO runs the same file and gets the same target.
    """
    target, cap = (16 << 20, 4096) if device == "gpu" else (4 << 20, 1024)
    if engine in ("onnx", "openvino") and device == "cpu":
        target = 512 << 10
    rows = max(16, min(cap, target // max(row_bytes, 1)))
    return 1 << (rows.bit_length() - 1)


def bucket(rows: int, batch_size: int) -> int:
    """The batch size a call of `rows` rows runs at: the smallest power of two that holds it,
    at most `batch_size` - a one-row call on a warm fleet must not pay for a 1024-row batch."""
    if rows >= batch_size:
        return batch_size
    return min(batch_size, 1 << max(0, rows - 1).bit_length())


def buckets(max_batch_size: int) -> list[int]:
    """Every batch size `bucket` can give up to `max_batch_size`: 1, 2, 4, ... and itself."""
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size]
    return sizes if sizes[-1] == max_batch_size else [*sizes, max_batch_size]


def row_bytes(rows: tuple[tuple[tuple[int, ...], str], ...]) -> int:
    return sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for shape, dtype in rows)
