"""Sweeps: a function run for every config x seed in worker processes, results in SQLite.

    function.py   how the function reaches the workers: by name, or by value (cloudpickle)
    spec.py       grid / configs / random draws x seeds -> trials with stable keys; the checks
    study.py      an Optuna study as the sampler: ask and tell in the caller
    store.py      the SQLite store: one writer (the caller), one commit per trial, resume
    worker.py     the worker side: load the function once, seed, run, check the result
    api.py        sweep(): the loop over the runtime's supervisor; the progress bar
    results.py    SweepResult: trials, summary over seeds, best, table, pandas

A feature on the runtime (Supervisor, RECORD retries, hard deadlines). Names load lazily: a
worker imports `kerasfleet.sweeps.worker` and must not pull in the caller's side (the
prediction layer, NumPy) for nothing. Optuna and cloudpickle (the `sweep` extra) are imported
only when a study or a by-value function is used.
"""

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["SweepResult", "read_store", "sweep"]

_LAZY = {"SweepResult": ".results", "read_store": ".store", "sweep": ".api"}

if TYPE_CHECKING:
    from .api import sweep
    from .results import SweepResult
    from .store import read_store


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kerasfleet.sweeps' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
