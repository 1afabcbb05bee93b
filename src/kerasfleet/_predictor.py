"""`Predictor`: low-latency predictions in the caller's process, no retracing after warm-up.

`model.predict` builds a data adapter per call (127-168 ms for one row on TF, measured in
baselines.md) and a new batch shape retraces. A `Predictor` compiles one function per bucket
(powers of two up to `max_batch_size`), warms every bucket at construction, pads each call up
to its bucket, and records every call's latency, so `stats()` can show that nothing retraced.

| engine | what runs |
| --- | --- |
| `"onnx"` | ONNX Runtime (export checked against Keras and cached); Keras is never imported |
| `"keras"` | the compiled Keras path of the fleet's workers, on the caller's backend |
| `"auto"` (default) | ONNX when the export passes its parity check, else Keras, with a warning saying why |
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from typing import Any

import numpy as np

from ._engine import Key, Outputs
from ._errors import FleetError, InputError
from ._inputs import normalize_inputs
from ._model_file import ModelFile, resolve_model

# Latencies kept for stats(): enough for stable p99s over long runs, bounded memory (0.8 MB).
_HISTORY = 100_000


class Predictor:
    def __init__(
        self,
        model: Any,
        *,
        engine: str = "auto",
        max_batch_size: int = 1024,
        threads: int = 1,
        custom_objects: dict[str, Any] | None = None,
        safe_mode: bool = True,
    ) -> None:
        if engine not in ("auto", "onnx", "keras"):
            raise InputError(f"Expected engine to be 'auto', 'onnx' or 'keras'. Received: engine={engine!r}.")
        if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 1:
            raise InputError(f"Expected max_batch_size to be a positive int. Received: max_batch_size={max_batch_size!r}.")
        self._file: ModelFile = resolve_model(model, custom_objects)
        self.signature = self._file.signature
        specs = self.signature.inputs
        if specs is None or not self.signature.fixed:
            self._file.cleanup()
            raise InputError(
                "Expected a model whose inputs have fixed per-row shapes (buckets are compiled ahead). "
                f"Received: inputs {[s.describe() for s in specs] if specs else 'undeclared (subclassed model)'}."
            )
        self._rows = self.signature.row_specs()
        self.buckets = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size]
        if self.buckets[-1] != max_batch_size:
            self.buckets.append(max_batch_size)
        try:
            self.engine_name, self._engine = self._make_engine(engine, model, threads, custom_objects, safe_mode)
            for size in self.buckets:  # compile and warm every bucket now, never in a call
                self._run(size, [np.zeros((size, *shape), dtype=np.dtype(dtype)) for shape, dtype in self._rows])
        finally:
            self._file.cleanup()
        self._outputs: Outputs = self._engine.outputs(self._key(self.buckets[0]))
        self._warm_traces = self._engine.python_traces
        self._latencies: deque[float] = deque(maxlen=_HISTORY)
        self._calls = 0

    def _make_engine(self, engine: str, model: Any, threads: int, custom_objects: Any, safe_mode: bool) -> tuple[str, Any]:
        from ._engine import KerasEngine, OnnxEngine

        if engine in ("auto", "onnx"):
            from ._onnx import export

            try:
                onnx = export(self._file, custom_objects=custom_objects, safe_mode=safe_mode)
                return "onnx", OnnxEngine(str(onnx.path), onnx.meta, threads=threads, gpu=False)
            except (FleetError, ImportError) as exc:
                if engine == "onnx":
                    raise
                warnings.warn(f"kerasfleet: the ONNX engine is not used ({exc}); falling back to the Keras engine.", RuntimeWarning, stacklevel=3)
        specs = self.signature.inputs
        assert specs is not None
        in_memory = None if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__") else model
        return "keras", KerasEngine(
            str(self._file.path),
            input_structure=self.signature.structure,
            input_names=[s.name for s in specs],
            custom_objects=custom_objects,
            modules=self.signature.custom_modules,
            safe_mode=safe_mode,
            model=in_memory,
        )

    def _key(self, size: int) -> Key:
        return (size, self._rows)

    def _run(self, size: int, arrays: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        result: list[np.ndarray[Any, Any]] = self._engine.run_batch(self._key(size), arrays)
        return result

    def predict(self, x: Any) -> Any:
        """Predict `x` (any number of rows); returns what `model.predict(x)` returns."""
        started = time.perf_counter()
        arrays = self._arrays(x)
        n = arrays[0].shape[0]
        parts: list[list[np.ndarray[Any, Any]]] = []
        for lo in range(0, n, self.buckets[-1]):
            part = [a[lo : lo + self.buckets[-1]] for a in arrays]
            m = part[0].shape[0]
            size = next(b for b in self.buckets if b >= m)
            if size != m and self.engine_name == "keras":  # ONNX Runtime takes any size as is
                part = [np.concatenate([p, np.zeros((size - m, *p.shape[1:]), p.dtype)]) for p in part]
            parts.append([o[:m] for o in self._run(size, part)])
        flat = parts[0] if len(parts) == 1 else [np.concatenate(cols) for cols in zip(*parts)]
        result = self._outputs.pack(flat)
        self._latencies.append(time.perf_counter() - started)
        self._calls += 1
        return result

    def _arrays(self, x: Any) -> list[np.ndarray[Any, Any]]:
        rows = self._rows
        if len(rows) == 1 and isinstance(x, np.ndarray) and x.dtype.str == rows[0][1] and x.shape[1:] == rows[0][0] and len(x):
            return [x]  # the fast path: nothing to convert or check further
        sources = normalize_inputs(x, self.signature)
        return [np.asarray(s.array if s.array is not None else _load(s), dtype=s.dtype) for s in sources]

    def stats(self) -> dict[str, Any]:
        """Calls, retraces since warm-up, and latency percentiles (ms) of the recorded calls."""
        ms = np.asarray(self._latencies, dtype=np.float64) * 1e3
        pct = np.percentile(ms, [50, 90, 99]) if len(ms) else [float("nan")] * 3
        return {
            "engine": self.engine_name,
            "calls": self._calls,
            "retraces": self._engine.python_traces - self._warm_traces,
            "p50_ms": float(pct[0]),
            "p90_ms": float(pct[1]),
            "p99_ms": float(pct[2]),
            "max_ms": float(ms.max()) if len(ms) else float("nan"),
        }

    def reset_stats(self) -> None:
        self._latencies.clear()
        self._calls = 0

    def __repr__(self) -> str:
        return f"<Predictor engine={self.engine_name} buckets={self.buckets[0]}..{self.buckets[-1]}>"


def _load(source: Any) -> np.ndarray[Any, Any]:
    from ._buffers import OpenBuffer

    return np.array(OpenBuffer(source.file).array)
