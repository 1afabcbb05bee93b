"""The fleet: warm worker processes and the supervisor loop that feeds them.

    caller thread (supervisor)                                   worker processes
    ──────────────────────────                                   ────────────────
    Job: inputs in shared memory / the caller's file  ──────┐
         outputs in shared memory / an out= .npy file  ─────┤   (mapped by every worker)
    queue of chunk ids ──► _dispatch: ≤ PREFETCH per worker ─┼──► ("chunk", job, i, a, b)
    _run_until: wait(pipes + process sentinels)  ◄───────────┴─── ("done" | "error", job, i)
        a sentinel fires ─► _on_death: requeue the dead worker's chunks, start a replacement

Work is pulled, not pushed: a worker gets its next chunk when it reports one done, so a slow
worker never holds up the rest, and the supervisor knows exactly which chunks each worker
holds, which is what makes requeueing after a crash exact. Results are written by row index
into the output buffer, so order holds by construction. Everything runs on the caller's
thread inside the public calls; there is no background thread to race with.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import signal
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from ._bootstrap import spawn_environment, worker_entry
from ._buffers import SharedBuffers
from ._engine import Key, Outputs
from ._errors import FleetClosedError, FleetError, InputError, ModelLoadError, RemoteTraceback, WorkerCrashedError, WorkerError
from ._inputs import Source, normalize_inputs
from ._jobs import Job, check_out, default_batch_size, source_rows
from ._model_file import ModelFile, resolve_model
from ._onnx import OnnxModel
from ._onnx import export as export_onnx
from ._plan import Plan, WorkerSlot, make_plan, worker_environment
from ._progress import progress_bar
from ._tune import TunedPlan, get_plan
from ._worker import WorkerInfo, WorkerInit

ENGINES = ("auto", "keras", "onnx")
# Chunks a worker holds at once: one it computes, one waiting, so it never idles on a round trip.
PREFETCH = 2
# How often the loop wakes without news, to check start-up deadlines.
_TICK_S = 1.0
_STOP_GRACE_S = 3.0


def default_backend() -> str:
    """The backend the caller uses: the imported Keras's, else KERAS_BACKEND, else keras.json."""
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "backend"):
        return str(keras.backend.backend())
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    config = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "keras.json"
    try:
        return str(json.loads(config.read_text()).get("backend", "tensorflow"))
    except (OSError, ValueError):
        return "tensorflow"


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = {
            "SIGKILL": " - killed from outside, often by the out-of-memory killer",
            "SIGSEGV": " - a segmentation fault in native code",
            "SIGBUS": " - a bus error, often a full /dev/shm",
        }.get(name, "")
        return f"killed by {name}{hint}"
    return f"exit code {exitcode}"


