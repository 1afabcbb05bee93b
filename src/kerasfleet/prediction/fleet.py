"""The fleet: warm workers that predict with one model, callable from many threads at once.

    caller threads (any number)                  runtime.Supervisor thread        workers
    ───────────────────────────                  ─────────────────────────        ───────
    predict(x): validate -> key -> outputs ─── Probe(key) (once per shape) ─────► compile
      small x:  PredictInline(key, rows)  ────────────────────────────────────► rows in the message
      large x:  Job: buffers in shared memory / the caller's files / out= files
                for each chunk: copy its rows, submit PredictRows(job, a, b) ──► rows by index
      wait for the chunk futures (progress bar), pack like model.predict
      finally: cancel what is queued, workers detach, segments recycled or unlinked

The supervisor requeues a dead worker's chunks and starts a replacement; a chunk that kills
its worker `max_retries` times fails the call with `WorkerCrashedError`. Results are written
by row index, so order holds by construction, and calls from different threads never share
buffers.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from typing import TYPE_CHECKING, Any

import numpy as np

from ..cluster import check_cluster, connect
from ..engines import Key, Outputs, bucket, row_bytes
from ..engines.handler import HANDLER, PredictChunk, PredictInline, PredictRows, Probe, RowsHook
from ..engines.model_file import ModelFile, resolve_model
from ..engines.registry import EngineConfig
from ..errors import FleetClosedError, InputError, ModelLoadError, RemoteTraceback, WorkerError
from ..runtime import (
    BufferSpec,
    Context,
    LocalWorker,
    Plan,
    RetryPolicy,
    SharedBuffers,
    Supervisor,
    WorkerHandle,
    WorkerInit,
    WorkerSlot,
    default_backend,
    worker_environment,
)
from ..runtime.compile_cache import compile_cache_env
from ..runtime.protocol import RemoteError
from ..tune import check_engine, check_precision, resolve
from ..tune.precision import MAX_TOP1_DISAGREEMENT
from .calibration import precision_request
from .inputs import Source, normalize_inputs
from .jobs import Job, check_out, chunk_bounds, load_sources, open_out_files, source_rows
from .progress import progress_bar
from .shards import is_shard_folder, predict_shards

if TYPE_CHECKING:
    from ..cluster import RayCluster

BACKENDS = ("jax", "tensorflow", "torch", "numpy")
# Requests whose inputs and outputs together fit in this travel inside the messages (pickled)
# instead of shared memory: no segment to create or map, one round trip. It must stay well
# below a socket's buffer (about 208 KB on Linux): the supervisor sends a worker its next call
# while the worker may be sending a reply, and neither may block on the other.
INLINE_MAX_BYTES = 64 << 10
# Chunks on a Ray cluster hold up to this many batches (8 locally): a chunk's call costs about
# 0.7 ms of Ray scheduling, and its actor spends 3-6 ms putting the outputs in the object
# store before it starts the next one (a local pipe round trip: about 0.1 ms), so larger
# chunks keep that overhead small (bench MLP, warm, 2 actors: 1.06-1.09M rows/s at 32,
# 1.15-1.18M at 64); there are still about four per actor for load balancing, and a lost
# actor's chunk is redone whole.
CLUSTER_MAX_BATCHES_PER_CHUNK = 64
# Helpers kept per key by Fleet.attached (score workers: a few sets of functions in turn).
_ATTACHED_PER_KEY = 2


def check_backend(backend: Any) -> None:
    if backend is not None and backend not in BACKENDS:
        raise InputError(f"Expected backend to be 'jax', 'tensorflow', 'torch' or None. Received: backend={backend!r}.")


def check_batch_size(batch_size: Any, name: str = "batch_size") -> None:
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise InputError(f"Expected {name} to be a positive int or None. Received: {name}={batch_size!r}.")


def fleet_options(
    *,
    engine: str,
    workers: int | None,
    threads_per_worker: int | None,
    devices: Any,
    batch_size: int | None,
    backend: str | None,
    custom_objects: Any,
    safe_mode: bool,
) -> dict[str, Any]:
    """The keyword arguments a one-shot call (predict, evaluate) gives its Fleet - and that
    `in_process_for` and `keep_actors` read - with the backend resolved."""
    return {
        "engine": engine,
        "workers": workers,
        "threads_per_worker": threads_per_worker,
        "devices": devices,
        "batch_size": batch_size,
        "backend": backend or default_backend(),
        "custom_objects": custom_objects,
        "safe_mode": safe_mode,
    }


def check_fleet_options(options: dict[str, Any]) -> None:
    """What `Fleet(**options)` refuses of them before it starts anything (the plan aside)."""
    check_engine(options["engine"])
    check_backend(options["backend"])
    check_batch_size(options["batch_size"])


class _Shapes:
    """What the model returns per key, learned from warm-up and probes; shared by all threads."""

    def __init__(self) -> None:
        self.outputs: dict[Key, Outputs] = {}
        self.lock = threading.Lock()

    def remember_warm(self, info: dict[str, Any]) -> None:
        if info.get("warm_key") is not None and info.get("warm_outputs") is not None:
            with self.lock:
                self.outputs.setdefault(info["warm_key"], info["warm_outputs"])


class Fleet:
    """Warm worker processes that predict with one model, for repeated calls.

    ```python
    with kerasfleet.Fleet("model.keras") as fleet:
        y = fleet.predict(x)                     # same result as model.predict(x)
        for y_part in fleet.imap(batches):       # streaming, ordered, bounded memory
            ...
    ```

    | argument | meaning |
    | --- | --- |
    | `model` | a `.keras`/`.h5` path or an in-memory `keras.Model` (saved once to a temporary file) |
    | `workers`, `threads_per_worker` | the plan; by default workers x threads = usable cores |
    | `devices` | `"auto"` (GPUs if visible, one worker each), `"cpu"`, `"gpu"` or a list of GPU ids |
    | `batch_size` | rows per compiled call; default about 4 MB of input (power of two, 16-1024) |
    | `backend` | the workers' Keras backend; default the caller's (`KERAS_BACKEND`, keras.json) |
    | `custom_objects` | importable custom classes the model needs, as for `keras.saving.load_model` |
    | `safe_mode` | Keras safe mode when loading (no arbitrary code from lambdas); on by default |
    | `max_retries` | how often the same rows may crash a worker before the call fails |
    | `start_timeout` | seconds each worker may take to load the model and warm up |
    | `engine` | `"auto"` (measured once per model and machine, cached), `"keras"` (compiled Keras), `"onnx"` (exported once, parity-checked, cached) or `"openvino"` (the same export, checked again) |
    | `precision` | `"fp32"` (default: exact), `"int8"`, `"bf16"`, `"fp16"`: used only when the accuracy gate passes on `calibration` rows (see `kerasfleet.tune.precision`), else `PrecisionRefused` with the numbers |
    | `calibration` | rows (as for `predict`) to calibrate int8 and to run the gate on, needed the first time a reduced precision is asked for |
    | `max_top1_disagreement`, `atol` | the gate's thresholds (0.005 and None) |
    | `cluster` | `None` (this machine), `"ray"` or a Ray address: workers are Ray actors planned per node, data goes through the object store (see `kerasfleet.cluster`) |

    Workers start at construction, in the background; the first call waits for them. Any
    number of threads may call `predict` at once.
    """

    def __init__(
        self,
        model: Any,
        *,
        workers: int | None = None,
        threads_per_worker: int | None = None,
        devices: Any = "auto",
        batch_size: int | None = None,
        backend: str | None = None,
        custom_objects: dict[str, Any] | None = None,
        safe_mode: bool = True,
        max_retries: int = 3,
        start_timeout: float = 600.0,
        engine: str = "auto",
        precision: str = "fp32",
        calibration: Any = None,
        max_top1_disagreement: float = MAX_TOP1_DISAGREEMENT,
        atol: float | None = None,
        cluster: Any = None,
    ) -> None:
        check_batch_size(batch_size)
        check_backend(backend)
        check_precision(precision, engine)
        check_cluster(cluster)
        if cluster is not None and precision != "fp32":
            raise InputError(
                f"Expected precision='fp32' with cluster={cluster!r}. Received: precision={precision!r}; a reduced "
                "precision is chosen by measuring this machine, not yet the cluster's nodes. Drop cluster= or precision=."
            )
        if not isinstance(max_retries, int) or max_retries < 1:
            raise InputError(f"Expected max_retries to be a positive int. Received: max_retries={max_retries!r}.")
        owned = not isinstance(model, ModelFile)
        self._model: ModelFile = resolve_model(model, custom_objects) if owned else model
        self.signature = self._model.signature
        self.backend = backend or default_backend()
        self.max_retries = max_retries
        self._retry = RetryPolicy(requeue=True, max_deaths=max_retries)
        self._closed = False
        self._cluster: RayCluster | None = None
        try:
            request = precision_request(precision, engine, self.signature, calibration, max_top1_disagreement, atol)
            cluster_plan: Plan | None = None
            nodes: tuple[str, ...] = ()
            if cluster is not None:
                self._cluster = connect(cluster)
                cluster_plan, nodes = self._cluster.plan(workers, threads_per_worker, devices)
            res = resolve(
                self._model,
                precision=request,
                engine=engine,
                workers=workers,
                threads_per_worker=threads_per_worker,
                devices=devices,
                batch_size=batch_size,
                backend=self.backend,
                custom_objects=custom_objects,
                safe_mode=safe_mode,
                fleet_factory=Fleet,  # the trial measures fleets like this one
                plan=cluster_plan,
            )
            self.plan = res.plan
            self.engine = res.engine
            self.tuned = res.tuned
            self.onnx = res.onnx
            self.precision = res.precision  # the gate's verdict when precision != "fp32", else None
            self._resolution = res
            self.batch_size = res.batch_size
            warm_key: Key | None = None
            if self.signature.fixed:
                rows = self.signature.row_specs()
                warm_key = (res.batch_for(rows), rows)
            specs = self.signature.inputs
            config = EngineConfig(
                name=self.engine,
                model_path=str(self._model.path),
                input_structure=self.signature.structure,
                input_names=tuple(s.name for s in specs) if specs is not None else None,
                custom_objects=custom_objects,
                modules=self.signature.custom_modules,
                safe_mode=safe_mode,
                threads=self.plan.threads_per_worker,
                onnx_path=str(self.onnx.path) if self.onnx is not None else None,
                onnx_meta=self.onnx.meta if self.onnx is not None else None,
                warm_key=warm_key,
                ov_precision=res.ov_precision,
            )
            self._warm_key = warm_key
            init = WorkerInit(HANDLER, config)
            backend_name = self.backend
            spawn: Callable[[WorkerSlot], WorkerHandle]
            if self._cluster is not None:
                spawn = self._cluster.spawner(self._cluster.ship(init, shipped_files(config)), backend_name, nodes)
            else:
                # JAX workers share XLA's persistent cache: loading a Keras model compiles its
                # initializers (0.8 s of a 3 s start for a small MLP), then the forward pass per
                # batch shape; a later worker of the same model reads those programs back.
                cache_env = compile_cache_env(True) if backend_name == "jax" and self.engine == "keras" else {}
                spawn = lambda slot: LocalWorker(slot, init, {**worker_environment(slot, backend_name), **cache_env})  # noqa: E731
            self._shapes = _Shapes()
            # Segments of finished calls are kept for the next ones: two per call in flight.
            self._buffers = SharedBuffers(keep=4 * self.plan.workers + 4)
            self._supervisor = Supervisor(
                spawn,
                self.plan.slots,
                start_timeout=start_timeout,
                max_start_failures=max_retries,
                on_fatal=_load_error(str(self._model.path)),
                on_ready=self._shapes.remember_warm,
                name=f"kerasfleet-supervisor-{self._model.path.name}",
            )
        except BaseException:
            if owned:
                self._model.cleanup()
            raise
        self._attached: dict[tuple[str, bytes], Any] = {}
        self._attached_lock = threading.Lock()
        self._finalizer = weakref.finalize(
            self, _cleanup, self._supervisor, self._buffers, self._model if owned else None, self._attached
        )

    # -- public ------------------------------------------------------------------------------
    def predict(self, x: Any, *, batch_size: int | None = None, out: Any = None, progress: bool | None = None) -> Any:
        """Predict every row of `x`; returns what `model.predict(x)` returns, in the same order.

        `x` is an array, a list or dict of arrays, an `np.memmap`, or a `.npy`/`.npz` path.
        `out` (a `.npy` path, or a list/dict of them) writes the results to disk through a
        memory map and returns read-only memmaps: results larger than RAM never sit in memory.
        A folder of `.npy` shards with `out=` a folder: a result shard per input shard, same
        name, in order; returns the paths written (see `kerasfleet.prediction.shards`).
        Safe to call from many threads at once.
        """
        self._check_open()
        check_batch_size(batch_size)
        if is_shard_folder(x):
            return predict_shards(self, x, out, batch_size, progress)
        check_out(out)
        call = self._start(normalize_inputs(x, self.signature), batch_size, out)
        bar = progress_bar(call.rows, progress) if isinstance(call, _JobCall) else None
        try:
            return call.result(bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
            call.close()

    def imap(self, batches: Iterable[Any], *, batch_size: int | None = None, max_inflight: int | None = None) -> Iterator[Any]:
        """Predict each batch of an iterable; yields results in order, holding few in memory.

        At most `max_inflight` batches (default 2 per worker) are in shared memory at a time,
        so an endless stream runs in bounded memory. An empty batch yields an empty result.
        """
        return self.imap_after(((batch, None) for batch in batches), batch_size=batch_size, max_inflight=max_inflight)

    def imap_after(
        self, items: Iterable[tuple[Any, RowsHook | None]], *, batch_size: int | None = None, max_inflight: int | None = None
    ) -> Iterator[Any]:
        """`imap` of (batch, hook) pairs: each batch's hook, if any, runs on its rows in the
        worker that predicted them (evaluate's score functions). Local workers only."""
        self._check_open()
        check_batch_size(batch_size)
        check_batch_size(max_inflight, "max_inflight")
        return self._imap(iter(items), batch_size, max_inflight or 2 * self.plan.workers)

    def _imap(self, source: Iterator[tuple[Any, RowsHook | None]], batch_size: int | None, limit: int) -> Iterator[Any]:
        inflight: deque[_Call] = deque()
        exhausted = False
        try:
            while True:
                while not exhausted and len(inflight) < limit:
                    try:
                        batch, after = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    inflight.append(self._start(normalize_inputs(batch, self.signature), batch_size, None, after))
                if not inflight:
                    return
                head = inflight[0]
                try:
                    result = head.result(None)
                finally:
                    inflight.popleft()  # taken off only here: an interrupt anywhere above still closes it
                    head.close()
                yield result
        finally:
            for call in inflight:
                call.close()

    def attached(self, key: str, ident: bytes, make: Callable[[], Any]) -> Any:
        """A helper kept with this fleet and closed with it: what repeated calls on a warm fleet
        reuse (evaluate's score workers). Kept per (`key`, `ident`), the last few of each key;
        asked for with an `ident` not kept, `make()` builds one, and the oldest beyond
        _ATTACHED_PER_KEY is closed."""
        with self._attached_lock:
            self._check_open()
            held = self._attached.pop((key, ident), None)
            if held is None:
                held = make()
            self._attached[(key, ident)] = held  # most recent last
            same_key = [k for k in self._attached if k[0] == key]
            evicted = [self._attached.pop(k) for k in same_key[:-_ATTACHED_PER_KEY]]
        for old in evicted:
            old.close()
        return held

    def close(self) -> None:
        """Stop the workers and free every buffer. Safe to call twice."""
        self._closed = True
        self._finalizer()

    def stats(self) -> dict[str, Any]:
        """Workers (pid, ready, cores, GPU), restarts so far, the plan, engine and batch size."""
        return {
            "workers": self._supervisor.workers(),
            "restarts": self._supervisor.restarts,
            "tasks_done": self._supervisor.tasks_done,
            "plan": self.plan.describe(),
            "engine": self.engine,
            "precision": self.precision.describe() if self.precision is not None else "fp32",
            "batch_size": self.batch_size,
            "backend": self.backend,
        }

    def outputs(self, rows: int | None = None, batch_size: int | None = None) -> Outputs:
        """The outputs' names, per-row shapes and dtypes for calls of `rows` rows (a fixed signature).

        Known from warm-up for the warm shape; other shapes are compiled in one worker first.
        """
        self._check_open()
        if not self.signature.fixed:
            raise InputError("Expected a model with fixed per-row input shapes to know its outputs ahead of a call.")
        row_specs = self.signature.row_specs()
        batch = batch_size or self._resolution.batch_for(row_specs)
        return self._outputs((bucket(rows, batch) if rows else batch, row_specs))

    @property
    def on_cluster(self) -> bool:
        """Whether the workers are a Ray cluster's actors (no shared memory with this process)."""
        return self._cluster is not None

    @property
    def model_path(self) -> Any:
        """The model file the workers load (a temporary copy for an in-memory model, while open)."""
        return self._model.path

    @property
    def usable(self) -> bool:
        """Open and not broken: a call would run."""
        return not self._closed and self._supervisor.broken is None

    @property
    def restarts(self) -> int:
        return self._supervisor.restarts

    @property
    def pids(self) -> list[int]:
        return [w["pid"] for w in self._supervisor.workers()]

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every worker has loaded the model and warmed up.

        Raises what keeps them from it: `ModelLoadError`, `WorkerStartError`, ...
        """
        if self._closed:
            raise FleetClosedError("Cannot wait for workers, as the fleet has been closed.")
        self._supervisor.wait_ready(timeout)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Fleet {state}: {self.plan.describe()}, engine {self.engine}, backend {self.backend}, model {self._model.path.name}>"

    # -- calls -------------------------------------------------------------------------------
    def _start(self, sources: list[Source], batch_size: int | None, out: Any, after: RowsHook | None = None) -> _Call:
        rows = sources[0].rows
        row_specs = source_rows(sources)
        batch = batch_size or self._resolution.batch_for(row_specs)
        if after is not None and (self._cluster is not None or rows == 0):
            raise InputError(
                f"Expected rows on local workers for a hook on predicted rows. Received: {rows} rows, cluster={self._cluster!r}."
            )
        if rows == 0:
            return _EmptyCall(self._outputs((batch, row_specs)), out)
        if (
            after is None
            and out is None
            and all(s.array is not None for s in sources)
            and self._fits_inline(rows, batch, row_specs)
        ):
            key = (bucket(rows, batch), row_specs)
            outputs = self._outputs(key)
            arrays = tuple(np.ascontiguousarray(s.array, dtype=s.dtype) for s in sources)
            future = self._supervisor.submit(PredictInline(key, arrays), retry=self._retry, label=f"predicting rows 0:{rows}")
            return _InlineCall(self._supervisor, future, outputs, rows)
        key = (batch, row_specs)
        if self._cluster is not None:
            outputs_of = self._outputs_when_needed(key, out)
            return _RemoteCall(self._supervisor, self._cluster, key, sources, self.plan.workers, outputs_of, out, self._retry)
        job = Job(key, sources, self.plan.workers, self._buffers, self._outputs(key), out, after)
        return _JobCall(self._supervisor, job, self._retry)

    def _fits_inline(self, rows: int, batch: int, row_specs: tuple[tuple[tuple[int, ...], str], ...]) -> bool:
        # The inputs alone rule out most large calls: those need not wait for a worker's
        # warm-up to learn the outputs' size (the first call of a fleet that is still starting).
        if rows * row_bytes(row_specs) > INLINE_MAX_BYTES:
            return False
        return rows * self._row_bytes(batch, row_specs) <= INLINE_MAX_BYTES

    def _outputs_when_needed(self, key: Key, out: Any) -> Callable[[], Outputs]:
        """The outputs of `key`, for a call on a cluster: now, or once its first chunk is back.

        Waiting costs a one-shot call its actors' whole start before a chunk is staged; the
        warm shape's outputs arrive with the actors' `Ready`, before any chunk's reply, so
        that call stages its chunks while the actors start. `out=` files must be opened first,
        and any other shape is probed first (a probe queued behind the chunks would delay
        the copy of every chunk's result to the end).
        """
        with self._shapes.lock:
            known = self._shapes.outputs.get(key)
        if known is not None:
            return lambda: known
        if out is not None or key != self._warm_key:
            outputs = self._outputs(key)
            return lambda: outputs
        return lambda: self._outputs(key)

    def _row_bytes(self, batch: int, row_specs: tuple[tuple[tuple[int, ...], str], ...]) -> int:
        """Bytes of one row in and out: what an inline request carries per row."""
        outputs = self._outputs((batch, row_specs))  # the warm shape: known without a probe
        out_bytes = sum(int(np.prod(o.shape, dtype=np.int64)) * np.dtype(o.dtype).itemsize for o in outputs.specs)
        return row_bytes(row_specs) + out_bytes

    def _outputs(self, key: Key) -> Outputs:
        """What the model returns for inputs of this key: from warm-up, or asked of a worker."""
        with self._shapes.lock:
            known = self._shapes.outputs.get(key)
        if known is not None:
            return known
        future = self._supervisor.submit(
            Probe(key), retry=self._retry, label=f"compiling the model for inputs {_describe_key(key)}"
        )
        try:
            outputs: Outputs = future.result()
        except WorkerError as exc:
            if type(exc) is not WorkerError:
                raise  # a crash or a timeout already names the shape it was compiling
            raise WorkerError(f"The model failed on inputs of this shape ({_describe_key(key)}): {exc}") from exc.__cause__
        with self._shapes.lock:
            self._shapes.outputs[key] = outputs
        return outputs

    def _check_open(self) -> None:
        if self._closed:
            raise FleetClosedError("Cannot predict, as the fleet has been closed.")
        if self._supervisor.broken is not None:
            raise FleetClosedError("Cannot predict, as the fleet is broken.") from self._supervisor.broken


class _Call:
    rows = 0

    def result(self, on_progress: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _EmptyCall(_Call):
    """Zero rows: empty outputs of the right shape, no worker involved."""

    def __init__(self, outputs: Outputs, out: Any) -> None:
        self._outputs = outputs
        self._out = out

    def result(self, on_progress: Any) -> Any:
        if self._out is None:
            return self._outputs.pack(self._outputs.empty(0))
        paths, arrays = open_out_files(self._out, self._outputs, 0)
        del arrays
        return self._outputs.pack([np.load(p, mmap_mode="r") for p in paths])


class _InlineCall(_Call):
    """A small request: its rows travel in the message and its outputs come back in the reply."""

    def __init__(self, supervisor: Supervisor, future: Future[Any], outputs: Outputs, rows: int) -> None:
        self._supervisor = supervisor
        self._future = future
        self._outputs = outputs
        self.rows = rows

    def result(self, on_progress: Any) -> Any:
        arrays = self._future.result()
        if on_progress is not None:
            on_progress(self.rows)
        return self._outputs.pack(arrays)

    def close(self) -> None:
        self._future.cancel()


class _JobCall(_Call):
    """A large request: chunks of a job in shared buffers, submitted as their rows are copied."""

    def __init__(self, supervisor: Supervisor, job: Job, retry: RetryPolicy) -> None:
        self._supervisor = supervisor
        self.job = job
        self.rows = job.rows
        self._context = Context(job.spec, label="predict job")
        self._futures: list[Future[Any]] = []
        try:
            for i, (lo, hi) in enumerate(job.chunks):
                job.copy(i)
                self._futures.append(
                    supervisor.submit(
                        PredictRows(self._context.id, lo, hi),
                        context=self._context,
                        retry=retry,
                        label=f"predicting rows {lo}:{hi}",
                    )
                )
        except BaseException:
            self.close()
            raise

    def result(self, on_progress: Any) -> Any:
        pending: set[Future[Any]] = set(self._futures)
        sizes = {f: hi - lo for f, (lo, hi) in zip(self._futures, self.job.chunks)}
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in done:
                f.result()  # raises the chunk's error; close() then drops the rest
                self.job.done += 1
                if on_progress is not None:
                    on_progress(sizes[f])
        return self.job.result()

    def close(self) -> None:
        for f in self._futures:
            f.cancel()
        self._supervisor.close_context(self._context)
        self.job.release()


class _RemoteCall(_Call):
    """A large request on a Ray cluster: no shared memory with the workers.

    Each chunk (the same whole-batch chunks a local job makes) is put in the object store by
    this thread, just before it is submitted, and its outputs come back as the call's result,
    copied here into the result by row index; `.npy` inputs and `out=` files are mapped by the
    actors, by path. A chunk whose actor died is sent again by reference: its rows are not
    copied twice. The outputs' shapes are asked for only when the first chunk is back, so a
    fleet's first call stages its chunks while its actors start.
    """

    def __init__(
        self,
        supervisor: Supervisor,
        cluster: RayCluster,
        key: Key,
        sources: list[Source],
        workers: int,
        outputs: Callable[[], Outputs],
        out: Any,
        retry: RetryPolicy,
    ) -> None:
        self._supervisor = supervisor
        self.rows = sources[0].rows
        self._outputs_of = outputs
        self.chunks = chunk_bounds(self.rows, key[0], workers, CLUSTER_MAX_BATCHES_PER_CHUNK)
        self._paths: list[str] | None = None
        out_specs: tuple[BufferSpec, ...] | None = None
        if out is not None:
            self._paths, arrays = open_out_files(out, outputs(), self.rows)
            out_specs = tuple(
                BufferSpec("file", p, int(a.offset), a.dtype.str, tuple(a.shape), True)  # type: ignore[attr-defined]
                for p, a in zip(self._paths, arrays)
            )
            del arrays
        # Compressed .npz members are read here once; .npy files are mapped by the actors.
        loaded: list[Any] = [s.array if s.array is not None or s.file is not None else load_sources([s])[0] for s in sources]
        self._futures: list[Future[Any]] = []
        try:
            for lo, hi in self.chunks:
                inputs = tuple(
                    s.file if s.file is not None else np.ascontiguousarray(a[lo:hi], dtype=s.dtype)
                    for s, a in zip(sources, loaded)
                )
                label = f"predicting rows {lo}:{hi}"
                payload = cluster.stage(PredictChunk(key, lo, hi, inputs, out_specs), label)
                self._futures.append(supervisor.submit(payload, retry=retry, label=label))
        except BaseException:
            self.close()
            raise

    def result(self, on_progress: Any) -> Any:
        outputs: Outputs | None = None
        arrays: list[Any] = []
        where = dict(zip(self._futures, self.chunks))
        pending: set[Future[Any]] = set(self._futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in done:
                parts = f.result()  # raises the chunk's error; close() then drops the rest
                if outputs is None:
                    # A chunk is back, so its actor's Ready (with the warm shape's outputs)
                    # was handled before: known here without a probe.
                    outputs = self._outputs_of()
                    arrays = outputs.empty(self.rows) if self._paths is None else []
                lo, hi = where[f]
                if parts is not None:
                    for dst, part in zip(arrays, parts):
                        dst[lo:hi] = part
                if on_progress is not None:
                    on_progress(hi - lo)
        self._futures = []
        if self._paths is not None:
            arrays = [np.load(p, mmap_mode="r") for p in self._paths]
        return (outputs or self._outputs_of()).pack(arrays)

    def close(self) -> None:
        for f in self._futures:
            f.cancel()  # queued chunks are dropped; running ones finish and are thrown away


def shipped_files(config: EngineConfig) -> dict[str, str | None]:
    """The files a cluster's actors read, by config field: the ONNX export alone for the graph
    engines (they never open the model file), the model file for Keras. Each one is read,
    hashed, put in the object store and written on every node, so none is sent for nothing."""
    if config.onnx_path is not None and config.name != "keras":
        return {"onnx_path": config.onnx_path}
    return {"model_path": config.model_path, "onnx_path": config.onnx_path}


def _load_error(path: str) -> Any:
    def make(error: RemoteError) -> BaseException:
        hint = ""
        if "Could not locate" in error.message or "Unknown layer" in error.message:
            hint = " Pass the class in custom_objects={'Name': Class}, defined in an importable module."
        elif "safe_mode" in error.message or "Lambda" in error.message:
            hint = " The model runs code from a Lambda layer; pass safe_mode=False only if you trust the file."
        fatal = ModelLoadError(f"The workers could not load the model {path!r}: {error.type_name}: {error.message}{hint}")
        fatal.__cause__ = RemoteTraceback(error.traceback)
        return fatal

    return make


def _cleanup(supervisor: Supervisor, buffers: SharedBuffers, model: ModelFile | None, attached: dict[Any, Any]) -> None:
    """Run by `close()` and at garbage collection or exit: no process, segment or temp file survives."""
    try:
        while attached:
            attached.popitem()[1].close()
    finally:
        supervisor.close()
        buffers.release()
        if model is not None:
            model.cleanup()


def _describe_key(key: Key) -> str:
    return ", ".join(f"(rows, {', '.join(map(str, shape))}) {dtype}" for shape, dtype in key[1]) + f" at batch size {key[0]}"
