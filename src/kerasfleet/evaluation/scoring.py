"""Per-row NumPy scores in worker processes: `f(y_true, y_pred) -> one score per row`.

Where the predictions are made by a fleet of local CPU workers of one core each (the CPU
default), the scores are computed by the same workers, right after each chunk's predictions (a
`RowsHook` on the fleet's job): the predictions never leave the worker that made them and no
other process competes for the cores.

    parent                                         prediction workers (the fleet's)
    ------                                         --------------------------------
    window of x -> the job's input buffers
    the pickled functions -> a shared buffer, once a call
    window of y_true -> shared buffers, RowsHook(digest, where the functions are, AfterSpec)
      PredictRows(a, b) x chunks --------------->  y_pred[a:b] = model(x[a:b])
                                                   scores[i, a:b] = fns[i](y_true[a:b], y_pred[a:b])
      <- Done (predictions and scores are in the buffers)

Predictions made elsewhere (in this process, on GPUs, by workers of several threads, or on a
Ray cluster's actors) are scored by a `ScorePool` of score workers, one a core, instead:

    parent                                         score workers (runtime workers)
    ------                                         -------------------------------
    window of y_true, y_pred
      -> shared buffers, Attach(ScoreSpec) ----->  map the buffers
      ScoreRows(a, b) x chunks ------------------>  scores[i, a:b] = fns[i](y_true[a:b], y_pred[a:b])
      <- Done (nothing: scores are in the buffer)

The functions travel pickled with cloudpickle (once per score worker; to a fleet's workers
through shared memory, read and unpickled by each worker once and kept for the next windows
and evaluations): importable ones by reference, ones defined in the caller's script (`__main__`) or
lambdas by value - the workers never run the caller's script. The data travels through shared
memory, never the pipe (a large message to a busy worker would block the supervisor).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..engines import Outputs
from ..engines.handler import RowsHook
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
AFTER_PREDICTIONS = "kerasfleet.evaluation.scoring:scores_after_predictions"
_CHUNKS_PER_WORKER = 4
# Rows per call of a score function tried by each worker (SliceSize).
SLICE_SIZES = (1024, 4096, 16384)
# glibc: keep freed memory in the heap instead of returning it (and faulting it in again) at
# every NumPy temporary over the mmap threshold. Bounded: score workers kept with a warm Fleet
# idle between evaluations, holding at most this much freed memory each; prediction workers
# hold that much only while they have score windows attached (_FreedMemory).
_MMAP_THRESHOLD, _TRIM_THRESHOLD = 32 << 20, 256 << 20
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(_MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(_TRIM_THRESHOLD)}
# After scoring: glibc's own dynamic rule would reach these (the mmap threshold rises to the
# largest freed mapped chunk, up to 32 MiB on 64-bit, the trim threshold to twice that).
_AFTER_TRIM_THRESHOLD = 2 * _MMAP_THRESHOLD
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


class _FreedMemory:
    """_MALLOC_ENV's settings in a process already running (a fleet's prediction worker),
    while it has score windows attached: the CRPS of bench/evaluate.py runs at 0.38 instead of
    0.86-1.4 us a row with them. When the last window closes, the freed memory is returned
    (`malloc_trim`) and the trim threshold lowered to what glibc's dynamic rule would give; the
    mmap threshold stays, since setting it ends glibc's dynamic rule for good and a fixed
    default (128 KiB) would map and fault in every engine buffer over it at every batch (the
    JAX MLP's predictions ran at 0.6x). Not glibc: nothing."""

    def __init__(self) -> None:
        self.windows = 0
        self._libc: Any = None
        try:
            import ctypes

            libc = ctypes.CDLL(None)  # the C library this process already uses
            libc.mallopt, libc.malloc_trim  # noqa: B018 - both there, or neither is used
            self._libc = libc
        except Exception:  # noqa: BLE001 - not glibc (macOS: no mallopt; Windows: no CDLL(None))
            pass

    def hold(self) -> None:
        if self.windows == 0 and self._libc is not None:
            self._libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
            self._libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
        self.windows += 1

    def release(self) -> None:
        self.windows -= 1
        if self.windows == 0 and self._libc is not None:
            self._libc.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM_THRESHOLD)
            self._libc.malloc_trim(0)


