"""The task supervisor: one thread that owns the workers; any thread submits tasks.

    any caller thread                 supervisor thread                          workers
    ─────────────────                 ─────────────────                          ───────
    submit(payload) -> Future ──► inbox ─► queue ─► _dispatch: ≤ PREFETCH each ──► Call
    close_context(ctx)        ──► inbox ─► Detach to every worker that attached it
    future.result()  ◄── set_result ◄── _drain: Done / Failed / Ready / Fatal ◄──── replies
                                       wait(pipes, stderr, pidfds, wake pipe, deadlines)
                                       a worker dies ─► _on_death: requeue or fail its
                                       tasks by their RetryPolicy, start a replacement

Work is pulled: a worker holds at most PREFETCH calls (one running, one waiting, so it never
idles on a round trip), and the supervisor knows exactly which tasks each worker holds, which
makes requeueing after a crash exact. Only this thread touches workers, so there is no lock
around them; callers talk to it through the inbox (a deque, appended atomically) and a wake-up
pipe, and it answers through `concurrent.futures.Future`s.

Deadlines: a task with `timeout` goes only to an idle worker, which gets nothing else while it
runs; past `dispatch + timeout` the worker is killed (SIGKILL) and replaced, and the task fails
with `TaskTimeoutError`. An `exclusive` task gets the same treatment without a deadline (a sweep
trial: minutes long, it must not wait behind another while a worker idles). Every worker has
its own start deadline: a worker not ready `start_timeout` seconds after it was started is
killed and counts as a start failure, so a fleet that has run for hours still replaces a
worker that dies.

Recycling: `retire(pid)` replaces a worker once it holds nothing (after N sweep trials, or when
its memory grew): it gets no new task, is sent `Stop` when idle and ready, and its exit starts a
replacement like a death would, but fails nothing and counts in `retired`, not `restarts`.
"""

from __future__ import annotations

import itertools
import os
import pickle
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

from ..errors import (
    FleetClosedError,
    FleetError,
    RemoteTraceback,
    TaskTimeoutError,
    WorkerCrashedError,
    WorkerError,
    WorkerStartError,
)
from .handles import WorkerHandle
from .plan import WorkerSlot
from .protocol import Attach, Call, Detach, Done, Failed, Fatal, Ready, RemoteError, Stop

# Calls a worker holds at once: one it runs, one waiting, so it never idles on a round trip;
# more would make requeueing after a crash and load balancing coarser.
PREFETCH = 2
# Longest sleep without news: bounds how late a start deadline is noticed (task deadlines
# set the wait's timeout exactly).
_TICK_S = 1.0
# How long close() waits for idle workers to exit on their own before killing them (and how
# long a retired worker may take to exit after its Stop).
_STOP_GRACE_S = 3.0


@dataclass(frozen=True)
class RetryPolicy:
    """What a worker's death means for the task it was running.

    `requeue=True`: run it again on another worker, up to `max_deaths` deaths in all, then fail
    with `WorkerCrashedError` (predict chunks: the same rows crashing three times are poison).
    `requeue=False`: fail at the first death and go on (sweep trials: record the failure).
    Tasks that were only waiting behind the running one are always requeued.
    """

    requeue: bool = True
    max_deaths: int = 3


REQUEUE = RetryPolicy()
RECORD = RetryPolicy(requeue=False, max_deaths=1)


class Context:
    """State workers attach once and share between tasks (e.g. a job's shared buffers)."""

    _ids = itertools.count()

    def __init__(self, payload: Any, label: str = "") -> None:
        self.id = next(Context._ids)
        self.payload = payload
        self.label = label
        self.closed = False


