"""`Predictor`: low-latency predictions in the caller's process, no retracing after warm-up.

`model.predict` builds a data adapter per call (127-168 ms for one row on TF, measured in
baselines.md) and a new batch shape retraces. A `Predictor` compiles one function per bucket
(powers of two up to `max_batch_size`), warms every bucket at construction, pads each call up
to its bucket, and records every call's latency, so `stats()` can show that nothing retraced.

| engine | what runs |
| --- | --- |
| `"onnx"` | ONNX Runtime (export checked against Keras and cached); Keras is never imported |
| `"openvino"` | OpenVINO on the same export (checked against Keras once more); Keras is never imported |
| `"keras"` | the compiled Keras path of the fleet's workers, on the caller's backend |
| `"auto"` (default) | for a model file, the resolver's in-process choice: the tuned plan's (ONNX when its export passed parity), or before any plan the parity check itself (Keras with a warning saying why otherwise); for an in-memory model, Keras, which follows further training |

`precision="int8"` (or `"bf16"`, `"fp16"`) with `calibration=` rows: the fastest reduced-precision
candidate that passes the accuracy gate (cached per model and machine), else `PrecisionRefused`.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import numpy as np

from ..engines import Key, Outputs, buckets, build_engine
from ..engines.model_file import resolve_model
from ..engines.registry import EngineConfig
from ..engines.runner import Runner
from ..errors import InputError
from ..runtime import default_backend
from ..tune import check_engine, check_precision, resolve_in_process
from ..tune.precision import MAX_TOP1_DISAGREEMENT
from .calibration import precision_request
from .inputs import normalize_inputs
from .jobs import load_sources

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
        precision: str = "fp32",
        calibration: Any = None,
        max_top1_disagreement: float = MAX_TOP1_DISAGREEMENT,
        atol: float | None = None,
    ) -> None:
        check_engine(engine)
        check_precision(precision, engine)
        if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 1:
            raise InputError(f"Expected max_batch_size to be a positive int. Received: max_batch_size={max_batch_size!r}.")
        in_memory = None if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__") else model
        if in_memory is not None and engine == "auto" and precision == "fp32":
            # An in-memory model may be trained further: the Keras engine reads its live
            # weights at every call, where an ONNX export would be a snapshot.
            engine = "keras"
        # An in-memory model on the Keras engine runs right here: its custom classes need not
        # import in a worker (the ONNX export runs in one, so there they must).
        self._file = resolve_model(model, custom_objects, for_workers=in_memory is None or engine != "keras")
        self.signature = self._file.signature
        specs = self.signature.inputs
        if specs is None or not self.signature.fixed:
            self._file.cleanup()
            raise InputError(
                "Expected a model whose inputs have fixed per-row shapes (buckets are compiled ahead). "
                f"Received: inputs {[s.describe() for s in specs] if specs else 'undeclared (subclassed model)'}."
            )
        self._rows = self.signature.row_specs()
        self.buckets = buckets(max_batch_size)
        try:
            request = precision_request(precision, engine, self.signature, calibration, max_top1_disagreement, atol)
            choice = resolve_in_process(
                self._file,
                engine=engine,
                backend=default_backend(),
                custom_objects=custom_objects,
                safe_mode=safe_mode,
                precision=request,
            )
            self.engine_name, onnx = choice.engine, choice.onnx
            self.precision = choice.precision  # the gate's verdict when precision != "fp32", else None
            config = EngineConfig(
                name=self.engine_name,
                model_path=str(self._file.path),
                input_structure=self.signature.structure,
                input_names=tuple(s.name for s in specs),
                custom_objects=custom_objects,
                modules=self.signature.custom_modules,
                safe_mode=safe_mode,
                threads=threads,
                onnx_path=str(onnx.path) if onnx is not None else None,
                onnx_meta=onnx.meta if onnx is not None else None,
                ov_precision=choice.ov_precision,
            )
            self._runner = Runner(build_engine(config, model=in_memory if self.engine_name == "keras" else None))
            # Compiled engines take exactly their bucket's size; ONNX Runtime takes any size as is.
            self._pad = self.engine_name == "keras"
            for size in self.buckets:  # compile and warm every bucket now, never in a call
                self._run(size, [np.zeros((size, *shape), dtype=np.dtype(dtype)) for shape, dtype in self._rows])
        finally:
            self._file.cleanup()
        self._outputs: Outputs = self._runner.outputs(self._key(self.buckets[0]))
        self._warm_traces = self._runner.traces
        self._latencies: deque[float] = deque(maxlen=_HISTORY)
        self._calls = 0

    def _key(self, size: int) -> Key:
        return (size, self._rows)

    def _run(self, size: int, arrays: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        """One bucket-sized call (rows beyond the input are padding, cut off)."""
        return self._runner.run_padded(self._key(size), arrays, self._pad)

    def predict(self, x: Any) -> Any:
        """Predict `x` (any number of rows); returns what `model.predict(x)` returns."""
        started = time.perf_counter()
        result = self._outputs.pack(self.predict_arrays(self._arrays(x)))
        self._latencies.append(time.perf_counter() - started)
        self._calls += 1
        return result

    @property
    def outputs(self) -> Outputs:
        """The outputs' names, per-row shapes and dtypes, in the order `predict_arrays` returns them."""
        return self._outputs

    def predict_arrays(self, arrays: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        """Checked arrays in the signature's order (any rows) -> one array per output.

        The path of callers that validated already (the server): no conversion, no stats.
        """
        n = arrays[0].shape[0]
        if n == 0:
            return self._outputs.empty(0)
        parts: list[list[np.ndarray[Any, Any]]] = []
        for lo in range(0, n, self.buckets[-1]):
            part = [a[lo : lo + self.buckets[-1]] for a in arrays]
            m = part[0].shape[0]
            size = next(b for b in self.buckets if b >= m)
            parts.append(self._run(size, part))
        return parts[0] if len(parts) == 1 else [np.concatenate(cols) for cols in zip(*parts)]

    def _arrays(self, x: Any) -> list[np.ndarray[Any, Any]]:
        rows = self._rows
        if len(rows) == 1 and isinstance(x, np.ndarray) and x.dtype.str == rows[0][1] and x.shape[1:] == rows[0][0] and len(x):
            return [x]  # the fast path: nothing to convert or check further
        sources = normalize_inputs(x, self.signature)
        return [np.asarray(a, dtype=s.dtype) for a, s in zip(load_sources(sources), sources)]

    def stats(self) -> dict[str, Any]:
        """Calls, retraces since warm-up, and latency percentiles (ms) of the recorded calls."""
        ms = np.asarray(self._latencies, dtype=np.float64) * 1e3
        pct = np.percentile(ms, [50, 90, 99]) if len(ms) else [float("nan")] * 3
        return {
            "engine": self.engine_name,
            "precision": self.precision.describe() if self.precision is not None else "fp32",
            "calls": self._calls,
            "retraces": self._runner.traces - self._warm_traces,
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
