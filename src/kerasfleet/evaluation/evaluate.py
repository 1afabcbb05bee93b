"""`kerasfleet.evaluate`: what `model.evaluate(x, y, return_dict=True)` returns, over the fleet.

    x, y, sample_weight (arrays, dicts, lists, .npy paths: read a window at a time)
      │ windows of rows
      ▼
    Fleet.imap_after ─ predictions in the workers, in order, one window ahead ──► y_pred (one window)
      │   and, in the same workers right after each chunk's predictions, the       │
      │   NumPy score functions f(y_true, y_pred) -> one score per row             │
      │                                                                            │
      │  this process: the model's compiled loss and metrics, and any Keras        │
      │  metrics given, updated window by window (exact: sums, counts,             │
      ▼  confusion matrices - what model.evaluate accumulates batch by batch)      ▼

A one-shot call on few rows (by the tuned plan's rule, the one `predict` follows) predicts in
this process instead: the in-process engine in a thread, one window ahead; its scores, like
those of predictions made on GPUs, by workers of several threads or on a Ray cluster, run in a
ScorePool of score worker processes (`_scores_in_fleet`).
Only one window of predictions is held at a time (two while the next is predicted), so inputs
on disk larger than memory are evaluated in bounded memory. Per-row scores are kept (one float
per row and function) and averaged (weighted by `sample_weight` when given).

The loss is exact whatever the windows: Keras averages each batch's loss weighted by its size,
which is the mean over every row; metrics accumulate sums and counts. One Keras quirk: on
TensorFlow, `model.evaluate` averages a multi-output model's per-output losses (`<name>_loss`)
over its batches unweighted (the batch size is unknown inside its graph), so its last, partial
batch counts as much as a full one; kerasfleet reports the mean over rows (what Keras gives on
JAX, and on TensorFlow when the rows are a multiple of the batch size). The total loss and
the metrics are not affected. Values agree with
`model.evaluate` within float rounding (rtol 1e-5) when the engine computes the predictions as
Keras does (`engine="keras"`, or ONNX, whose export is checked to rtol 1e-4, atol 1e-5).
"""

from __future__ import annotations

import functools
import math
import os
from collections import deque
from collections.abc import Callable, Generator, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..cluster import check_cluster
from ..engines.handler import RowsHook
from ..engines.model_file import resolve_model
from ..errors import InputError
from ..prediction import Fleet
from ..prediction.api import in_process_for
from ..prediction.fleet import check_fleet_options, fleet_options
from ..prediction.progress import progress_bar
from .scoring import FleetScores, Packing, ScorePool, ScoreWindow

# Rows per window: about this many bytes of inputs and predictions at a time.
_WINDOW_BYTES = 64 << 20
_MIN_WINDOW_ROWS = 1024