class _Task:
    __slots__ = (
        "id",
        "payload",
        "context",
        "retry",
        "timeout",
        "exclusive",
        "on_start",
        "future",
        "label",
        "deaths",
        "deadline",
        "started",
        "end",
    )

    def __init__(
        self,
        task_id: int,
        payload: Any,
        context: Context | None,
        retry: RetryPolicy,
        timeout: float | None,
        label: str,
        exclusive: bool = False,
        on_start: Callable[[int | None], None] | None = None,
    ) -> None:
        self.id = task_id
        self.payload = payload
        self.context = context
        self.retry = retry
        self.timeout = timeout
        # A task with a deadline is always alone on its worker: killing the worker at the
        # deadline must not take a task waiting behind it down too.
        self.exclusive = exclusive or timeout is not None
        self.on_start = on_start
        self.label = label
        self.future: Future[Any] = Future()
        self.deaths = 0
        self.deadline: float | None = None
        self.started = False
        self.end: str | None = None  # why its worker was killed: "timeout" or "cancel"


class _Worker:
    def __init__(self, handle: WorkerHandle, start_deadline: float) -> None:
        self.handle = handle
        self.slot: WorkerSlot = handle.slot
        self.outstanding: dict[int, _Task] = {}  # in dispatch order: the first one is running
        self.attached: set[int] = set()
        self.ready = False
        self.dead = False
        self.info: dict[str, Any] = {}
        self.start_deadline = start_deadline
        self.kill_reason: str | None = None
        self.retiring = False  # retire(pid): no new task; Stop once it holds nothing
        self.stop_deadline: float | None = None  # set when a retiring worker was sent Stop

    @property
    def exclusive(self) -> bool:
        return any(t.exclusive for t in self.outstanding.values())


