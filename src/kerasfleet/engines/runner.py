"""An engine in the caller's process: the one in-process path shared by `kerasfleet.predict`
(when starting workers would cost more than it saves), the tuning trial, and `Predictor`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .base import Engine, Key, Outputs

# Rows per predict_rows step: progress updates this often, and a Ctrl-C lands within a step.
_BATCHES_PER_STEP = 64


class Runner:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def outputs(self, key: Key) -> Outputs:
        return self.engine.outputs(key)

    def predict(
        self,
        key: Key,
        inputs: list[np.ndarray[Any, Any]],
        out: list[np.ndarray[Any, Any]] | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> list[np.ndarray[Any, Any]]:
        """Every row of `inputs` at key's batch size; into `out` if given (e.g. memmaps)."""
        rows = int(inputs[0].shape[0])  # zero rows: the loop below does nothing, outputs are empty
        arrays = out if out is not None else self.engine.outputs(key).empty(rows)
        step = key[0] * _BATCHES_PER_STEP
        for lo in range(0, rows, step):
            hi = min(rows, lo + step)
            self.engine.predict_rows(key, inputs, arrays, lo, hi)
            if on_progress is not None:
                on_progress(hi - lo)
        return arrays

    def run_padded(self, key: Key, arrays: list[np.ndarray[Any, Any]], pad: bool) -> list[np.ndarray[Any, Any]]:
        """One batch of at most key's batch size; padded up to it when `pad` (compiled engines)."""
        n = int(arrays[0].shape[0])
        size = key[0]
        if pad and n != size:
            arrays = [np.concatenate([a, np.zeros((size - n, *a.shape[1:]), a.dtype)]) for a in arrays]
        return [o[:n] for o in self.engine.run_batch(key, arrays)]

    @property
    def traces(self) -> int:
        return self.engine.traces