def evaluate(
    model: Any,
    x: Any,
    y: Any = None,
    *,
    batch_size: int | None = None,
    sample_weight: Any = None,
    metrics: Any = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    engine: str = "auto",
    backend: str | None = None,
    custom_objects: dict[str, Any] | None = None,
    safe_mode: bool = True,
    return_scores: bool = False,
    progress: bool | None = None,
    cluster: Any = None,
) -> Any:
    """Evaluate `model` on (x, y) with every core; returns `model.evaluate(..., return_dict=True)`'s dict.

    | argument | meaning |
    | --- | --- |
    | `model` | a `.keras`/`.h5` path, an in-memory `keras.Model`, or a warm `kerasfleet.Fleet` (kept open: repeated evaluations pay no start); its compiled loss and metrics are computed |
    | `x`, `y`, `sample_weight` | what `predict` takes (arrays, lists or dicts of arrays, memmaps, `.npy` paths); `y` as `model.evaluate` takes it |
    | `metrics` | more metrics: Keras metric names or objects (this process, exact), and plain functions `f(y_true, y_pred) -> one score per row` (NumPy, run in worker processes); a dict {output name: [...]} for a multi-output model's Keras metrics |
    | `return_scores` | also return {function name: the per-row scores} |
    | `workers`, `threads_per_worker`, `batch_size`, `engine`, `backend`, `custom_objects`, `safe_mode` | as for `predict` |
    | `cluster` | as for `predict`: the predictions run on a Ray cluster's actors; the loss, metrics and score functions stay here |

    A score function's result is averaged over rows (weighted by `sample_weight` when given)
    and reported under its name (`fn.__name__`; lambdas as `score_0`, `score_1`, ...).
    """
    check_cluster(cluster)
    keras_extra, score_fns = _split_metrics(metrics)
    given_fleet = model if isinstance(model, Fleet) else None
    keras_model = _keras_model(given_fleet.model_path if given_fleet is not None else model, custom_objects, safe_mode)
    compiled = bool(getattr(keras_model, "compiled", False)) and getattr(keras_model, "loss", None) is not None
    if not compiled and not keras_extra and not score_fns:
        raise InputError(
            "Expected a model compiled with a loss (model.compile(loss=...) before saving), or metrics=[...] to compute. "
            "Received: an uncompiled model and no metrics."
        )
    if y is None:
        raise InputError("Expected y, the true values to evaluate against. Received: y=None.")
    xs, ys, ws = _Rows(x, "x"), _Rows(y, "y"), _Rows(sample_weight, "sample_weight") if sample_weight is not None else None
    rows = xs.rows
    if rows == 0:
        raise InputError("Expected at least one row to evaluate. Received: x with 0 rows.")
    for other in [ys, ws]:
        if other is not None and other.rows != rows:
            raise InputError(f"Expected {other.what} to have as many rows as x ({rows}). Received: {other.rows} rows.")
    options = fleet_options(
        engine=engine,
        workers=workers,
        threads_per_worker=threads_per_worker,
        devices="auto",
        batch_size=batch_size,
        backend=backend,
        custom_objects=custom_objects,
        safe_mode=safe_mode,
    )
    model_file, local, fleet = None, None, given_fleet
    if given_fleet is None and cluster is None:
        check_fleet_options(options)
        model_file = resolve_model(model, custom_objects)
    pool: ScorePool | None = None
    in_fleet: FleetScores | None = None
    owned = True
    try:
        if model_file is not None:
            # As predict does: when starting workers costs more than they save for this many
            # rows, the plan's in-process engine predicts here (scores still run in workers).
            local = in_process_for(model_file, options, rows, rows * xs.row_bytes())
        if local is None and fleet is None:
            fleet = Fleet(model_file if model_file is not None else model, cluster=cluster, **options)
        windows: deque[ScoreWindow] = deque()  # scores filled by the fleet's workers, oldest first
        if score_fns:
            blob = _pickled(score_fns)
            if fleet is not None and _scores_in_fleet(fleet):
                in_fleet = FleetScores(score_fns, blob)  # the predicting workers score their own rows
            else:
                pool, owned = _score_pool(score_fns, blob, workers if cluster is None else None, given_fleet, options["backend"])
        bounds = _windows(rows, _window_rows(xs, ys, rows))
        tracker = _Tracker(keras_model if compiled else None, keras_extra)
        scores: list[np.ndarray[Any, Any]] = []
        bar = progress_bar(rows, progress)

        def items() -> Iterator[tuple[Any, RowsHook | None]]:
            for lo, hi in bounds:
                hook = None
                if in_fleet is not None:
                    y_true = ys.window(lo, hi)
                    hook, window = in_fleet.window(_flat(y_true), _packing(y_true))
                    windows.append(window)
                yield xs.window(lo, hi), hook

        predictions: Generator[Any, None, None]
        if local is not None:
            predictions = _one_ahead(functools.partial(local.predict, progress=False), (x for x, _ in items()))
        else:
            assert fleet is not None
            predictions = fleet.imap_after(items(), batch_size=batch_size, max_inflight=2)  # type: ignore[assignment]
        try:
            for (lo, hi), y_pred in zip(bounds, predictions):
                y_true = ys.window(lo, hi)
                weight = ws.window(lo, hi) if ws is not None else None
                tracker.update(y_true, y_pred, weight)
                if in_fleet is not None:
                    scores.append(windows.popleft().result())
                elif pool is not None:
                    scores.append(pool.score(_flat(y_true), _flat(y_pred), _packing(y_true), _packing(y_pred)))
                if bar is not None:
                    bar.update(hi - lo)
        finally:
            # Also on an early exit: a fleet's in-flight windows, or the thread predicting the next one, end here.
            predictions.close()
            if bar is not None:
                bar.close()
        results = tracker.result()
        per_row: dict[str, np.ndarray[Any, Any]] = {}
        if score_fns:
            table = np.concatenate(scores, axis=1) if scores else np.zeros((len(score_fns), 0))
            weights = ws.all() if ws is not None else None
            for (name, _), values in zip(score_fns, table):
                per_row[name] = values
                results[name] = float(np.average(values, weights=weights)) if len(values) else math.nan
    finally:
        if in_fleet is not None:
            for window in windows:
                window.release(finished=False)  # a failed or abandoned call: a worker may still write
            in_fleet.close()
        if pool is not None:
            if owned:
                pool.close()
            else:
                pool.in_use.release()
        if fleet is not None and given_fleet is None:
            fleet.close()  # a fleet passed in stays warm for the caller's next call
        if model_file is not None:
            model_file.cleanup()
    return (results, per_row) if return_scores else results


