"""Dynamic batching: requests for one model merged into batches, run, and split back.

    handler --submit()--> queue --lane: form a batch--> executor thread --> split --> handlers
                             ^                                   (the next batch forms meanwhile)
                             '-- 503 at once when max_queue requests already wait

Everything but the model call runs on the server's event loop, so the queue needs no lock; each
lane (one for an in-process engine, two per worker for a fleet) forms a batch, hands it to a
thread and awaits it, and while it runs the requests that arrive wait in the queue: the next
batch forms while the current one runs. A batch the executor measured as quicker than that
hop (`inline_rows`: in-process, under `execution._INLINE_S` at warm-up) runs on the loop itself.

When to close a batch. Waiting for more rows costs latency, not waiting costs batch size. A
batch closes when it is full (`max_batch_size` rows), when its oldest request has waited
`max_delay_ms`, or as soon as no more requests can be expected: every client connection seen
in the last `_CLIENT_WINDOW_S` already has its request queued or running. With HTTP/1.1 a
connection sends its next request only after its answer, so one keep-alive client alone never
waits for a batch (its request runs at once), while 64 clients are merged into batches of up
to 64. A connection that went away (curl, or `requests.post` without a session, open one per
request) still counts as "may send" for that window: a request arriving within 0.25 s of
another client's may wait up to `max_delay_ms` for it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..engines import Outputs
from ..errors import FleetClosedError

_CLIENT_WINDOW_S = 0.25  # longer than a busy client's turnaround (25 ms at 64 clients x 32 rows)
_PRUNE_EVERY_S = 0.05


class Executor(Protocol):
    """Runs merged batches: in the server's process or on a fleet of workers."""

    description: str
    outputs: Outputs
    lanes: int  # batches it runs at once
    inline_rows: int  # batches of at most this many rows run on the event loop (0: never)

    def run(self, arrays: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        """Inputs in the signature's order (any rows) -> outputs in `outputs.specs` order."""

    def close(self) -> None: ...


class Overloaded(Exception):
    """The model's queue is full."""


class ShuttingDown(Exception):
    """The server stopped before this request's batch ran."""


@dataclass(eq=False)
class _Pending:
    arrays: list[np.ndarray[Any, Any]]
    rows: int
    future: asyncio.Future[list[np.ndarray[Any, Any]]]
    client: Hashable
    arrived: float = field(default_factory=time.perf_counter)
    waiting: bool = True  # counted in the batcher's depth and queued rows


class Clients:
    """Connections that may send a request soon: seen lately, none of their requests pending.

    Shared by every model's batcher: a client waiting on one model sends nothing to another.
    """

    def __init__(self) -> None:
        self._seen: dict[Hashable, float] = {}
        self._pending: dict[Hashable, int] = {}
        self._pruned = 0.0

    def arrived(self, client: Hashable) -> None:
        self._seen[client] = time.monotonic()
        self._pending[client] = self._pending.get(client, 0) + 1

    def answered(self, client: Hashable) -> None:
        left = self._pending.get(client, 1) - 1
        if left <= 0:
            self._pending.pop(client, None)
        else:
            self._pending[client] = left
        self._seen[client] = time.monotonic()

    def expected(self) -> int:
        """How many more requests may arrive before the current ones are answered."""
        now = time.monotonic()
        if now - self._pruned > _PRUNE_EVERY_S:
            self._pruned = now
            stale = [c for c, t in self._seen.items() if now - t > _CLIENT_WINDOW_S and c not in self._pending]
            for c in stale:
                del self._seen[c]
        return len(self._seen) - len(self._pending)


class Batcher:
    """One model's queue and lanes. Create it on the event loop that will serve its requests."""

    def __init__(
        self,
        executor: Executor,
        *,
        max_batch_size: int,
        max_delay_ms: float,
        max_queue: int,
        clients: Clients,
        on_batch: Callable[[int, float], None] | None = None,
        on_queued: Callable[[float], None] | None = None,
    ) -> None:
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1e3
        self.max_queue = max_queue
        self._clients = clients
        self._on_batch = on_batch
        self._on_queued = on_queued
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0  # rows of the requests still waiting (abandoned ones left out)
        self._waiting = 0
        self.broken: BaseException | None = None  # set when the executor can run nothing more
        self._wake = asyncio.Event()
        self._forming = asyncio.Lock()
        self._pool = ThreadPoolExecutor(max_workers=executor.lanes, thread_name_prefix="kerasfleet-batch")
        self._lanes = [asyncio.ensure_future(self._lane()) for _ in range(executor.lanes)]
        self.running = 0  # requests in batches being run

    @property
    def depth(self) -> int:
        """Requests waiting for a batch (abandoned ones not counted)."""
        return self._waiting

    def _leave(self, pending: _Pending) -> None:
        """`pending` no longer waits: taken into a batch, or abandoned (timed out)."""
        if pending.waiting:
            pending.waiting = False
            self._waiting -= 1
            self._queued_rows -= pending.rows

    async def submit(self, arrays: list[np.ndarray[Any, Any]], client: Hashable) -> list[np.ndarray[Any, Any]]:
        """Queue one request's rows; its outputs once its batch has run.

        Raises `Overloaded` at once when the queue is full. Cancelling the awaiting task (a
        timeout) takes the rows out of any batch not yet formed.
        """
        if self._waiting >= self.max_queue:
            raise Overloaded
        future: asyncio.Future[list[np.ndarray[Any, Any]]] = asyncio.get_running_loop().create_future()
        pending = _Pending(arrays, int(arrays[0].shape[0]), future, client)
        future.add_done_callback(lambda _: self._leave(pending))
        self._queue.append(pending)
        self._queued_rows += pending.rows
        self._waiting += 1
        self._clients.arrived(client)
        self._wake.set()
        try:
            return await future
        finally:
            self._clients.answered(client)

    async def close(self) -> None:
        """Stop the lanes (the server drained first), fail what still waits, stop the threads."""
        for lane in self._lanes:
            lane.cancel()
        await asyncio.gather(*self._lanes, return_exceptions=True)
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(ShuttingDown())
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown)

    # -- lanes -------------------------------------------------------------------------------
    async def _lane(self) -> None:
        while True:
            async with self._forming:
                batch = await self._form()
            try:
                await self._run(batch)
            except asyncio.CancelledError:
                _fail(batch, ShuttingDown())
                raise
            except BaseException as exc:  # noqa: BLE001 - a lane never dies: the batch fails, the lane goes on
                _fail(batch, exc)

    async def _run(self, batch: list[_Pending]) -> None:
        arrays = _merge(batch)
        rows = int(arrays[0].shape[0])
        started = time.perf_counter()
        if self._on_queued is not None:
            for p in batch:
                self._on_queued(started - p.arrived)
        self.running += len(batch)
        try:
            if rows <= self.executor.inline_rows:
                outputs = self.executor.run(arrays)  # quicker than the hop to a thread and back
            else:
                outputs = await asyncio.get_running_loop().run_in_executor(self._pool, self.executor.run, arrays)
        except FleetClosedError as exc:
            self.broken = exc  # its workers cannot start: nothing will run any more
            raise
        finally:
            self.running -= len(batch)
        if self._on_batch is not None:
            self._on_batch(rows, time.perf_counter() - started)
        lo = 0
        for p in batch:
            if not p.future.done():
                p.future.set_result([o[lo : lo + p.rows] for o in outputs])
            lo += p.rows

    async def _form(self) -> list[_Pending]:
        """Wait for a batch to be worth running (see the module docstring); take it off the queue."""
        while True:
            self._drop_abandoned()
            if self._queue:
                break
            self._wake.clear()
            await self._wake.wait()
        deadline = self._queue[0].arrived + self.max_delay
        while self._queued_rows < self.max_batch_size and self._clients.expected() > 0:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                break
        batch: list[_Pending] = []
        rows = 0
        while self._queue:
            head = self._queue[0]
            if head.future.done():  # abandoned while waiting: its rows are not run
                self._queue.popleft()
                continue
            if batch and rows + head.rows > self.max_batch_size:
                break
            self._queue.popleft()
            self._leave(head)
            batch.append(head)
            rows += head.rows
        if not batch:  # every waiting request timed out meanwhile
            return await self._form()
        return batch

    def _drop_abandoned(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()


def _fail(batch: list[_Pending], exc: BaseException) -> None:
    if not isinstance(exc, Exception) or isinstance(exc, StopIteration):  # what a future refuses to hold
        exc = RuntimeError(f"{type(exc).__name__}: {exc}")
    for p in batch:
        if not p.future.done():
            p.future.set_exception(exc)


def _merge(batch: list[_Pending]) -> list[np.ndarray[Any, Any]]:
    if len(batch) == 1:
        return batch[0].arrays
    return [np.concatenate(column) for column in zip(*(p.arrays for p in batch))]
