"""precision=, calibration= and the gate's thresholds, as the caller gives them -> a PrecisionRequest.

`calibration` is rows in any form `predict` takes (array, list or dict of arrays, `.npy`/`.npz`
path), checked against the signature before any work. Without it, `predict` hands the first
rows of its input (`InputRows`): read only when no verdict is stored yet, and not part of the
verdict's key, so later calls on other data reuse it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..engines.model_file import Signature
from ..tune import FP32, Gate, PrecisionRequest, check_precision
from ..tune.precision import CALIBRATION_ROWS, GATE_ROWS
from .inputs import Source, normalize_inputs
from .jobs import load_sources


@dataclass(frozen=True)
class InputRows:
    """The first rows of a call's input, standing in for calibration= (see the module docstring)."""

    sources: list[Source]

    def __call__(self) -> list[np.ndarray[Any, Any]]:
        n = CALIBRATION_ROWS + GATE_ROWS
        return [np.array(a[:n], dtype=s.dtype) for a, s in zip(load_sources(self.sources), self.sources)]


def precision_request(
    precision: Any,
    engine: str,
    signature: Signature,
    calibration: Any,
    max_top1_disagreement: float,
    atol: float | None,
) -> PrecisionRequest:
    check_precision(precision, engine)
    gate = Gate(max_top1_disagreement, atol)  # checks the thresholds, also for fp32: a typo fails early
    if precision == "fp32":
        return FP32
    if isinstance(calibration, InputRows):
        return PrecisionRequest(precision, gate, None, calibration)
    if calibration is None:
        return PrecisionRequest(precision, gate, None, None)
    sources = normalize_inputs(calibration, signature)
    given = [np.asarray(a, dtype=s.dtype) for a, s in zip(load_sources(sources), sources)]
    return PrecisionRequest(precision, gate, given, None)