class Supervisor:
    """Runs tasks on a set of workers from one background thread.

    | argument | meaning |
    | --- | --- |
    | `spawn` | `slot -> WorkerHandle`: starts one worker (a local process, later a Ray actor) |
    | `slots` | one per worker: its cores and GPU |
    | `start_timeout` | seconds each worker may take to become ready |
    | `max_start_failures` | workers dying (or timing out) while starting, in a row, before the supervisor gives up |
    | `on_fatal` | `RemoteError -> exception` for a worker that could not build its handler |
    | `on_ready` | called (in the supervisor thread) with each worker's `Ready.info` |
    """

    def __init__(
        self,
        spawn: Callable[[WorkerSlot], WorkerHandle],
        slots: tuple[WorkerSlot, ...],
        *,
        start_timeout: float = 600.0,
        max_start_failures: int = 3,
        on_fatal: Callable[[RemoteError], BaseException] | None = None,
        on_ready: Callable[[dict[str, Any]], None] | None = None,
        name: str = "kerasfleet-supervisor",
    ) -> None:
        self._spawn_handle = spawn
        self._slots = slots
        self.start_timeout = start_timeout
        self.max_start_failures = max_start_failures
        self._on_fatal = on_fatal or (lambda e: FleetError(f"A worker could not start: {e.type_name}: {e.message}"))
        self._on_ready = on_ready
        self._ids = itertools.count()
        self._inbox: deque[tuple[str, Any]] = deque()
        self._queue: deque[_Task] = deque()
        self._workers: list[_Worker] = []
        self._unstarted: list[WorkerSlot] = []  # slots whose worker could not be started yet
        self._by_obj: dict[Any, _Worker] = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_lock = threading.Lock()  # the pipe is closed at shutdown: never write to a reused fd
        self._state = threading.Condition()
        self._broken: BaseException | None = None
        self._closing = False
        self._start_failures = 0
        self.restarts = 0
        self.retired = 0
        self.tasks_done = 0
        self._snapshot: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    # -- any thread --------------------------------------------------------------------------
    def submit(
        self,
        payload: Any,
        *,
        context: Context | None = None,
        retry: RetryPolicy = REQUEUE,
        timeout: float | None = None,
        label: str = "",
        exclusive: bool = False,
        on_start: Callable[[int | None], None] | None = None,
    ) -> Future[Any]:
        """Queue a task; its future gets the worker's result or the error that ended it.

        `exclusive`: run it only on an idle worker, which gets nothing else meanwhile (implied
        by `timeout`). `on_start(pid)` is called, in the supervisor thread (keep it short), each
        time the task is handed to a worker.
        """
        self._check_usable()
        if timeout is not None and not timeout > 0:
            raise ValueError(f"Expected timeout to be a positive number of seconds or None. Received: timeout={timeout!r}.")
        task = _Task(next(self._ids), payload, context, retry, timeout, label or type(payload).__name__, exclusive, on_start)
        self._post("task", task)
        return task.future

    def retire(self, pid: int) -> None:
        """Replace the worker `pid` once it holds no task (a pid no longer in the fleet is ignored).

        It gets no new task; when it is idle it is sent `Stop`, and its exit starts a
        replacement on its slot. What it holds finishes normally.
        """
        self._post("retire", pid)

    def cancel(self, future: Future[Any]) -> bool:
        """Cancel a task: a queued one is dropped; a running one's worker is killed and replaced."""
        if future.cancel():
            return True
        if future.done():
            return False
        self._post("cancel", future)
        return True

    def close_context(self, context: Context) -> None:
        """Workers detach the context; its queued tasks are dropped."""
        context.closed = True
        if not self._closing:
            self._post("detach", context)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every worker has reported ready (raises if the supervisor broke)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._state:
            while True:
                if self._broken is not None:
                    raise self._broken  # what broke it: ModelLoadError, WorkerStartError, ...
                self._check_usable()
                if self._snapshot and all(w["ready"] for w in self._snapshot):
                    return
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"Expected every worker to be ready within {timeout} s. Received: {self._snapshot}.")
                self._state.wait(left if left is not None else 1.0)

    def workers(self) -> list[dict[str, Any]]:
        """pid, ready, cores and GPU of each live worker (a snapshot)."""
        with self._state:
            return [dict(w) for w in self._snapshot]

    @property
    def broken(self) -> BaseException | None:
        return self._broken

    @property
    def closed(self) -> bool:
        return self._closing

    def close(self, timeout: float = 10.0) -> None:
        """Stop every worker (idle ones gracefully, busy ones killed); fail what is left."""
        if self._closing:
            return
        self._closing = True  # the loop ends at its next round
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _post(self, op: str, item: Any) -> None:
        self._inbox.append((op, item))
        if self._closing or self._broken is not None:
            # The loop may have finished already: nobody would answer this future.
            self._fail_inbox()
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass  # the pipe is full: the loop wakes anyway

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise FleetClosedError("Cannot run tasks, as the fleet is broken.") from self._broken
        if self._closing:
            raise FleetClosedError("Cannot run tasks, as the fleet has been closed.")

    # -- the supervisor thread ---------------------------------------------------------------
    def _main(self) -> None:
        try:
            for slot in self._slots:
                self._spawn(slot)
            while self._broken is None and not self._closing:
                self._take_inbox()
                for slot in [self._unstarted.pop() for _ in range(len(self._unstarted))]:
                    self._spawn(slot)
                self._dispatch()
                # What each ready object means is looked up in the index of when wait() was
                # called: a death handled in this batch closes descriptors whose numbers the
                # replacement may reuse at once.
                index = self._by_obj
                for obj in wait([self._wake_r, *index], self._timeout()):
                    self._service(obj, index.get(obj))
                self._check_deadlines()
        except BaseException as exc:  # noqa: BLE001 - the thread must never die silently
            self._break(FleetError(f"The supervisor thread failed: {type(exc).__name__}: {exc}"))
        finally:
            self._shutdown()

    def _take_inbox(self) -> None:
        while self._inbox:
            try:
                op, item = self._inbox.popleft()
            except IndexError:
                return  # a caller failing the inbox after close took it
            if op == "task":
                self._queue.append(item)
            elif op == "detach":
                for w in self._workers:
                    if item.id in w.attached:
                        w.attached.discard(item.id)
                        self._send(w, Detach(item.id))
            elif op == "cancel":
                self._cancel_running(item)
            elif op == "retire":
                for w in self._workers:
                    if w.handle.pid == item and not w.dead and not w.retiring:
                        w.retiring = True
                        self._stop_if_retired(w)
                        self._publish()

    def _cancel_running(self, future: Future[Any]) -> None:
        for w in self._workers:
            for position, task in enumerate(w.outstanding.values()):
                if task.future is future and not w.dead:
                    if position > 0:
                        # Only waiting behind the running task: its reply will be dropped; the
                        # running task must not pay for it.
                        _fail(future, CancelledError(f"{task.label} was cancelled"))
                        return
                    task.end = "cancel"
                    w.kill_reason = f"its task ({task.label}) was cancelled"
                    w.handle.kill()
                    return
        for task in self._queue:
            if task.future is future:
                self._queue.remove(task)
                _fail(future, CancelledError(f"{task.label} was cancelled"))
                return

    def _timeout(self) -> float:
        now = time.monotonic()
        soonest = now + _TICK_S
        for w in self._workers:
            if w.kill_reason is not None:
                continue  # killed: its pidfd says when it is gone
            if not w.ready:
                soonest = min(soonest, w.start_deadline)
            if w.stop_deadline is not None:
                soonest = min(soonest, w.stop_deadline)
            for task in w.outstanding.values():
                if task.deadline is not None and task.end is None:
                    soonest = min(soonest, task.deadline)
        return max(0.0, soonest - now)

    def _dispatch(self) -> None:
        """Hand queued tasks to ready workers, one each per round, least loaded first, up to
        PREFETCH each: a worker's second call only waits behind its first when every worker
        already has one."""
        while self._queue:
            room = sorted(
                (
                    w
                    for w in self._workers
                    if w.ready and not w.dead and not w.retiring and not w.exclusive and len(w.outstanding) < PREFETCH
                ),
                key=lambda w: len(w.outstanding),
            )
            if not room:
                return
            handed = False
            for w in room:
                task = self._next_task(idle=not w.outstanding)
                if task is None:
                    continue
                if not self._start_task(w, task):
                    return  # the worker is gone; its death requeues the task
                handed = True
            if not handed:
                return

    def _next_task(self, idle: bool) -> _Task | None:
        """The first queued task that may start now (one with a deadline needs an idle worker)."""
        while self._queue:
            task = self._queue[0]
            if task.exclusive and not idle:
                return None
            self._queue.popleft()
            if task.future.done() or (not task.started and not task.future.set_running_or_notify_cancel()):
                continue  # cancelled while queued
            task.started = True
            if task.context is not None and task.context.closed:
                _fail(task.future, CancelledError(f"{task.label}: its job was closed"))
                continue
            return task
        return None

    def _start_task(self, w: _Worker, task: _Task) -> bool:
        w.outstanding[task.id] = task
        if task.timeout is not None:
            task.deadline = time.monotonic() + task.timeout
        try:
            if task.context is not None and task.context.id not in w.attached:
                w.handle.send(Attach(task.context.id, task.context.payload))
                w.attached.add(task.context.id)
            w.handle.send(Call(task.id, task.payload))
        except (OSError, ValueError):
            return False  # the worker is gone
        except Exception as exc:  # noqa: BLE001 - this task's payload does not pickle: fail it alone
            w.outstanding.pop(task.id, None)
            _fail(
                task.future,
                FleetError(f"Expected a task payload that pickles. Received: {task.label}: {type(exc).__name__}: {exc}"),
            )
            return True
        if task.on_start is not None:
            task.on_start(w.handle.pid)
        return True

    def _service(self, obj: Any, w: _Worker | None) -> None:
        if w is None:
            if obj == self._wake_r:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            return
        if w.dead:
            return
        what = w.handle.classify(obj)
        if what == "messages":
            self._drain(w)
        elif what == "death":
            self._drain(w)  # it may have answered just before it died
            self._on_death(w, w.kill_reason or w.handle.describe_exit())
        else:
            w.handle.service(obj)
            if obj not in w.handle.waitables():  # e.g. its stderr reached EOF: stop watching it
                self._index()

    def _drain(self, w: _Worker) -> None:
        """Handle every message the worker has sent; a broken pipe or garbage means it is gone."""
        try:
            while not w.dead and w.handle.poll():
                self._handle(w, w.handle.recv())
        except (EOFError, OSError):
            self._on_death(w, w.kill_reason or w.handle.describe_exit())
        except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, ImportError, IndexError) as exc:
            w.handle.kill()
            self._on_death(w, f"it sent a corrupt message ({type(exc).__name__}: {exc}) and was stopped")

    def _handle(self, w: _Worker, msg: Any) -> None:
        kind = type(msg)
        if kind is Done or kind is Failed:
            task = w.outstanding.pop(msg.task_id, None)
            if task is None:
                return
            self.tasks_done += 1
            if kind is Done:
                if not task.future.done():
                    task.future.set_result(msg.result)
            else:
                error = WorkerError(
                    f"A worker (pid {w.handle.pid}) raised {msg.error.type_name} while {task.label}: {msg.error.message}"
                )
                _fail(task.future, error, RemoteTraceback(msg.error.traceback))
            self._stop_if_retired(w)
        elif kind is Ready:
            w.ready = True
            w.info = msg.info
            self._start_failures = 0
            if self._on_ready is not None:
                self._on_ready(msg.info)
            self._publish()
            self._stop_if_retired(w)  # retired while it was starting
        elif kind is Fatal:
            exc = self._on_fatal(msg.error)
            exc.__cause__ = RemoteTraceback(msg.error.traceback)
            self._break(exc)
        else:
            raise ValueError(f"unknown message {kind.__name__}")

    def _on_death(self, w: _Worker, cause: str) -> None:
        """Requeue or fail what the dead worker held, by each task's policy; start a replacement.

        The replacement is started before any future is failed: a caller woken by the failure
        then already sees the new worker (e.g. in `wait_ready`).
        """
        if w.dead:
            return
        w.dead = True
        w.handle.kill()
        tail = w.handle.stderr_tail()
        w.handle.close()
        self._workers.remove(w)
        if self._closing or self._broken is not None:
            self._index()
            error = self._broken or FleetClosedError("The fleet was closed before this task finished.")
            for task in w.outstanding.values():
                _fail(task.future, error)
            return
        if not w.ready:
            self._start_failures += 1
            if self._start_failures > self.max_start_failures:
                self._index()
                self._queue.extendleft(reversed(list(w.outstanding.values())))  # failed by the shutdown
                self._break(
                    WorkerStartError(
                        f"Worker processes keep dying while starting ({self._start_failures} times, last: {cause}). "
                        "Check that the backend imports in a fresh process and that memory suffices."
                        + (f"\nLast lines of the worker's stderr:\n{tail}" if tail else "\nThe worker wrote nothing to stderr.")
                    )
                )
                return
        requeue: list[_Task] = []
        failures: list[tuple[_Task, BaseException]] = []
        for position, task in enumerate(w.outstanding.values()):
            if task.future.done():
                continue
            if task.end == "timeout":
                message = f"{task.label} ran past its {task.timeout:g} s deadline; its worker (pid {w.handle.pid}) was killed and replaced."
                failures.append((task, TaskTimeoutError(message)))
            elif task.end == "cancel":
                failures.append((task, CancelledError(f"{task.label} was cancelled; its worker was killed and replaced")))
            elif position == 0:  # the task it was running; the rest only waited behind it
                task.deaths += 1
                if not task.retry.requeue or task.deaths >= task.retry.max_deaths:
                    times = "once" if task.deaths == 1 else f"{task.deaths} times"
                    hint = (
                        " The same task crashes it every time: check its rows for values the model cannot handle, "
                        "or lower batch_size if memory runs out."
                        if task.deaths > 1
                        else ""
                    )
                    failures.append(
                        (
                            task,
                            WorkerCrashedError(
                                f"A worker died {times} while {task.label} (last: pid {w.handle.pid}, {cause}).{hint}"
                            ),
                        )
                    )
                else:
                    requeue.append(task)
            else:
                requeue.append(task)
        self._queue.extendleft(reversed(requeue))
        if w.ready and not (w.retiring and w.stop_deadline is not None):
            self.restarts += 1  # a retired worker's exit is not a restart
        self._spawn(w.slot)
        for task, error in failures:
            _fail(task.future, error)

    def _spawn(self, slot: WorkerSlot) -> None:
        try:
            handle = self._spawn_handle(slot)
        except Exception as exc:  # noqa: BLE001 - OSError (no processes, descriptors), pickling the init
            # Out of processes or descriptors, perhaps for a moment: try again next round.
            self._start_failures += 1
            if self._start_failures > self.max_start_failures:
                self._break(WorkerStartError(f"Expected to start a worker process. Received: {type(exc).__name__}: {exc}."))
            else:
                self._unstarted.append(slot)
            self._index()
            return
        self._workers.append(_Worker(handle, time.monotonic() + self.start_timeout))
        self._index()

    def _index(self) -> None:
        self._by_obj = {obj: w for w in self._workers for obj in w.handle.waitables()}
        self._publish()

    def _publish(self) -> None:
        with self._state:
            self._snapshot = [
                {"pid": w.handle.pid, "ready": w.ready, "cpus": list(w.slot.cpus), "gpu": w.slot.gpu, "retiring": w.retiring}
                for w in self._workers
            ]
            self._state.notify_all()

    def _stop_if_retired(self, w: _Worker) -> None:
        """A retiring worker that holds nothing is told to stop; its exit starts a replacement."""
        if w.retiring and w.ready and not w.outstanding and w.stop_deadline is None and not w.dead:
            self.retired += 1
            w.stop_deadline = time.monotonic() + _STOP_GRACE_S
            self._send(w, Stop())

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for w in self._workers:
            if w.dead:
                continue
            if w.stop_deadline is not None and now > w.stop_deadline and w.kill_reason is None:
                w.kill_reason = f"retired, it did not exit within {_STOP_GRACE_S:g} s of its Stop"
                w.handle.kill()
            if not w.ready and now > w.start_deadline and w.kill_reason is None:
                w.kill_reason = f"not ready after {self.start_timeout:g} s (start_timeout)"
                w.handle.kill()
            for task in w.outstanding.values():
                if task.deadline is not None and now > task.deadline and task.end is None:
                    task.end = "timeout"
                    w.kill_reason = f"its task ({task.label}) ran past its {task.timeout:g} s deadline"
                    w.handle.kill()

    def _send(self, w: _Worker, msg: Any) -> None:
        try:
            w.handle.send(msg)
        except (OSError, ValueError):
            pass  # it died; its sentinel tells the loop, which requeues its tasks

    def _break(self, exc: BaseException) -> None:
        if self._broken is None:
            self._broken = exc
        with self._state:
            self._state.notify_all()

    def _fail_inbox(self) -> None:
        """Fail every task still in the inbox (the loop has ended or is ending)."""
        reason = self._broken
        while True:
            try:
                op, item = self._inbox.popleft()
            except IndexError:
                return
            if op == "task":
                _fail(item.future, reason or FleetClosedError("Cannot run tasks, as the fleet has been closed."))

    def _shutdown(self) -> None:
        """Stop idle workers gracefully, kill busy ones, fail every task left."""
        busy = [w for w in self._workers if w.outstanding or not w.ready]
        for w in self._workers:
            if w in busy:
                w.handle.kill()
            else:
                self._send(w, Stop())
        deadline = time.monotonic() + _STOP_GRACE_S
        for w in self._workers:
            while w.handle.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
            w.handle.close()  # kills it if it is still there
        # What broke the fleet (a model that cannot load, workers that cannot start) is what
        # every waiting caller sees; a plain close says so.
        error = self._broken or FleetClosedError("The fleet was closed before this task finished.")
        for w in self._workers:
            for task in w.outstanding.values():
                _fail(task.future, error)
        for task in self._queue:
            _fail(task.future, error)
        self._queue.clear()
        self._workers.clear()
        self._by_obj = {}
        self._closing = True
        self._fail_inbox()
        with self._state:
            self._snapshot = []
            self._state.notify_all()
        with self._wake_lock:
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._wake_r = self._wake_w = -1


def _fail(future: Future[Any], error: BaseException, cause: BaseException | None = None) -> None:
    if cause is not None:
        error.__cause__ = cause
    if future.done():
        return
    if not future.running():
        # set_exception works on pending futures too, but a waiter must not see "cancelled".
        future.set_running_or_notify_cancel()
        if future.cancelled():
            return
    try:
        future.set_exception(error)
    except Exception:  # noqa: BLE001 - InvalidStateError: resolved meanwhile
        pass