_freed_memory = _FreedMemory()


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
        self.scores = OpenBuffer(spec.scores)

    def close(self) -> None:
        for b in [*self.y_true, *self.y_pred, self.scores]:
            b.close()


class _Functions:
    """The score functions, unpickled once in a worker, each with its measured slice size."""

    def __init__(self, blob: bytes) -> None:
        import cloudpickle

        self.fns: list[tuple[str, Callable[..., Any]]] = cloudpickle.loads(blob)
        self.slices = [SliceSize() for _ in self.fns]

    def score(
        self,
        y_true: Callable[[int, int], Any],
        y_pred: Callable[[int, int], Any],
        scores: np.ndarray[Any, Any],
        start: int,
        stop: int,
    ) -> None:
        """scores[i, start:stop] = fns[i](y_true(lo, hi), y_pred(lo, hi)), slice by slice."""
        for i, (name, fn) in enumerate(self.fns):
            lo = start
            while lo < stop:
                size = self.slices[i].next_size()
                hi = min(stop, lo + size)
                began = time.perf_counter()
                values = np.asarray(fn(y_true(lo, hi), y_pred(lo, hi)), dtype=np.float64)
                self.slices[i].record(size, (time.perf_counter() - began) / (hi - lo))
                if values.shape != (hi - lo,):
                    raise ValueError(
                        f"Expected the score function {name!r} to return one number per row: shape ({hi - lo},) for rows "
                        f"{lo}:{hi}. Received: shape {values.shape}. Reduce every axis but the first (e.g. .mean(axis=-1))."
                    )
                scores[i, lo:hi] = values
                lo = hi


def _rows(packing: Packing, buffers: Sequence[OpenBuffer]) -> Callable[[int, int], Any]:
    return lambda lo, hi: packing.pack([buf.array[lo:hi] for buf in buffers])


class ScoreHandler:
    """The score worker side: the functions, unpickled once; score rows of attached windows."""

    def __init__(self, blob: bytes) -> None:
        self.functions = _Functions(blob)
        self.info: dict[str, Any] = {"scores": [name for name, _ in self.functions.fns]}
        self._open: dict[int, _Open] = {}

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
        y_true, y_pred = _rows(opened.spec.true_packing, opened.y_true), _rows(opened.spec.pred_packing, opened.y_pred)
        self.functions.score(y_true, y_pred, opened.scores.array, payload.start, payload.stop)
        return None


@dataclass(frozen=True)
class AfterSpec:
    """One window's buffers for scoring in a fleet's prediction workers (y_pred is the job's)."""

    y_true: tuple[BufferSpec, ...]
    scores: BufferSpec  # (functions, rows) float64
    true_packing: Packing


class _AttachedScores:
    def __init__(self, functions: _Functions, spec: AfterSpec) -> None:
        self.functions = functions
        self.spec = spec
        self.y_true = [OpenBuffer(b) for b in spec.y_true]
        self.scores = OpenBuffer(spec.scores)
        _freed_memory.hold()

    def run(self, outputs: Outputs, arrays: list[np.ndarray[Any, Any]], start: int, stop: int) -> None:
        y_pred = lambda lo, hi: outputs.pack([a[lo:hi] for a in arrays])  # noqa: E731
        self.functions.score(_rows(self.spec.true_packing, self.y_true), y_pred, self.scores.array, start, stop)

    def close(self) -> None:
        for b in [*self.y_true, self.scores]:
            b.close()
        _freed_memory.release()


class ScoresAfter:
    """The prediction worker side: score functions run on each chunk it has just predicted."""

    def __init__(self, blob: bytes) -> None:
        self.functions = _Functions(blob)

    def attach(self, spec: AfterSpec) -> _AttachedScores:
        return _AttachedScores(self.functions, spec)


