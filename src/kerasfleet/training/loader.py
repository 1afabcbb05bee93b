"""`kerasfleet.Loader`: a `PyDataset` whose batches are made in warm worker processes.

    model.fit(kerasfleet.Loader(dataset), epochs=10)

The dataset (a `keras.utils.PyDataset` or anything with `__len__` and `__getitem__(i)`) is
cloudpickled once and unpickled in each worker (or built there by an importable factory,
"module:function"); its `__getitem__` runs there, and the arrays come back through shared
memory. Keras's own `fit` stays the training loop: the Loader is itself a `PyDataset`, on every
backend, for `x=` and `validation_data=`.

Order. Batches stream in passes over the dataset: pass p yields `dataset[order_p[0]]`,
`dataset[order_p[1]]`, ... where `order_p` is 0..n-1, or with `shuffle=True` a permutation
drawn from (seed, p). Inside an epoch (between the `on_epoch_begin` and `on_epoch_end` Keras
calls) the k-th batch asked for is the stream's next one whatever index Keras passes: `fit`'s
own `shuffle=True` draws its permutation from Python's global `random` at the last moment, which
nothing could prefetch for, so the Loader owns the order (`Loader(shuffle=True, seed=...)`).
Outside an epoch, `loader[i]` is batch i of the current pass (Keras's TensorFlow backend reads
two batches this way to learn their shapes), and the batch Keras reads to build an unbuilt model
(`Trainer._symbolic_build`, on JAX and torch) is the stream's next one, left in place: neither
uses up a batch of the stream.

Prefetch: the next `prefetch` batches of the stream are always queued on the workers, across
pass boundaries. A dataset that defines `on_epoch_begin`/`on_epoch_end` (to reshuffle its
samples, say) has them called here, in the caller, as Keras calls them; its new state is then
pickled again and sent to the workers, and batches prefetched from the old state are dropped.

Failures: a worker that dies (SIGKILL, segfault) is replaced and its batches are made again
(same index, same seed: the same arrays); an exception in `__getitem__` reaches the caller as a
`WorkerError` naming the batch, with the worker's traceback as its cause.
"""

from __future__ import annotations

import secrets
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from types import FrameType
from typing import Any

import keras
import numpy as np

from ..errors import InputError, RemoteTraceback, WorkerError
from ..runtime import (
    REQUEUE,
    BufferSpec,
    Context,
    LocalWorker,
    SharedBuffers,
    Supervisor,
    WorkerInit,
    make_plan,
)
from ..runtime.plan import worker_environment
from ..runtime.worker import load_factory
from .batches import Packed, slot_bytes, unpack
from .loading import HANDLER, DatasetState, LoadBatch

# A slot holds a batch this much bigger than the first one (the last batch is smaller, others
# may vary a little); a bigger batch still arrives, pickled through the pipe.
_SLOT_HEADROOM = 1.25
_PAGE = 4096
# Frames above `__getitem__` / `on_epoch_begin` searched for Keras's model-building peek (4-8
# up): `Trainer._symbolic_build` (JAX, torch), `TensorFlowTrainer._maybe_symbolic_build`.
_PEEK_DEPTH = 24
_PEEK_FRAMES = frozenset({"_symbolic_build", "_maybe_symbolic_build"})