class _Tracker:
    """The compiled loss and metrics, and the extra Keras metrics, updated window by window."""

    def __init__(self, model: Any, extra: Any) -> None:
        self.model = model
        self.extra = extra
        if model is not None:
            import keras

            model.reset_metrics()
            self.loss = keras.metrics.Mean(name="loss")
        for m in self._extra_metrics():
            m.reset_state()

    def _extra_metrics(self) -> list[Any]:
        if isinstance(self.extra, dict):
            return [m for ms in self.extra.values() for m in ms]
        return list(self.extra)

    def update(self, y_true: Any, y_pred: Any, weight: Any) -> None:
        if self.model is not None:
            loss = self.model.compute_loss(x=None, y=y_true, y_pred=y_pred, sample_weight=weight, training=False)
            self.loss.update_state(loss, sample_weight=_rows_of(y_pred))
            self.model.compute_metrics(None, y_true, y_pred, sample_weight=weight)
        if isinstance(self.extra, dict):
            for name, ms in self.extra.items():
                for m in ms:
                    m.update_state(y_true[name], y_pred[name], sample_weight=weight)
        else:
            for m in self.extra:
                m.update_state(y_true, y_pred, sample_weight=weight)

    def result(self) -> dict[str, Any]:
        results: dict[str, Any] = {}
        if self.model is not None:
            results.update(self.model.get_metrics_result())
            results["loss"] = self.loss.result()
        if isinstance(self.extra, dict):
            for name, ms in self.extra.items():
                results.update({f"{name}_{m.name}": m.result() for m in ms})
        else:
            results.update({m.name: m.result() for m in self.extra})
        return {k: float(np.asarray(v)) for k, v in results.items()}


def _split_metrics(metrics: Any) -> tuple[Any, list[tuple[str, Callable[..., Any]]]]:
    """metrics= -> (Keras metric objects, list or per-output dict) and [(name, NumPy score function)]."""
    if metrics is None:
        return [], []
    if isinstance(metrics, Mapping):
        keras_part = {}
        for name, items in metrics.items():
            ms, plain = _split_metrics(items)
            if plain:
                raise InputError(
                    f"Expected only Keras metrics in the per-output dict (output {name!r}); score functions take the "
                    "whole y_true and y_pred. Received: a plain function. Pass it in a list: metrics=[fn]."
                )
            keras_part[name] = ms
        return keras_part, []
    if not isinstance(metrics, (list, tuple)):
        metrics = [metrics]
    keras_metrics: list[Any] = []
    fns: list[tuple[str, Callable[..., Any]]] = []
    for item in metrics:
        if isinstance(item, str) or _is_keras_metric(item):
            keras_metrics.append(_keras_metric(item))
        elif callable(item):
            name = getattr(item, "__name__", "") or ""
            if not name.isidentifier() or any(n == name for n, _ in fns):
                name = f"score_{len(fns)}"
            fns.append((name, item))
        else:
            raise InputError(
                "Expected metrics as Keras metric names or objects, or functions f(y_true, y_pred) -> one score per row. "
                f"Received: {item!r}."
            )
    return keras_metrics, fns


def _is_keras_metric(item: Any) -> bool:
    return any(c.__module__.startswith("keras") and c.__name__ == "Metric" for c in type(item).__mro__)


def _keras_metric(item: Any) -> Any:
    import keras

    if not isinstance(item, str):
        return item
    try:
        found = keras.metrics.get(item)
    except ValueError as exc:
        raise InputError(f"Expected a Keras metric name (like 'auc', 'mae'). Received: {item!r} ({exc}).") from None
    if isinstance(found, type):
        return found(name=item)  # reported under the name given, as compile() does
    if isinstance(found, keras.metrics.Metric):
        return type(found)(name=item)
    return keras.metrics.MeanMetricWrapper(found, name=item)


def _keras_model(model: Any, custom_objects: dict[str, Any] | None, safe_mode: bool) -> Any:
    if not isinstance(model, (str, os.PathLike)):
        return model
    import keras

    return keras.saving.load_model(model, custom_objects=custom_objects, safe_mode=safe_mode)


