"""`kerasfleet.sweep`: every config x every seed of a function, in worker processes, recorded.

    caller (this thread)                       runtime.Supervisor thread           workers
    ────────────────────                       ─────────────────────────           ───────
    check fn, grid/configs, seeds, sampler,
    store, counts: InputError before any
    process starts; open the store (lock,
    function check), skip finished trials
    while a worker would idle: next trial ──► submit(RunTrial, retry=RECORD,  ──► fn(**config,
      (Optuna: ask when nothing is left)         timeout, exclusive)               seed=seed)
    wait for any trial to end             ◄── Done(TrialOutcome) / TaskTimeout / ◄── result,
    record its row, COMMIT                     WorkerCrashed; a dead or killed      traceback
    Optuna: tell when a config's seeds ended   worker is replaced
    a worker that ran max_trials_per_worker
      trials or grew past max_worker_memory ──► retire(pid): Stop, replacement
    progress bar: done / running / failed / best

The caller submits at most one trial per worker, each `exclusive` (alone on an idle worker), so
a trial never waits behind another while a worker idles, and the next Optuna ask sees every
result told so far. It also knows which worker the next trial goes to (the one whose trial just
ended), and gives it a trial of a config it already ran when there is one, else a config no
worker has started (a worker's framework caches warm up per shape). On JAX the workers share
XLA's persistent compilation cache (`runtime/compile_cache.py`): Keras compiles every new
model's steps again, even one of an architecture already trained, and on small models that
costs more than the training; with the cache a program is compiled once per sweep and read
back by every later trial, in any worker. A trial's status: done; failed (an exception in the function, with its
traceback, or a result that is not a dict of numbers); timeout (past `timeout` its worker is
SIGKILLed and replaced, within a few ms); crashed (its worker died: the signal is recorded).
Anything else - workers that cannot start, a function that does not load in a worker, Ctrl-C
- stops the sweep: finished trials are in the store, running ones are run again next time.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..cluster import check_cluster, connect
from ..errors import InputError, RemoteTraceback, TaskTimeoutError, WorkerCrashedError, WorkerError
from ..prediction.fleet import check_backend
from ..runtime import (
    RECORD,
    LocalWorker,
    Plan,
    Supervisor,
    WorkerHandle,
    WorkerInit,
    WorkerSlot,
    default_backend,
    make_plan,
    worker_environment,
)
from ..runtime.compile_cache import check_compile_cache, compile_cache_env
from ..runtime.protocol import RemoteError
from .function import FunctionRef, check_signature, function_ref, signature_of
from .results import SweepResult
from .spec import (
    TrialSpec,
    check_configs,
    check_grid,
    check_positive_int,
    check_positive_number,
    check_seeds,
    draw_random,
    expand_grid,
    pick,
    trials_for,
)
from .store import Store
from .study import StudySearch, is_study
from .worker import HANDLER, HandlerConfig, RunTrial, TrialOutcome

if TYPE_CHECKING:
    from ..cluster import RayCluster

# Workers are replaced after this many trials by default: long-lived framework processes grow
# (caches, fragmentation); a restart costs one import (seconds) against minutes of trials.
DEFAULT_MAX_TRIALS_PER_WORKER = 50
# How often the progress bar refreshes while no trial ends (the running count, the clock).
_REFRESH_S = 0.5


def sweep(
    fn: Any,
    grid: dict[str, Any] | None = None,
    *,
    configs: list[dict[str, Any]] | None = None,
    seeds: Any = (0,),
    n_trials: int | None = None,
    sampler: Any = "grid",
    metric: str | None = None,
    mode: str | None = None,
    workers: int | None = None,
    threads_per_trial: int | None = None,
    devices: Any = "auto",
    backend: str | None = None,
    timeout: float | None = None,
    store: str | os.PathLike[str] | None = "sweep.sqlite",
    resume: bool = True,
    retry_failed: bool = False,
    max_trials_per_worker: int | None = DEFAULT_MAX_TRIALS_PER_WORKER,
    max_worker_memory_mb: float | None = None,
    start_timeout: float = 600.0,
    compile_cache: Any = True,
    progress: bool | None = None,
    cluster: Any = None,
) -> SweepResult:
    """Run `fn(**config, seed=seed)` for every config and every seed in worker processes.

    ```python
    def train(lr, units, seed):                  # in train.py, or in the script itself
        ...
        return {"val_accuracy": float(history.history["val_accuracy"][-1])}

    result = kerasfleet.sweep(train, {"lr": [1e-3, 1e-2], "units": [32, 64]}, seeds=(0, 1, 2), timeout=600)
    print(result.table("val_accuracy"))          # mean ± std over the seeds, best first
    ```

    | argument | meaning |
    | --- | --- |
    | `fn` | a function returning a dict of numbers; or `"module:function"`. From the caller's script, a lambda or a closure it travels by value (cloudpickle) |
    | `grid` | `{name: [values]}`: the product is run (`sampler="grid"`), or sampled (`"random"`, Optuna) |
    | `configs` | instead of `grid`: the list of configs to run |
    | `seeds` | every config runs once per seed; `keras.utils.set_random_seed(seed)` before each run |
    | `n_trials` | configs to draw with `sampler="random"` or an Optuna study |
    | `sampler` | `"grid"`, `"random"` (distinct configs of the grid, drawn with a fixed seed), or an `optuna.Study` (ask/tell here, its sampler chooses; `grid` values may be Optuna distributions) |
    | `metric`, `mode` | the metric to optimise (needed with a study, told the mean over seeds) and `"max"`/`"min"`; the result's and the progress bar's default |
    | `workers`, `threads_per_trial` | trials at once x threads each; default the usable cores x 1 (one trial per GPU where GPUs are visible) |
    | `devices`, `backend` | as for `Fleet`: `"auto"`/`"cpu"`/`"gpu"`/GPU ids; the workers' Keras backend |
    | `timeout` | seconds a trial may run; past it its worker is killed (status `timeout`) |
    | `store` | SQLite file, one commit per trial (default `sweep.sqlite` in the working folder); `None`: in memory |
    | `resume`, `retry_failed` | skip trials the store has finished; run failed / timeout / crashed ones again too |
    | `max_trials_per_worker`, `max_worker_memory_mb` | replace a worker after that many trials, or when its RSS after a trial exceeds that |
    | `start_timeout` | seconds a worker may take to start (import the function and Keras) |
    | `compile_cache` | JAX: the workers share XLA's persistent compilation cache, so trials of one architecture compile once per sweep, not once per trial (`True`: in kerasfleet's cache folder, or the one `JAX_COMPILATION_CACHE_DIR` names; a folder; `False`: every trial compiles, as in a plain loop). Local workers |
    | `progress` | a progress bar; default on when stderr is a terminal |
    | `cluster` | None (this machine), `"ray"` or a Ray address: trials run in Ray actors over the cluster's nodes (a GPU each where there are GPUs), with the same deadlines (the actor is killed) and the store here |

    Everything is checked before any process starts. Returns a `SweepResult` of this call's
    trials (also those finished by an earlier run).
    """
    ref = function_ref(fn)
    seed_list = check_seeds(seeds)
    specs, search, keysets, mode = _plan_configs(ref, grid, configs, n_trials, sampler, metric, mode, seed_list)
    check_signature(signature_of(fn), keysets, ref.name)
    check_backend(backend)
    timeout = check_positive_number(timeout, "timeout")
    max_worker_memory_mb = check_positive_number(max_worker_memory_mb, "max_worker_memory_mb")
    max_trials_per_worker = check_positive_int(max_trials_per_worker, "max_trials_per_worker")
    check_positive_int(workers, "workers")
    check_positive_int(threads_per_trial, "threads_per_trial")
    check_cluster(cluster)
    compile_cache = check_compile_cache(compile_cache)
    if cluster is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # only the checks here: the plan made below warns, once
            make_plan(workers, threads_per_trial, devices=devices)  # counts and devices, InputError
    if check_positive_number(start_timeout, "start_timeout") is None:
        raise InputError(f"Expected start_timeout to be a positive number. Received: start_timeout={start_timeout!r}.")
    if retry_failed and not resume:
        warnings.warn("retry_failed=True has no effect with resume=False (every trial runs).", RuntimeWarning, stacklevel=2)
    if progress is None:
        progress = sys.stderr.isatty()

    with Store(store, ref.name) as db:
        run = _Run(
            ref,
            db,
            seeds=seed_list,
            search=search,
            n_trials=n_trials or 0,
            resume=resume,
            retry_failed=retry_failed,
            timeout=timeout,
            max_trials_per_worker=max_trials_per_worker,
            max_worker_memory_mb=max_worker_memory_mb,
            metric=metric,
            mode=mode,
        )
        pending = run.queue(specs) if specs is not None else (n_trials or 0) * len(seed_list)
        if pending:
            init = WorkerInit(HANDLER, HandlerConfig(ref, keysets))
            backend_name = backend or default_backend()
            spawn: Callable[[WorkerSlot], WorkerHandle]
            if cluster is not None:
                ray_cluster = connect(cluster)
                plan, nodes = _cluster_plan(ray_cluster, workers, threads_per_trial, devices, pending)
                spawn = ray_cluster.spawner(init, backend_name, nodes)
            else:
                plan = _plan(workers, threads_per_trial, devices, pending)
                cache_env = compile_cache_env(compile_cache)
                spawn = lambda slot: LocalWorker(slot, init, {**worker_environment(slot, backend_name), **cache_env})  # noqa: E731
            run.start(plan, spawn, start_timeout, progress)
        rows = db.rows(dict.fromkeys(run.keys))  # a config Optuna asked twice is listed once
    return SweepResult(rows, metric=metric, mode=mode, store=None if store is None else os.fspath(store))


def _plan_configs(
    ref: FunctionRef,
    grid: Any,
    configs: Any,
    n_trials: Any,
    sampler: Any,
    metric: Any,
    mode: Any,
    seeds: tuple[int, ...],
) -> tuple[list[TrialSpec] | None, StudySearch | None, tuple[tuple[str, ...], ...], str]:
    """(fixed trial list or None, Optuna search or None, config key sets, mode), all checked."""
    if metric is not None and not isinstance(metric, str):
        raise InputError(f"Expected metric to be a metric name (str) or None. Received: metric={metric!r}.")
    if mode is not None and mode not in ("max", "min"):
        raise InputError(f"Expected mode to be 'max', 'min' or None. Received: mode={mode!r}.")
    study = is_study(sampler)
    if not study and sampler not in ("grid", "random"):
        raise InputError(f"Expected sampler to be 'grid', 'random' or an optuna Study. Received: sampler={sampler!r}.")
    if grid is not None and configs is not None:
        raise InputError("Expected grid or configs, not both. Received: both.")
    if sampler == "grid":
        if n_trials is not None:
            raise InputError(
                f"Expected no n_trials with sampler='grid' (it runs every config). Received: n_trials={n_trials!r}; "
                "pass sampler='random' or an Optuna study to sample n_trials configs."
            )
        if grid is None and configs is None:
            raise InputError("Expected grid= (a dict of value lists) or configs= (a list of dicts). Received: neither.")
        chosen = expand_grid(check_grid(grid)) if grid is not None else check_configs(configs)
        keysets = tuple(dict.fromkeys(tuple(sorted(c)) for c in chosen))
        return trials_for(ref.name, chosen, seeds), None, keysets, mode or "max"
    label = "'random'" if sampler == "random" else "an Optuna study"
    if configs is not None or grid is None:
        raise InputError(f"Expected grid= (the values to sample from) with sampler={label}. Received: grid=None.")
    check_positive_int(n_trials, "n_trials", optional=False)
    if sampler == "random":
        drawn = draw_random(check_grid(grid), n_trials)
        return trials_for(ref.name, drawn, seeds), None, (tuple(sorted(grid)),), mode or "max"
    if metric is None:
        raise InputError("Expected metric= (the name the study optimises: the mean over seeds is told) with an Optuna study.")
    search = StudySearch(sampler, check_grid(grid, distributions=True), metric)
    if mode is not None and mode != search.mode:
        raise InputError(f"Expected mode to agree with the study's direction ({search.mode}). Received: mode={mode!r}.")
    return None, search, (tuple(sorted(grid)),), search.mode


def _plan(workers: int | None, threads: int | None, devices: Any, pending: int) -> Plan:
    """The runtime's plan, with no more workers than trials to run (their cores go to threads)."""
    if workers is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the plan below warns, once
            workers = min(make_plan(None, threads, devices=devices).workers, pending)
    return make_plan(workers, threads, devices=devices)