class _Ring:
    """Shared-memory slots for batches in flight, reused only when no worker can write them.

    Sized from the first batch; a bigger batch later (the first was the short last one, say)
    makes a new, bigger generation of slots: old ones still in use are never handed out again.
    """

    def __init__(self) -> None:
        self.buffers = SharedBuffers()
        self.lock = threading.Lock()
        self.slots: list[tuple[np.ndarray[Any, Any], BufferSpec]] = []
        self.free: list[int] = []
        self.size = 0
        self._current: set[int] = set()

    @property
    def sized(self) -> bool:
        return bool(self.slots)

    def allocate(self, count: int, nbytes: int) -> None:
        size = -(-int(nbytes * _SLOT_HEADROOM) // _PAGE) * _PAGE
        with self.lock:
            self.size = size
            self.free, self._current = [], set()
            for _ in range(count):
                array, spec, _segment = self.buffers.create((size,), np.uint8)
                self.slots.append((array, spec))
                self.free.append(len(self.slots) - 1)
                self._current.add(len(self.slots) - 1)

    def take(self) -> int | None:
        with self.lock:
            return self.free.pop() if self.free else None

    def give(self, slot: int | None) -> None:
        if slot is not None:
            with self.lock:
                if slot in self._current:
                    self.free.append(slot)

    def give_when_done(self, future: Future[Any], slot: int | None) -> None:
        """Free the slot once its task can no longer write it (it ended, or never started)."""
        if slot is not None:
            future.add_done_callback(lambda _f: self.give(slot))

    def array(self, slot: int | None) -> np.ndarray[Any, Any] | None:
        return None if slot is None else self.slots[slot][0]

    def spec(self, slot: int | None) -> BufferSpec | None:
        return None if slot is None else self.slots[slot][1]

    def release(self) -> None:
        self.buffers.release()


@dataclass
class _Pending:
    future: Future[Packed]
    slot: int | None


def _shutdown(supervisor: Supervisor, ring: _Ring) -> None:
    supervisor.close()
    ring.release()


class Loader(keras.utils.PyDataset):  # type: ignore[misc]
    """A `PyDataset` whose `__getitem__` runs in warm worker processes (see the module doc).

    | argument | meaning |
    | --- | --- |
    | `dataset` | a `keras.utils.PyDataset`, any object with `__len__` and `__getitem__(i)` returning `x`, `(x, y)` or `(x, y, sample_weight)` (arrays, dicts or lists of arrays), or "module:function" building one |
    | `workers` | worker processes (default: one per usable core) |
    | `prefetch` | batches queued ahead of the one Keras asks for (default: 2 per worker, at least 4) |
    | `shuffle` | a new batch order each pass over the dataset, drawn from (`seed`, pass) |
    | `seed` | fixes the shuffled orders, and seeds NumPy's and Python's global generators before each `dataset[i]` from (`seed`, pass, i): random augmentations repeat exactly, on any worker |
    | `threads_per_worker` | threads each worker's NumPy (and framework) may use |

    Close it (`close()`, or `with Loader(...) as loader:`) to stop its workers at once; an
    unreachable Loader closes itself when garbage-collected.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        workers: int | None = None,
        prefetch: int | None = None,
        shuffle: bool = False,
        seed: int | None = None,
        threads_per_worker: int = 1,
        start_timeout: float = 600.0,
    ) -> None:
        # workers=1 without multiprocessing: Keras reads the batches in its own loop and adds no
        # threads or processes of its own on top of ours.
        super().__init__(workers=1, use_multiprocessing=False)
        if not isinstance(shuffle, bool):
            raise InputError(f"Expected shuffle to be True or False. Received: shuffle={shuffle!r}.")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise InputError(f"Expected seed to be a non-negative int or None. Received: seed={seed!r}.")
        if prefetch is not None and (not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 1):
            raise InputError(f"Expected prefetch to be a positive int or None. Received: prefetch={prefetch!r}.")
        self._dataset, state = _resolve(dataset)
        self._n = _length(self._dataset)
        plan = make_plan(workers, threads_per_worker, devices="cpu")
        self.plan = plan
        self._window = prefetch if prefetch is not None else max(4, 2 * plan.workers)
        self._shuffle = shuffle
        self._seed = seed if seed is not None else secrets.randbits(32)
        self._seed_batches = seed is not None
        self._hooks = _overridden_hooks(self._dataset)
        backend = keras.backend.backend()
        init = WorkerInit(HANDLER, None)
        self._supervisor = Supervisor(
            lambda slot: LocalWorker(slot, init, worker_environment(slot, backend)),
            plan.slots,
            start_timeout=start_timeout,
            name="kerasfleet-loader",
        )
        self._ring = _Ring()
        self._finalizer = weakref.finalize(self, _shutdown, self._supervisor, self._ring)
        self._lock = threading.RLock()
        self._state = state
        self._context = Context(state, label="dataset")
        self._orders: dict[int, np.ndarray[Any, Any]] = {}
        self._pass = 0  # passes completed
        self._k = 0  # batches of the current pass handed out
        self._in_epoch = False
        self._peek_epoch = False
        self._replayed: tuple[str, ...] = ()  # hooks a factory-built dataset has run, in order
        self._pending: dict[int, _Pending] = {}  # stream position -> its task
        self._fill()

    # -- PyDataset ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> Any:
        with self._lock:
            self._check_open()
            if not self._in_epoch:
                return self._random_access(index)
            position = self._pass * self._n + self._k
            if self._peek_epoch or _keras_build_peek():
                # Keras reads one batch to build an unbuilt model, then starts the epoch over:
                # that read must not use up the stream's next batch.
                return self._read(position)
            pending = self._pending.pop(position, None) or self._submit(position)
            self._k += 1
            if self._k == self._n:
                self._pass, self._k = self._pass + 1, 0
                self._orders.pop(self._pass - 2, None)
            self._fill()  # the workers stay busy while this batch is copied out
            return self._collect(pending)

    def on_epoch_begin(self) -> None:
        with self._lock:
            self._check_open()
            self._in_epoch = True
            # The "epoch" Keras opens to read one batch and build an unbuilt model (then
            # closes): on TensorFlow with a strategy that read comes from a tf.data thread, so
            # it is recognised here, where Keras opens it, not only in __getitem__.
            self._peek_epoch = _keras_build_peek()
            self._hook("on_epoch_begin")

    def on_epoch_end(self) -> None:
        with self._lock:
            self._check_open()
            self._in_epoch = False
            self._peek_epoch = False
            self._hook("on_epoch_end")

    def batch_order(self, pass_: int) -> list[int]:
        """The dataset indices pass `pass_` (0, 1, ...) over the dataset yields, in order."""
        order = self._order(pass_)
        return list(range(self._n)) if order is None else [int(i) for i in order]

    # -- lifetime ----------------------------------------------------------------------------
    def wait_ready(self, timeout: float | None = None) -> Loader:
        """Block until every worker has started (they start in the background); returns self."""
        self._supervisor.wait_ready(timeout)
        return self

    @property
    def workers_info(self) -> list[dict[str, Any]]:
        """pid, cores and readiness of each loader worker."""
        return self._supervisor.workers()

    @property
    def restarts(self) -> int:
        """Workers replaced after they died."""
        return self._supervisor.restarts

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Stop the workers and free the shared memory (idempotent)."""
        self._finalizer()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.plan.workers} workers"
        return f"Loader({type(self._dataset).__name__}, {self._n} batches, {state}, shuffle={self._shuffle})"

    # -- internals ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise InputError("Expected an open Loader. Received: a closed one (close() was called); create a new Loader.")

    def _order(self, pass_: int) -> np.ndarray[Any, Any] | None:
        if not self._shuffle:
            return None
        order = self._orders.get(pass_)
        if order is None:
            order = np.random.default_rng([self._seed, pass_]).permutation(self._n)
            self._orders[pass_] = order
        return order

    def _index(self, position: int) -> tuple[int, int]:
        """(pass, dataset index) of a stream position."""
        pass_, k = divmod(position, self._n)
        order = self._order(pass_)
        return pass_, int(order[k]) if order is not None else k

    def _submit(self, position: int, slot: bool = True) -> _Pending:
        pass_, index = self._index(position)
        seed = int(np.random.SeedSequence([self._seed, pass_, index]).generate_state(1)[0]) if self._seed_batches else None
        taken = self._ring.take() if slot else None
        future = self._supervisor.submit(
            LoadBatch(self._context.id, index, seed, self._ring.spec(taken)),
            context=self._context,
            retry=REQUEUE,
            label=f"loading batch {index} (dataset[{index}])",
        )
        return _Pending(future, taken)

    def _fill(self) -> None:
        start = self._pass * self._n + self._k
        for position in range(start, start + self._window):
            if position not in self._pending:
                self._pending[position] = self._submit(position)

    def _collect(self, pending: _Pending) -> Any:
        try:
            packed = pending.future.result()
        except WorkerError as exc:
            self._ring.give_when_done(pending.future, pending.slot)
            cause = exc.__cause__
            if isinstance(cause, RemoteTraceback):
                # Keras's traceback filter re-raises `from None` inside fit, dropping the
                # cause: the worker's traceback goes in the message too.
                raise type(exc)(f"{exc}\nThe worker's traceback:\n{cause.tb}") from cause
            raise
        except BaseException:
            self._ring.give_when_done(pending.future, pending.slot)
            raise
        try:
            batch = unpack(packed, self._ring.array(pending.slot))
        finally:
            self._ring.give(pending.slot)
        if packed.inline is not None and all(a.dtype.kind in "biufc" for a in packed.inline):
            nbytes = slot_bytes(list(packed.inline))
            if nbytes > self._ring.size:
                # The first batch (or a bigger one than the slots hold) tells the size: from
                # now on batches come through shared memory.
                self._ring.allocate(self._window + 2, nbytes)
        return batch

    def _random_access(self, index: int) -> Any:
        if not isinstance(index, (int, np.integer)) or not -self._n <= index < self._n:
            raise IndexError(f"Expected a batch index in [0, {self._n}). Received: {index!r}.")
        return self._read(self._pass * self._n + int(index) % self._n)

    def _read(self, position: int) -> Any:
        """The batch at a stream position, without using it up."""
        pending = self._pending.get(position)
        if pending is not None:
            # Already on its way for the stream: read it and leave it there (its slot stays
            # held, so the copy read here and the one the stream reads later are the same).
            return unpack(pending.future.result(), self._ring.array(pending.slot))
        return self._collect(self._submit(position, slot=False))

    def _hook(self, name: str) -> None:
        """Run the dataset's epoch hook here; if it defines one, the workers get the new state."""
        hook = getattr(self._dataset, name, None)
        if callable(hook):
            hook()
        if name not in self._hooks:
            return
        if self._state.factory is not None:
            # Built by a factory (often because it does not pickle): each worker rebuilds it
            # and replays the hooks run so far, in order.
            self._replayed += (name,)
            state = DatasetState(None, self._state.factory, self._replayed)
        else:
            import cloudpickle

            state = DatasetState(_pickle(self._dataset, cloudpickle.dumps), None)
        old, self._context = self._context, Context(state, label="dataset")
        for pending in self._pending.values():
            pending.future.cancel()  # queued ones are dropped; running ones finish unread
            self._ring.give_when_done(pending.future, pending.slot)
        self._pending.clear()
        self._supervisor.close_context(old)
        self._fill()