def scores_after_predictions(config: BufferSpec) -> ScoresAfter:
    """Built once per worker and functions: their pickled bytes are read from shared memory."""
    buffer = OpenBuffer(config)
    try:
        blob = bytes(buffer.array)
    finally:
        buffer.close()
    return ScoresAfter(blob)


class FleetScores:
    """The caller's side of scoring in a fleet's workers: each window's y_true and score
    buffers, and the hook that has the workers fill them. The pickled functions are put in
    shared memory once a call; a hook carries only their digest and where to read them, and a
    worker reads them when the digest is new to it."""

    def __init__(self, fns: list[tuple[str, Callable[..., Any]]], blob: bytes) -> None:
        self.count = len(fns)
        self.key = hashlib.sha256(blob).hexdigest()
        self._buffers = SharedBuffers(keep=8)
        try:
            shared, self._blob, _ = self._buffers.create((len(blob),), np.dtype(np.uint8))
            shared[:] = np.frombuffer(blob, np.uint8)
        except BaseException:
            self._buffers.release()
            raise

    def window(self, y_true: list[np.ndarray[Any, Any]], true_packing: Packing) -> tuple[RowsHook, ScoreWindow]:
        rows = int(y_true[0].shape[0])
        window = ScoreWindow(self._buffers)
        try:
            scores, scores_spec = window.create((self.count, rows), np.dtype(np.float64))
            specs = [window.put(a) for a in y_true]
        except BaseException:
            window.release(finished=False)
            raise
        window.scores = scores
        after = AfterSpec(tuple(specs), scores_spec, true_packing)
        return RowsHook(AFTER_PREDICTIONS, self.key, self._blob, after), window

    def close(self) -> None:
        self._buffers.release()


class ScoreWindow:
    """One window's buffers; its scores are read once every worker is done with it."""

    def __init__(self, buffers: SharedBuffers) -> None:
        self._buffers = buffers
        self._segments: list[Segment] = []
        self.scores: np.ndarray[Any, Any] | None = None

    def create(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> tuple[np.ndarray[Any, Any], BufferSpec]:
        array, spec, segment = self._buffers.create(shape, dtype)
        self._segments.append(segment)
        return array, spec

    def put(self, array: np.ndarray[Any, Any]) -> BufferSpec:
        """A copy of `array` in a new buffer of the window."""
        shared, spec = self.create(array.shape, array.dtype)
        np.copyto(shared, array)
        return spec

    def result(self) -> np.ndarray[Any, Any]:
        """The scores (a copy), once every chunk of the window is done; frees the buffers."""
        assert self.scores is not None
        values = np.array(self.scores)
        self.release(finished=True)
        return values

    def release(self, finished: bool) -> None:
        """Buffers back: reused when every worker is done with them, else unlinked."""
        segments, self._segments, self.scores = self._segments, [], None
        if finished:
            self._buffers.recycle(segments)
        elif segments:
            self._buffers.discard(segments)


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

    def __init__(
        self, fns: list[tuple[str, Callable[..., Any]]], workers: int | None, backend: str, blob: bytes | None = None
    ) -> None:
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
        true_packing: Packing,
        pred_packing: Packing,
    ) -> np.ndarray[Any, Any]:
        """(functions, rows) scores of one window, computed by the workers in chunks."""
        rows = int(y_pred[0].shape[0])
        window = ScoreWindow(self._buffers)
        context: Context | None = None
        futures: list[Future[Any]] = []
        finished = False
        try:
            scores, scores_spec = window.create((len(self.names), rows), np.dtype(np.float64))
            spec = ScoreSpec(
                tuple(window.put(np.ascontiguousarray(a)) for a in y_true),
                tuple(window.put(np.ascontiguousarray(a)) for a in y_pred),
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
            window.release(finished)

    def close(self) -> None:
        self._supervisor.close()
        self._buffers.release()
