"""Evaluation: `model.evaluate` over the fleet, with NumPy per-row scores in worker processes.

    evaluate.py  the public `evaluate()`: windows, the fleet's predictions, exact metric states
    scoring.py   per-row score functions in runtime workers, data through shared memory

A feature on top of `prediction` (Fleet) and `runtime` (the supervisor, shared buffers).
"""

from .evaluate import evaluate

__all__ = ["evaluate"]
