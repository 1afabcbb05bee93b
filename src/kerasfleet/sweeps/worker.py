"""The worker side of a sweep: load the function once, then run trials until retired.

    supervisor                                   worker ("kerasfleet.sweeps.worker:handler")
    ──────────                                   ───────────────────────────────────────────
    WorkerInit(HANDLER, HandlerConfig)    ──►    load the function (import, or cloudpickle),
                                                 check its signature, import Keras if installed
                                          ◄──    Ready (or Fatal: the sweep stops, nothing run)
    Call(RunTrial(key, config, seed))     ──►    clear Keras's state, seed everything,
                                                 fn(**config, seed=seed), check the result
                                          ◄──    Done(TrialOutcome: done | failed, metrics or
                                                 traceback, times, pid, RSS)

An exception in the function is a result, not a worker error: the outcome carries its
traceback together with the pid, the times and the memory, which the caller needs to record it
and to decide on recycling. A hang or a crash ends the worker; the supervisor reports those.

Keras is imported when the worker starts (once per worker, before it reports ready) when it is
installed, whether or not the function's module imports it: then a function that imports
Keras inside its body is seeded too. Before each trial `keras.backend.clear_session()` drops
what earlier trials left in Keras's global state (settings, layer-name counters, TF graphs;
without its gc.collect, 0.2 s a trial - the collector and recycling bound memory), and
`keras.utils.set_random_seed(seed)` seeds Python, NumPy, torch (on its backend), Keras's own
generator and TensorFlow: a trial gives the same result whichever trials ran before it in that
worker. Keras seeds TensorFlow whenever it is installed, importing it to do so (about 2 s and
400 MB a worker on another backend, for nothing when no trial uses it): while TensorFlow is not
imported, the worker has Keras skip it and seeds it instead the moment a trial imports it (an
import hook), before the trial can use it - the same seed at the same point.
Without Keras, Python's `random` and NumPy (when imported) are seeded.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import numbers
import os
import random
import resource
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .function import FunctionRef, check_signature, load_function, signature_of

HANDLER = "kerasfleet.sweeps.worker:handler"


@dataclass(frozen=True)
class HandlerConfig:
    function: FunctionRef
    keysets: tuple[tuple[str, ...], ...]  # the config keys the sweep will pass (signature check)


@dataclass(frozen=True)
class RunTrial:
    """A task payload: run the function once."""

    key: str
    config: dict[str, Any]
    seed: int


@dataclass(frozen=True)
class TrialOutcome:
    """What a trial that returned (or raised) sends back."""

    status: str  # "done" or "failed"
    metrics: dict[str, float | int] | None
    error: str | None
    started: float  # time.time() when the function was called
    duration: float  # seconds the function ran
    pid: int
    rss_mb: float  # the worker's resident memory after the trial


class SweepHandler:
    def __init__(self, config: HandlerConfig) -> None:
        self.fn = load_function(config.function)
        check_signature(signature_of(self.fn), config.keysets, config.function.name)
        # After the function's module: it may choose the backend before Keras is imported.
        self.keras: Any = None
        if importlib.util.find_spec("keras") is not None:
            import keras

            self.keras = keras
            self.tf_seeder = TensorFlowSeeder()
        self.info: dict[str, Any] = {
            "pid": os.getpid(),
            "keras_backend": self.keras.backend.backend() if self.keras is not None else None,
        }

    def attach(self, context_id: int, payload: Any) -> None:
        pass

    def detach(self, context_id: int) -> None:
        pass

    def run(self, payload: Any) -> TrialOutcome:
        if not isinstance(payload, RunTrial):
            raise TypeError(f"Expected a RunTrial payload in a sweep worker. Received: {type(payload).__name__}.")
        self._seed(payload.seed)
        started, t0 = time.time(), time.perf_counter()
        try:
            result = self.fn(**payload.config, seed=payload.seed)
        except BaseException:  # noqa: BLE001 - SystemExit in the function fails the trial, not the worker
            return TrialOutcome("failed", None, traceback.format_exc(), started, time.perf_counter() - t0, os.getpid(), rss_mb())
        duration = time.perf_counter() - t0
        metrics, problem = check_metrics(result)
        if problem is not None:
            return TrialOutcome("failed", None, problem, started, duration, os.getpid(), rss_mb())
        return TrialOutcome("done", metrics, None, started, duration, os.getpid(), rss_mb())

    def _seed(self, seed: int) -> None:
        if self.keras is not None:
            try:
                self.keras.backend.clear_session(free_memory=False)
            except TypeError:  # Keras before free_memory=
                self.keras.backend.clear_session()
            self.tf_seeder.set_random_seed(self.keras, seed)
            return
        random.seed(seed)
        np = sys.modules.get("numpy")
        if np is not None:
            np.random.seed(seed)


class TensorFlowSeeder(importlib.abc.MetaPathFinder):
    """`keras.utils.set_random_seed` without importing TensorFlow: seeded when a trial imports it."""

    def __init__(self) -> None:
        self.seed: int | None = None
        self._finding = False
        # Keras's lazy handle on TensorFlow (a private name: if it moves, Keras imports TF as before).
        try:
            from keras.src.utils import module_utils

            self.lazy: Any = getattr(module_utils, "tensorflow", None)
        except ImportError:
            self.lazy = None
        if self.lazy is not None and hasattr(self.lazy, "_available"):
            sys.meta_path.insert(0, self)
        else:
            self.lazy = None

    def set_random_seed(self, keras: Any, seed: int) -> None:
        self.seed = seed
        if self.lazy is None or "tensorflow" in sys.modules:
            keras.utils.set_random_seed(seed)
            return
        saved = self.lazy._available
        self.lazy._available = False  # "not installed", for this call only
        try:
            keras.utils.set_random_seed(seed)
        finally:
            self.lazy._available = saved

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        # Every lookup gets a seeding loader (a mere find_spec probe, by a library checking
        # whether TF is installed, must not use the hook up); once TF is imported, Keras seeds it.
        if fullname != "tensorflow" or self.seed is None or self._finding or "tensorflow" in sys.modules:
            return None
        self._finding = True  # the lookup below asks the finders again, this one included
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding = False
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run_module = loader.exec_module

        def exec_module(module: Any) -> None:
            run_module(module)
            if self.seed is not None:
                module.random.set_seed(self.seed)  # the running trial's seed, before it uses TF

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def handler(config: HandlerConfig) -> SweepHandler:
    return SweepHandler(config)


def check_metrics(result: Any) -> tuple[dict[str, float | int] | None, str | None]:
    """(metrics as plain Python numbers, None) or (None, why the result is refused)."""
    expected = "Expected the trial function to return a dict of numbers, e.g. {'val_accuracy': 0.91}."
    if not isinstance(result, Mapping):
        return None, f"{expected} Received: {type(result).__name__} {_short(result)}."
    if not result:
        return None, f"{expected} Received: an empty dict."
    metrics: dict[str, float | int] = {}
    for name, value in result.items():
        if not isinstance(name, str):
            return None, f"{expected} Received: a key {name!r} ({type(name).__name__}); metric names are str."
        number = _number(value)
        if number is None:
            hint = ""
            if isinstance(value, (list, tuple)):
                hint = f" (a list of {len(value)} values - one per epoch? Return one number, e.g. history.history[{name!r}][-1])"
            return None, f"{expected} Received: {name}={_short(value)} ({type(value).__name__}){hint}."
        metrics[name] = number
    return metrics, None


def rss_mb() -> float:
    """This process's resident memory now (Linux), else its peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    # A scalar array or tensor (np.float32(...) is Real already; 0-d arrays, JAX, TF, torch).
    if getattr(value, "shape", None) == () and hasattr(value, "__float__"):
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