class _Worker:
    def __init__(self, slot: WorkerSlot, process: Any, conn: Connection) -> None:
        self.slot = slot
        self.process = process
        self.conn = conn
        self.info: WorkerInfo | None = None
        self.outstanding: deque[tuple[int, int]] = deque()
        self.jobs_seen: set[int] = set()
        self.dead = False

    @property
    def ready(self) -> bool:
        return self.info is not None and not self.dead


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
    | `start_timeout` | seconds to wait for the first worker to be ready |
    | `engine` | `"auto"` (measured once per model and machine, cached), `"keras"` (compiled Keras) or `"onnx"` (exported once, parity-checked, cached) |

    Workers start at construction, in the background; the first call waits for them. A fleet is
    used from one thread at a time.
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
        _start: bool = True,
    ) -> None:
        _check_batch_size(batch_size)
        if engine not in ENGINES:
            raise InputError(f"Expected engine to be one of {list(ENGINES)}. Received: engine={engine!r}.")
        if backend is not None and backend not in ("jax", "tensorflow", "torch", "numpy"):
            raise InputError(f"Expected backend to be 'jax', 'tensorflow', 'torch' or None. Received: backend={backend!r}.")
        self.plan: Plan = make_plan(workers, threads_per_worker, devices=devices)
        self._model: ModelFile = resolve_model(model, custom_objects)
        self.signature = self._model.signature
        self.engine = engine
        self.tuned: TunedPlan | None = None
        self._user_split = workers is not None or threads_per_worker is not None
        self._devices = devices
        self.onnx: OnnxModel | None = None
        self._custom_objects = custom_objects
        self._safe_mode = safe_mode
        self.backend = backend or default_backend()
        self.batch_size = batch_size
        self.max_retries = max_retries
        self.start_timeout = start_timeout
        self._ctx = mp.get_context("spawn")  # never fork: TF and JAX are not fork-safe
        self._workers: list[_Worker] = []
        self._jobs: dict[int, Job] = {}
        # Segments of finished calls are kept for the next ones: two per call in flight.
        self._buffers = SharedBuffers(keep=4 * self.plan.workers + 4)
        self._queue: deque[tuple[int, int]] = deque()
        self._outputs: dict[Key, Outputs] = {}
        self._probed: dict[Key, tuple[Outputs | None, str | None]] = {}
        self._next_job = 0
        self._broken: BaseException | None = None
        self._closed = False
        self._busy = False
        self._started_at = time.monotonic()
        self.restarts = 0
        self._start_failures = 0
        self._finalizer = weakref.finalize(self, _terminate_all, self._workers, self._jobs, self._buffers, self._model)
        if _start:
            self._start()

    def _start(self) -> None:
        try:
            if self.engine == "auto":
                self._apply_tuned_plan()
            if self.engine == "onnx":
                self.onnx = export_onnx(self._model, custom_objects=self._custom_objects, safe_mode=self._safe_mode)
            specs = self.signature.inputs
            warm_key: Key | None = None
            if self.signature.fixed:
                rows = self.signature.row_specs()
                warm_key = (self.batch_size or self._default_batch(rows), rows)
            self._init = pickle.dumps(
                WorkerInit(
                    model_path=str(self._model.path),
                    input_structure=self.signature.structure,
                    input_names=tuple(s.name for s in specs) if specs is not None else None,
                    custom_objects=self._custom_objects,
                    modules=self.signature.custom_modules,
                    safe_mode=self._safe_mode,
                    warm_key=warm_key,
                    engine=self.engine,
                    onnx_path=str(self.onnx.path) if self.onnx is not None else None,
                    onnx_meta=self.onnx.meta if self.onnx is not None else None,
                    threads=self.plan.threads_per_worker,
                )
            )
            self._started_at = time.monotonic()
            for slot in self.plan.slots:
                self._spawn(slot)
        except BaseException:
            self.close()
            raise

    # -- public ------------------------------------------------------------------------------
    def predict(self, x: Any, *, batch_size: int | None = None, out: Any = None, progress: bool | None = None) -> Any:
        """Predict every row of `x`; returns what `model.predict(x)` returns, in the same order.

        `x` is an array, a list or dict of arrays, an `np.memmap`, or a `.npy`/`.npz` path.
        `out` (a `.npy` path, or a list/dict of them) writes the results to disk through a
        memory map and returns read-only memmaps: results larger than RAM never sit in memory.
        """
        self._check_open()
        _check_batch_size(batch_size)
        check_out(out)
        return self._predict(normalize_inputs(x, self.signature), batch_size, out, progress)

    def _predict(self, sources: list[Source], batch_size: int | None, out: Any, progress: bool | None) -> Any:
        self._busy = True
        job = None
        bar = None
        try:
            job = self._submit(sources, batch_size, out)
            bar = progress_bar(job.rows, progress)
            if bar is not None:
                job.on_progress = bar.update
            self._run_until(lambda: job.finished)
            if job.error is not None:
                raise job.error
            return job.result()
        finally:
            if bar is not None:
                bar.close()
            if job is not None:
                self._forget(job)
            self._busy = False

    def imap(self, batches: Iterable[Any], *, batch_size: int | None = None, max_inflight: int | None = None) -> Iterator[Any]:
        """Predict each batch of an iterable; yields results in order, holding few in memory.

        At most `max_inflight` batches (default 2 per worker) are copied into shared memory at a
        time, so an endless stream runs in bounded memory.
        """
        self._check_open()
        _check_batch_size(batch_size)
        limit = max_inflight or 2 * self.plan.workers
        inflight: deque[Job] = deque()
        source = iter(batches)
        exhausted = False
        try:
            while True:
                while not exhausted and len(inflight) < limit:
                    try:
                        batch = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    inflight.append(self._submit(normalize_inputs(batch, self.signature), batch_size, None))
                if not inflight:
                    return
                head = inflight[0]
                self._run_until(lambda: head.finished)  # noqa: B023 - called before head changes
                inflight.popleft()
                try:
                    if head.error is not None:
                        raise head.error
                    result = head.result()
                finally:
                    self._forget(head)
                yield result
        finally:
            for job in inflight:
                self._forget(job)

    def close(self) -> None:
        """Stop the workers and free every buffer. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if not any(w.outstanding for w in self._workers):
            # Idle workers exit on their own at once; busy ones (an error or Ctrl-C cut a call
            # short) are terminated rather than waited for.
            for w in self._workers:
                self._send(w, ("stop",))
            deadline = time.monotonic() + _STOP_GRACE_S
            for w in self._workers:
                w.process.join(max(0.0, deadline - time.monotonic()))
        self._finalizer()  # terminates stragglers, frees buffers, removes the temporary model

    def stats(self) -> dict[str, Any]:
        """Workers (pid, ready, cores, GPU), restarts so far, the plan, engine and batch size."""
        return {
            "workers": [
                {"pid": w.process.pid, "ready": w.ready, "cpus": list(w.slot.cpus), "gpu": w.slot.gpu} for w in self._workers
            ],
            "restarts": self.restarts,
            "plan": self.plan.describe(),
            "engine": self.engine,
            "batch_size": self.batch_size,
            "backend": self.backend,
        }

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if not w.dead]

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every worker has loaded the model and warmed up."""
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        self._run_until(lambda: all(w.ready for w in self._workers), deadline)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Fleet {state}: {self.plan.describe()}, engine {self.engine}, backend {self.backend}, model {self._model.path.name}>"

    def _apply_tuned_plan(self) -> None:
        """Resolve engine="auto": the cached (or freshly measured) plan fills what the caller left open."""
        if self.plan.device != "cpu" or not self.signature.fixed:
            self.engine = "keras"  # the trial measures CPU configurations on fixed row shapes
            return
        if self.tuned is None:
            self.tuned = get_plan(self._model, backend=self.backend, custom_objects=self._custom_objects, safe_mode=self._safe_mode)
        self.engine = self.tuned.engine
        if not self._user_split:
            self.plan = make_plan(self.tuned.workers, self.tuned.threads_per_worker, devices=self._devices)
        if self.batch_size is None:
            self.batch_size = self.tuned.batch_size

    # -- jobs --------------------------------------------------------------------------------
    def _default_batch(self, rows: tuple[tuple[tuple[int, ...], str], ...]) -> int:
        row_bytes = sum(_prod(shape) * int(_np_dtype(dtype).itemsize) for shape, dtype in rows)
        return default_batch_size(row_bytes, self.plan.device, self.engine)

    def _submit(self, sources: list[Source], batch_size: int | None, out: Any) -> Job:
        rows = source_rows(sources)
        key = (batch_size or self.batch_size or self._default_batch(rows), rows)
        job = Job(self._next_job, key, sources, self.plan.workers, self._buffers)
        self._next_job += 1
        self._jobs[job.id] = job
        try:
            job.attach_outputs(self._output_spec(key), out)
        except BaseException:
            self._forget(job)
            raise
        self._queue.extend((job.id, i) for i in range(len(job.chunks)))
        return job

    def _output_spec(self, key: Key) -> Outputs:
        """What the model returns for inputs of this key: from warm-up, or asked of a worker."""
        if key not in self._outputs:
            self._run_until(lambda: any(w.ready for w in self._workers))
            worker = next(w for w in self._workers if w.ready)
            worker.conn.send(("probe", key))
            self._run_until(lambda: key in self._probed)
            outputs, error = self._probed.pop(key)
            if outputs is None:
                raise WorkerError(f"The model failed on inputs of this shape ({_describe_key(key)}).") from RemoteTraceback(
                    str(error)
                )
            self._outputs[key] = outputs
        return self._outputs[key]

    def _forget(self, job: Job) -> None:
        """Drop a finished, failed or abandoned job: workers detach, shared memory is unlinked."""
        if self._jobs.pop(job.id, None) is None:
            return
        if not job.finished:
            job.fail(FleetError("cancelled"))
        for w in self._workers:
            if job.id in w.jobs_seen and not w.dead:
                w.jobs_seen.discard(job.id)
                self._send(w, ("drop", job.id))
        job.release()

    # -- the supervisor loop ---------------------------------------------------------------
    def _run_until(self, done: Callable[[], bool], deadline: float | None = None) -> None:
        while not done():
            if self._broken is not None:
                raise self._broken
            self._dispatch()
            waitables: dict[Any, _Worker] = {}
            for w in self._workers:
                waitables[w.conn] = w
                waitables[w.process.sentinel] = w
            # With input rows still to copy into shared memory, copy a chunk and only peek at
            # the workers; otherwise sleep until one of them speaks or dies.
            copied = any(job.copy_ahead() for job in self._jobs.values())
            for obj in wait(list(waitables), timeout=0 if copied else _TICK_S):
                w = waitables[obj]
                if not w.dead:
                    self._drain(w)
                if not w.dead and obj is w.process.sentinel:
                    self._on_death(w, describe_exit(_exitcode(w)))
            self._check_deadlines(deadline)
        if self._broken is not None:
            raise self._broken

    def _dispatch(self) -> None:
        """Hand queued chunks to ready workers, least loaded first, up to PREFETCH each."""
        ready = sorted((w for w in self._workers if w.ready), key=lambda w: len(w.outstanding))
        for w in ready:
            while len(w.outstanding) < PREFETCH and self._queue:
                job_id, chunk = self._queue.popleft()
                job = self._jobs.get(job_id)
                if job is None or job.finished or chunk not in job.remaining:
                    continue
                if job_id not in w.jobs_seen:
                    w.jobs_seen.add(job_id)
                    self._send(w, ("job", job_id, job.spec))
                job.ready_to_send(chunk)
                lo, hi = job.chunks[chunk]
                w.outstanding.append((job_id, chunk))
                self._send(w, ("chunk", job_id, chunk, lo, hi))
            if not self._queue:
                return

    def _drain(self, w: _Worker) -> None:
        """Handle every message the worker has sent; a broken pipe or garbage means it is gone."""
        try:
            while w.conn.poll():
                self._handle(w, w.conn.recv())
        except (EOFError, OSError):
            self._on_death(w, describe_exit(_exitcode(w)))
        except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, ImportError, IndexError) as exc:
            w.process.kill()
            self._on_death(w, f"it sent a corrupt message ({type(exc).__name__}: {exc}) and was stopped")

    def _handle(self, w: _Worker, msg: tuple[Any, ...]) -> None:
        tag = msg[0]
        if tag == "done":
            _, job_id, chunk = msg
            w.outstanding.remove((job_id, chunk))
            job = self._jobs.get(job_id)
            if job is not None:
                job.chunk_done(chunk)
        elif tag == "error":
            _, job_id, chunk, exc_type, message, tb = msg
            w.outstanding.remove((job_id, chunk))
            job = self._jobs.get(job_id)
            if job is not None:
                lo, hi = job.chunks[chunk]
                error = WorkerError(
                    f"A worker (pid {w.process.pid}) raised {exc_type} while predicting rows {lo}:{hi}: {message}"
                )
                error.__cause__ = RemoteTraceback(tb)
                job.fail(error)
        elif tag == "ready":
            w.info = msg[1]
            if w.info is not None and w.info.warm_key is not None and w.info.warm_outputs is not None:
                self._outputs.setdefault(w.info.warm_key, w.info.warm_outputs)
        elif tag == "probed":
            self._probed[msg[1]] = (msg[2], msg[3])
        elif tag == "fatal":
            _, exc_type, message, tb = msg
            hint = ""
            if "Could not locate" in message or "Unknown layer" in message:
                hint = " Pass the class in custom_objects={'Name': Class}, defined in an importable module."
            elif "safe_mode" in message or "Lambda" in message:
                hint = " The model runs code from a Lambda layer; pass safe_mode=False only if you trust the file."
            fatal = ModelLoadError(f"The workers could not load the model {str(self._model.path)!r}: {exc_type}: {message}{hint}")
            fatal.__cause__ = RemoteTraceback(tb)
            self._broken = fatal
        else:
            raise ValueError(f"unknown message tag {tag!r}")

    def _on_death(self, w: _Worker, cause: str) -> None:
        """Requeue what the dead worker held, blame its oldest chunk, start a replacement."""
        if w.dead:
            return
        w.dead = True
        w.process.join(1.0)
        if w.process.is_alive():  # its pipe broke but it lingers: make sure it is gone
            w.process.kill()
            w.process.join(2.0)
        w.conn.close()
        self._workers.remove(w)
        if self._broken is not None or self._closed:
            return
        if w.info is None:
            self._start_failures += 1
            if self._start_failures > self.max_retries:
                self._broken = FleetError(
                    f"Worker processes keep dying while starting ({self._start_failures} times, last: {cause}). "
                    "Check that the backend imports in a fresh process and that memory suffices."
                )
                return
        for position, (job_id, chunk) in enumerate(w.outstanding):
            job = self._jobs.get(job_id)
            if job is None or job.finished:
                continue
            if position == 0:  # the chunk it was computing; the rest only waited behind it
                job.failures[chunk] += 1
                if job.failures[chunk] >= self.max_retries:
                    lo, hi = job.chunks[chunk]
                    job.fail(
                        WorkerCrashedError(
                            f"A worker died {job.failures[chunk]} times while predicting rows {lo}:{hi} "
                            f"(last: pid {w.process.pid}, {cause}). The same rows crash it every time: check them "
                            "for values the model cannot handle, or lower batch_size if memory runs out."
                        )
                    )
                    continue
        self._queue.extendleft(reversed(w.outstanding))
        w.outstanding.clear()
        self.restarts += 1
        self._spawn(w.slot)

    def _spawn(self, slot: WorkerSlot) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        env = worker_environment(slot, self.backend, bool(self.plan.gpus))
        process = self._ctx.Process(
            target=worker_entry, args=(child, env, slot.cpus, self._init), name=f"kerasfleet-worker-{slot.index}", daemon=True
        )
        with spawn_environment(env):
            process.start()
        child.close()
        self._workers.append(_Worker(slot, process, parent))

    def _send(self, w: _Worker, msg: tuple[Any, ...]) -> None:
        try:
            w.conn.send(msg)
        except (OSError, ValueError):
            pass  # it died; its sentinel tells the loop, which requeues its chunks

    def _check_deadlines(self, deadline: float | None) -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("Expected the fleet to be ready in time. Received: a timeout while waiting.")
        if not any(w.ready for w in self._workers) and time.monotonic() - self._started_at > self.start_timeout:
            self._broken = FleetError(f"No worker was ready after {self.start_timeout:.0f} s (start_timeout).")

    def _check_open(self) -> None:
        if self._closed:
            raise FleetClosedError("Cannot predict, as the fleet has been closed.")
        if self._broken is not None:
            raise FleetClosedError("Cannot predict, as the fleet is broken.") from self._broken
        if self._busy:
            raise RuntimeError(
                "A fleet serves one call at a time; this one is already busy (another thread, or an unfinished imap)."
            )


def _terminate_all(workers: list[_Worker], jobs: dict[int, Job], buffers: SharedBuffers, model: ModelFile) -> None:
    """Last-resort cleanup, also run by `close()`: no process, segment or temp file survives."""
    for w in workers:
        if w.process.is_alive():
            w.process.terminate()
    for w in workers:
        w.process.join(2.0)
        if w.process.is_alive():
            w.process.kill()
            w.process.join(2.0)
        try:
            w.conn.close()
        except OSError:
            pass
    workers.clear()
    for job in list(jobs.values()):
        job.release()
    jobs.clear()
    buffers.release()
    model.cleanup()


def _exitcode(w: _Worker) -> int | None:
    w.process.join(0.5)
    code = w.process.exitcode
    return int(code) if code is not None else None


def _check_batch_size(batch_size: Any) -> None:
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise InputError(f"Expected batch_size to be a positive int or None. Received: batch_size={batch_size!r}.")


def _describe_key(key: Key) -> str:
    return ", ".join(f"(rows, {', '.join(map(str, shape))}) {dtype}" for shape, dtype in key[1])


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _np_dtype(name: str) -> Any:
    import numpy as np

    try:
        return np.dtype(name)
    except TypeError:
        return np.dtype("float32")