def _keras_build_peek() -> bool:
    """Whether Keras calls from its model-building look at one batch's shapes."""
    frame: FrameType | None = sys._getframe(2)
    for _ in range(_PEEK_DEPTH):
        if frame is None:
            return False
        if frame.f_code.co_name in _PEEK_FRAMES:
            return True
        frame = frame.f_back
    return False


def _resolve(dataset: Any) -> tuple[Any, DatasetState]:
    """The dataset (built here too when given as a factory) and how workers get their copy."""
    if isinstance(dataset, str):
        module, _, name = dataset.partition(":")
        if not module or not name:
            raise InputError(f"Expected a dataset object or an importable factory 'module:function'. Received: {dataset!r}.")
        try:
            factory: Callable[[], Any] = load_factory(dataset)
        except (ImportError, AttributeError) as exc:
            raise InputError(
                f"Expected an importable factory 'module:function'. Received: {dataset!r} ({type(exc).__name__}: {exc}). "
                "Run from the folder that holds the module, or pass the dataset object itself."
            ) from exc
        built = factory()
        _check_protocol(built, f"what {dataset!r} returned")
        return built, DatasetState(None, dataset)
    _check_protocol(dataset, "dataset")
    import cloudpickle

    return dataset, DatasetState(_pickle(dataset, cloudpickle.dumps), None)


