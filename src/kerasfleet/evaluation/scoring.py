"""Per-row NumPy scores in worker processes: `f(y_true, y_pred) -> one score per row`.

    parent                                         score workers (runtime workers)
    ------                                         -------------------------------
    window of y_true, y_pred (and sample weights)
      -> shared buffers, Attach(ScoreSpec) ----->  map the buffers
      ScoreRows(a, b) x chunks ------------------>  scores[i, a:b] = fns[i](y_true[a:b], y_pred[a:b])
      <- Done (nothing: scores are in the buffer)

The functions travel once, at worker start, pickled with cloudpickle: importable ones by
reference, ones defined in the caller's script (`__main__`) or lambdas by value - the workers
never run the caller's script. The data travels through shared memory, never the pipe (a large
message to a busy worker would block the supervisor).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..runtime import (
    REQUEUE,
    BufferSpec,
    Context,
    LocalWorker,
    OpenBuffer,
    SharedBuffers,
    Supervisor,
    WorkerInit,
    make_plan,
    worker_environment,
)
from ..runtime.buffers import Segment

HANDLER = "kerasfleet.evaluation.scoring:score_handler"
_CHUNKS_PER_WORKER = 4
# Rows per call of a score function tried by each worker (SliceSize).
SLICE_SIZES = (1024, 4096, 16384)
# glibc: keep freed memory in the heap instead of returning it (and faulting it in again) at
# every NumPy temporary over the mmap threshold. Bounded: score workers kept with a warm Fleet
# idle between evaluations, holding at most this much freed memory each.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


@dataclass(frozen=True)
class Packing:
    """How y_true / y_pred are handed to a score function: one array, a list, or a dict."""

    structure: str  # "single", "list" or "dict"
    names: tuple[str, ...]

    def pack(self, arrays: Sequence[np.ndarray[Any, Any]]) -> Any:
        if self.structure == "dict":
            return dict(zip(self.names, arrays))
        return list(arrays) if self.structure == "list" else arrays[0]


@dataclass(frozen=True)
class ScoreSpec:
    y_true: tuple[BufferSpec, ...]
    y_pred: tuple[BufferSpec, ...]
    weight: BufferSpec | None
    scores: BufferSpec  # (functions, rows) float64
    true_packing: Packing
    pred_packing: Packing


@dataclass(frozen=True)
class ScoreRows:
    context_id: int
    start: int
    stop: int


class _Open:
    def __init__(self, spec: ScoreSpec) -> None:
        self.spec = spec
        self.y_true = [OpenBuffer(b) for b in spec.y_true]
        self.y_pred = [OpenBuffer(b) for b in spec.y_pred]
        self.weight = OpenBuffer(spec.weight) if spec.weight is not None else None
        self.scores = OpenBuffer(spec.scores)

    def close(self) -> None:
        for b in [*self.y_true, *self.y_pred, self.scores, *([self.weight] if self.weight else [])]:
            b.close()


class ScoreHandler:
    """The worker side: the functions, unpickled once; score rows of attached windows."""

    def __init__(self, blob: bytes) -> None:
        import cloudpickle

        self.fns: list[tuple[str, Callable[..., Any]]] = cloudpickle.loads(blob)
        self.info: dict[str, Any] = {"scores": [name for name, _ in self.fns]}
        self._open: dict[int, _Open] = {}
        self.slices = [SliceSize() for _ in self.fns]

    def attach(self, context_id: int, payload: Any) -> None:
        self._open[context_id] = _Open(payload)

    def detach(self, context_id: int) -> None:
        opened = self._open.pop(context_id, None)
        if opened is not None:
            opened.close()

    def run(self, payload: Any) -> Any:
        if not isinstance(payload, ScoreRows):
            raise TypeError(f"Expected ScoreRows. Received: {type(payload).__name__}.")
        opened = self._open[payload.context_id]
        for i, (name, fn) in enumerate(self.fns):
            lo = payload.start
            while lo < payload.stop:
                size = self.slices[i].next_size()
                hi = min(payload.stop, lo + size)
                y_true = opened.spec.true_packing.pack([buf.array[lo:hi] for buf in opened.y_true])
                y_pred = opened.spec.pred_packing.pack([buf.array[lo:hi] for buf in opened.y_pred])
                started = time.perf_counter()
                scores = np.asarray(fn(y_true, y_pred), dtype=np.float64)
                self.slices[i].record(size, (time.perf_counter() - started) / (hi - lo))
                if scores.shape != (hi - lo,):
                    raise ValueError(
                        f"Expected the score function {name!r} to return one number per row: shape ({hi - lo},) for rows "
                        f"{lo}:{hi}. Received: shape {scores.shape}. Reduce every axis but the first (e.g. .mean(axis=-1))."
                    )
                opened.scores.array[i, lo:hi] = scores
                lo = hi
        return None


class SliceSize:
    """Rows per call of one score function, measured: the fastest a row of SLICE_SIZES.

    A vectorised NumPy score makes temporaries of (rows x its own work) elements; on large
    slices they leave the caches and, past glibc's mmap threshold, are fresh pages every call
    (bench/evaluate.py's CRPS: 0.36 us a row at 4,096 rows, 0.89 at 65,536). Small slices pay
    Python's per-call cost instead, which for some functions (a SciPy fit a call, say)
    dominates. Each worker runs every size twice on real rows (the scores are kept) and uses
    the fastest a row from then on. A size larger than what is left of a chunk is timed as
    what it gives there (the rest of the chunk), which is what choosing it would give.
    """

    def __init__(self) -> None:
        self.timings: dict[int, list[float]] = {size: [] for size in SLICE_SIZES}
        self.chosen: int | None = None

    def next_size(self) -> int:
        if self.chosen is not None:
            return self.chosen
        for size, per_row in self.timings.items():
            if len(per_row) < 2:
                return size
        self.chosen = min(self.timings, key=lambda size: min(self.timings[size]))
        return self.chosen

    def record(self, size: int, seconds_per_row: float) -> None:
        if self.chosen is None:
            self.timings[size].append(seconds_per_row)


def score_handler(blob: bytes) -> ScoreHandler:
    return ScoreHandler(blob)


class ScorePool:
    """Score workers, one per core (or `workers`), kept for every window of one evaluation."""

    def __init__(self, fns: list[tuple[str, Callable[..., Any]]], workers: int | None, backend: str, blob: bytes | None = None) -> None:
        import cloudpickle

        self.names = [name for name, _ in fns]
        blob = blob if blob is not None else cloudpickle.dumps(fns)
        self.in_use = threading.Lock()  # one evaluation at a time uses a pool kept with a Fleet
        plan = make_plan(workers, None, devices="cpu")
        self.workers = plan.workers
        init = WorkerInit(HANDLER, blob)
        self._supervisor = Supervisor(
            lambda slot: LocalWorker(slot, init, {**worker_environment(slot, backend), **_MALLOC_ENV}),
            plan.slots,
            name="kerasfleet-scores",
        )
        self._buffers = SharedBuffers(keep=8)

    def score(
        self,
        y_true: list[np.ndarray[Any, Any]],
        y_pred: list[np.ndarray[Any, Any]],
        weight: np.ndarray[Any, Any] | None,
        true_packing: Packing,
        pred_packing: Packing,
    ) -> np.ndarray[Any, Any]:
        """(functions, rows) scores of one window, computed by the workers in chunks."""
        rows = int(y_pred[0].shape[0])
        segments: list[Segment] = []

        def put(array: np.ndarray[Any, Any]) -> BufferSpec:
            shared, spec, segment = self._buffers.create(array.shape, array.dtype)
            segments.append(segment)
            np.copyto(shared, array)
            return spec

        context: Context | None = None
        futures: list[Future[Any]] = []
        finished = False
        try:
            scores, scores_spec, segment = self._buffers.create((len(self.names), rows), np.float64)
            segments.append(segment)
            spec = ScoreSpec(
                tuple(put(np.ascontiguousarray(a)) for a in y_true),
                tuple(put(np.ascontiguousarray(a)) for a in y_pred),
                put(np.ascontiguousarray(weight)) if weight is not None else None,
                scores_spec,
                true_packing,
                pred_packing,
            )
            context = Context(spec, label="scores")
            per = max(1, -(-rows // (self.workers * _CHUNKS_PER_WORKER)))
            for lo in range(0, rows, per):
                hi = min(rows, lo + per)
                futures.append(
                    self._supervisor.submit(
                        ScoreRows(context.id, lo, hi), context=context, retry=REQUEUE, label=f"scoring rows {lo}:{hi}"
                    )
                )
            wait(futures)
            for f in futures:
                f.result()  # the first error, with the worker's traceback as its cause
            finished = True
            return np.array(scores)
        finally:
            for f in futures:
                f.cancel()
            if context is not None:
                self._supervisor.close_context(context)
            if finished:
                self._buffers.recycle(segments)
            else:
                self._buffers.discard(segments)

    def close(self) -> None:
        self._supervisor.close()
        self._buffers.release()