class _Rows:
    """x, y or sample_weight: arrays (or memmapped .npy files), a list or a dict of them."""

    def __init__(self, value: Any, what: str) -> None:
        self.what = what
        self.value = self._open(value)
        leaves = _leaves(self.value)
        if not leaves:
            raise InputError(f"Expected {what} as an array, a list or dict of arrays, or a .npy path. Received: {value!r}.")
        counts = {int(a.shape[0]) if a.ndim else -1 for a in leaves}
        if len(counts) != 1 or -1 in counts:
            raise InputError(f"Expected every array of {what} to have the same number of rows. Received: {sorted(counts)}.")
        self.rows = counts.pop()

    def _open(self, value: Any) -> Any:
        if isinstance(value, (str, os.PathLike)):
            path = Path(value).expanduser()
            if path.suffix.lower() != ".npy" or not path.is_file():
                raise InputError(f"Expected {self.what} as an existing .npy file (or arrays). Received: {str(value)!r}.")
            return np.load(path, mmap_mode="r")  # windows are read from disk as needed
        if isinstance(value, Mapping):
            return {k: self._open(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._open(v) for v in value]
        if hasattr(value, "shape") and not isinstance(value, np.ndarray):
            return np.asarray(value)  # a framework tensor
        if isinstance(value, np.ndarray):
            return value
        raise InputError(
            f"Expected {self.what} as an array, a list or dict of arrays, or a .npy path. Received: {type(value).__name__}."
        )

    def window(self, lo: int, hi: int) -> Any:
        return _map(self.value, lambda a: np.asarray(a[lo:hi]))

    def all(self) -> np.ndarray[Any, Any]:
        leaves = _leaves(self.value)
        return np.asarray(leaves[0]).reshape(self.rows, -1)[:, 0] if leaves[0].ndim > 1 else np.asarray(leaves[0])

    def row_bytes(self) -> int:
        return sum(int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize for a in _leaves(self.value))


def _map(value: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map(v, fn) for v in value]
    return fn(value)


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value] if hasattr(value, "shape") else []


def _flat(value: Any) -> list[np.ndarray[Any, Any]]:
    return [np.asarray(a) for a in _leaves(value)]


def _packing(value: Any) -> Packing:
    if isinstance(value, dict):
        return Packing("dict", tuple(value))
    if isinstance(value, (list, tuple)):
        return Packing("list", ())
    return Packing("single", ())


def _rows_of(value: Any) -> int:
    return int(_leaves(value)[0].shape[0])


def _scores_in_fleet(fleet: Fleet) -> bool:
    """Whether the fleet's workers should score the rows they predict: local CPU workers of one
    core each. A GPU fleet has a worker a GPU, and a worker of several threads leaves them
    idle while one thread scores: score workers, one a core, run the scores there instead."""
    return not fleet.on_cluster and fleet.plan.device == "cpu" and fleet.plan.threads_per_worker == 1


def _pickled(score_fns: list[tuple[str, Callable[..., Any]]]) -> bytes:
    """The functions as they are now (their globals and closures included): what workers run."""
    import cloudpickle

    return bytes(cloudpickle.dumps(score_fns))


def _score_pool(
    score_fns: list[tuple[str, Callable[..., Any]]], blob: bytes, workers: int | None, given: Fleet | None, backend: str
) -> tuple[ScorePool, bool]:
    """(score workers, whether this call owns them): a warm Fleet's kept pool when it is free -
    the pickled functions are the key, so a changed global gets new workers - else a pool of
    this call's own."""
    make = functools.partial(ScorePool, score_fns, workers, given.backend if given is not None else backend, blob)
    if given is not None:
        kept: ScorePool = given.attached("scores", blob + repr(workers).encode(), make)
        if kept.in_use.acquire(blocking=False):
            return kept, False
    return make(), True


def _one_ahead(predict: Callable[[Any], Any], windows: Iterator[Any]) -> Generator[Any, None, None]:
    """predict(window) for each window, in order, the next one computed (in a thread: the
    engine releases the GIL) while the caller uses the last one."""
    with ThreadPoolExecutor(1, thread_name_prefix="kerasfleet-evaluate") as ahead:
        pending: Future[Any] | None = None
        for window in windows:
            following = ahead.submit(predict, window)
            if pending is not None:
                yield pending.result()
            pending = following
        if pending is not None:
            yield pending.result()


def _windows(rows: int, window: int) -> list[tuple[int, int]]:
    """Row ranges of one size (the last one shorter): at least 8 when there are rows enough,
    since the last window's scores and metrics run after every prediction, alone. One size:
    on JAX, Keras's metric updates compile once per shape."""
    size = max(_MIN_WINDOW_ROWS, min(window, -(-rows // 8)))
    return [(lo, min(rows, lo + size)) for lo in range(0, rows, size)]


def _window_rows(xs: _Rows, ys: _Rows, rows: int) -> int:
    per_row = max(1, xs.row_bytes() + 2 * ys.row_bytes())
    return max(_MIN_WINDOW_ROWS, min(rows, _WINDOW_BYTES // per_row)) if rows else 1