def _cluster_plan(
    cluster: RayCluster, workers: int | None, threads: int | None, devices: Any, pending: int
) -> tuple[Plan, tuple[str, ...]]:
    """The cluster's plan over its nodes, with no more workers than trials to run."""
    if workers is None:
        workers = min(cluster.plan(None, threads, devices)[0].workers, pending)
    return cluster.plan(workers, threads, devices)


@dataclass
class _Group:
    """An Optuna trial: one config, its seeds' keys, the rows that ended so far."""

    number: int
    keys: list[str]
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)


class _Run:
    """One sweep() call in the caller: what to submit next, what runs, what ended."""

    def __init__(
        self,
        ref: FunctionRef,
        store: Store,
        *,
        seeds: tuple[int, ...],
        search: StudySearch | None,
        n_trials: int,
        resume: bool,
        retry_failed: bool,
        timeout: float | None,
        max_trials_per_worker: int | None,
        max_worker_memory_mb: float | None,
        metric: str | None,
        mode: str,
    ) -> None:
        self.ref = ref
        self.store = store
        self.seeds = seeds
        self.search = search
        self.n_trials = n_trials
        self.resume = resume
        self.retry_failed = retry_failed
        self.timeout = timeout
        self.max_trials_per_worker = max_trials_per_worker
        self.max_worker_memory_mb = max_worker_memory_mb
        self.metric = metric
        self.mode = mode
        self.keys: list[str] = []  # this call's trials, in order
        self.todo: deque[TrialSpec] = deque()
        self.queued: set[str] = set()  # keys in todo or running
        self.ended_here: set[str] = set()
        self.inflight: dict[Future[Any], TrialSpec] = {}
        # Written by the supervisor thread when a trial reaches a worker: (time, pid).
        self.started: dict[str, tuple[float, int | None]] = {}
        self.waiting: dict[str, list[_Group]] = {}  # Optuna groups waiting for a key's row
        self.asked = 0
        self.free: deque[int] = deque()  # pids whose trial just ended: the next trials go there
        self.configs_on: dict[int, set[str]] = {}  # config ids each live worker has run
        self.configs_started: set[str] = set()
        self.trials_on: Counter[int] = Counter()
        self.sup: Supervisor | None = None
        self.bar: _Bar | None = None

    # -- what to run ---------------------------------------------------------------------------
    def queue(self, specs: list[TrialSpec]) -> int:
        """Queue the trials the store has not finished; returns how many."""
        for spec in specs:
            self.keys.append(spec.key)
            if self._stored(spec.key) is None:
                self.todo.append(spec)
                self.queued.add(spec.key)
        return len(self.todo)

    def _stored(self, key: str) -> dict[str, Any] | None:
        """The row a trial is skipped for: finished earlier in this call, or by an earlier run."""
        if key in self.ended_here:
            return self.store.get(key)
        if not self.resume:
            return None
        row = self.store.get(key)
        if row is not None and (row["status"] == "done" or not self.retry_failed):
            return row
        return None

    def _next(self, pid: int | None) -> TrialSpec | None:
        """The next trial for worker `pid` (None: a fresh one): a config it already ran (warm
        compiled functions), else the first config no worker has started, else the first left."""
        while not self.todo:
            if self.search is None or self.asked >= self.n_trials:
                return None
            self._ask()
        index = pick(self.todo, self.configs_on.get(pid, set()) if pid is not None else set(), self.configs_started)
        spec = self.todo[index]
        del self.todo[index]
        self.configs_started.add(spec.config_id)
        return spec

    def _ask(self) -> None:
        assert self.search is not None
        number, config = self.search.ask()
        self.asked += 1
        group = _Group(number, [])
        for spec in trials_for(self.ref.name, [config], self.seeds):
            self.keys.append(spec.key)
            group.keys.append(spec.key)
            row = self._stored(spec.key)
            if row is not None:
                group.rows[spec.key] = row
                if self.bar is not None:
                    self.bar.skipped(row)
                continue
            self.waiting.setdefault(spec.key, []).append(group)
            if spec.key not in self.queued:  # the sampler may ask for a config already running
                self.todo.append(spec)
                self.queued.add(spec.key)
        self._tell_if_complete(group)

    def _tell_if_complete(self, group: _Group) -> None:
        if self.search is not None and len(group.rows) == len(group.keys):
            self.search.tell(group.number, [group.rows[k] for k in group.keys])

    # -- running ---------------------------------------------------------------------------------
    def start(self, plan: Plan, spawn: Callable[[WorkerSlot], WorkerHandle], start_timeout: float, progress: bool) -> None:
        name = self.ref.name

        def on_fatal(error: RemoteError) -> BaseException:
            return InputError(
                f"Expected the trial function {name} to load in a worker. Received: {error.type_name}: {error.message} "
                "(the worker's traceback is the cause)."
            )

        done_before = sum(1 for k in dict.fromkeys(self.keys) if k not in self.queued)
        total = len(dict.fromkeys(self.keys)) if self.search is None else self.n_trials * len(self.seeds)
        self.bar = _Bar(total, done_before, progress, self.metric, self.mode)
        try:
            self.sup = Supervisor(
                spawn,
                plan.slots,
                start_timeout=start_timeout,
                on_fatal=on_fatal,
                name=f"kerasfleet-sweep-{name}",
            )
            while True:
                while len(self.inflight) < plan.workers:
                    spec = self._next(self.free.popleft() if self.free else None)
                    if spec is None:
                        break
                    self._submit(spec)
                if not self.inflight:
                    break
                done, _ = wait(list(self.inflight), timeout=_REFRESH_S, return_when=FIRST_COMPLETED)
                for future in done:
                    self._finish(future)
                self.bar.show(len(self.started))
        except BaseException:
            if self.search is not None:
                self.search.abandon()
            raise
        finally:
            if self.sup is not None:
                self.sup.close()  # kills what still runs: those trials run again next time
            self.bar.close()

    def _submit(self, spec: TrialSpec) -> None:
        assert self.sup is not None
        future = self.sup.submit(
            RunTrial(spec.key, spec.config, spec.seed),
            retry=RECORD,  # a dead worker fails the trial (status crashed); the sweep goes on
            timeout=self.timeout,
            exclusive=True,
            label=f"running trial {spec.config_id} seed {spec.seed}",
            on_start=functools.partial(self._on_start, spec.key),
        )
        self.inflight[future] = spec

    def _on_start(self, key: str, pid: int | None) -> None:
        self.started[key] = (time.time(), pid)  # the supervisor thread: a dict store, nothing more

    def _finish(self, future: Future[Any]) -> None:
        spec = self.inflight.pop(future)
        ended = time.time()
        started, pid = self.started.pop(spec.key, (None, None))
        row: dict[str, Any] = {"key": spec.key, "config": spec.config, "seed": spec.seed, "worker_pid": pid}
        try:
            outcome: TrialOutcome = future.result()
        except TaskTimeoutError as exc:
            row.update(status="timeout", error=str(exc))
        except WorkerCrashedError as exc:
            row.update(status="crashed", error=str(exc))
        except WorkerError as exc:  # the handler itself raised (not the function)
            cause = exc.__cause__
            row.update(status="failed", error=f"{exc}\n{cause.tb if isinstance(cause, RemoteTraceback) else ''}".rstrip())
        else:
            row.update(
                status=outcome.status,
                metrics=outcome.metrics,
                error=outcome.error,
                started=outcome.started,
                ended=outcome.started + outcome.duration,
                duration=outcome.duration,
                worker_pid=outcome.pid,
            )
            self._maybe_retire(outcome, spec.config_id)
        if "started" not in row:  # its worker is gone (killed at the deadline, or dead)
            row.update(started=started, ended=ended, duration=None if started is None else ended - started)
            self.configs_on.pop(pid or -1, None)
        self.store.record(row)  # committed: a kill from here on loses nothing
        self.ended_here.add(spec.key)
        self.queued.discard(spec.key)
        for group in self.waiting.pop(spec.key, []):
            group.rows[spec.key] = row
            self._tell_if_complete(group)
        assert self.bar is not None
        self.bar.ended(row)

    def _maybe_retire(self, outcome: TrialOutcome, config_id: str) -> None:
        """Retire the worker if it is worn or grew; else it is free for the next trial."""
        assert self.sup is not None
        pid = outcome.pid
        self.trials_on[pid] += 1
        worn = self.max_trials_per_worker is not None and self.trials_on[pid] >= self.max_trials_per_worker
        grown = self.max_worker_memory_mb is not None and outcome.rss_mb > self.max_worker_memory_mb
        if worn or grown:
            self.sup.retire(pid)  # before the next submit: it gets no more trials
            self.configs_on.pop(pid, None)
        else:
            self.configs_on.setdefault(pid, set()).add(config_id)
            self.free.append(pid)