def _check_protocol(dataset: Any, what: str) -> None:
    missing = [m for m in ("__len__", "__getitem__") if not hasattr(dataset, m)]
    if missing:
        raise InputError(
            f"Expected {what} to be a keras.utils.PyDataset or an object with __len__ and __getitem__(i) "
            f"returning x, (x, y) or (x, y, sample_weight). Received: {type(dataset).__name__} without {', '.join(missing)}."
        )


def _length(dataset: Any) -> int:
    try:
        n = len(dataset)
    except TypeError as exc:
        raise InputError(f"Expected a dataset with a length (its number of batches). Received: {exc}.") from exc
    if n < 1:
        raise InputError(f"Expected a dataset with at least one batch. Received: len(dataset) == {n}.")
    return int(n)


def _pickle(dataset: Any, dumps: Callable[[Any], bytes]) -> bytes:
    try:
        return dumps(dataset)
    except Exception as exc:
        raise InputError(
            f"Expected a dataset that pickles (with cloudpickle), so that each worker gets a copy. Received: "
            f"{type(dataset).__name__}, which does not ({type(exc).__name__}: {exc}). Open files, locks or "
            "generators should be created lazily inside __getitem__; or pass 'module:function', a factory each "
            "worker calls."
        ) from exc


def _overridden_hooks(dataset: Any) -> set[str]:
    """Epoch hooks the dataset defines with a body of its own (the base class's do nothing)."""
    found = set()
    for name in ("on_epoch_begin", "on_epoch_end"):
        method = getattr(type(dataset), name, None)
        if method is not None and method is not getattr(keras.utils.PyDataset, name, None):
            found.add(name)
    return found