class _Bar:
    """tqdm: trials ended of all, with done / running / failed counts and the best so far."""

    def __init__(self, total: int, initial: int, enabled: bool, metric: str | None, mode: str) -> None:
        self.metric = metric
        self.mode = mode
        self.counts: Counter[str] = Counter()
        self.best: float | None = None
        self.tqdm: Any = None
        if enabled:
            from tqdm import tqdm

            self.tqdm = tqdm(
                total=total, initial=initial, unit="trial", desc="kerasfleet sweep", dynamic_ncols=True, file=sys.stderr
            )

    def skipped(self, row: dict[str, Any]) -> None:
        if self.tqdm is not None:
            self.tqdm.update(1)

    def ended(self, row: dict[str, Any]) -> None:
        self.counts["done" if row["status"] == "done" else "failed"] += 1
        metrics = row.get("metrics") or {}
        if self.metric is None and metrics:
            self.metric = next(iter(metrics))  # the first metric the function returns
        value = metrics.get(self.metric) if self.metric is not None else None
        if isinstance(value, (int, float)) and not math.isnan(value):
            if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
                self.best = float(value)
        if self.tqdm is not None:
            self.tqdm.update(1)

    def show(self, running: int) -> None:
        if self.tqdm is None:
            return
        best = f" best {self.metric}={self.best:.4g}" if self.best is not None else ""
        self.tqdm.set_postfix_str(f"done={self.counts['done']} running={running} failed={self.counts['failed']}{best}")

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
