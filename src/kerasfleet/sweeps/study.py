"""An Optuna study as the sampler: asked and told in the caller, trials run in the workers.

    sweep loop (caller)                                    Optuna study (the user's)
    ───────────────────                                    ─────────────────────────
    a worker is free, nothing left to submit ──ask()──►    study.ask(distributions)
    config = trial.params; one trial per seed     ◄──────  (its sampler: TPE, CMA-ES, ...)
    ... every seed of that config has ended ──tell()──►    study.tell(trial, mean of `metric`)
                                                           or state=FAIL if any seed did not
                                                           finish (or lacks the metric)

The search space is the `grid`: a list is a categorical choice, an Optuna distribution
(`FloatDistribution(1e-4, 1e-1, log=True)`, `IntDistribution(8, 64)`) is sampled as such. Asks
happen as late as possible (only when a worker would otherwise idle), so the sampler has every
result told so far. The study's direction says whether `metric` is maximised.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..errors import InputError


def is_study(sampler: Any) -> bool:
    return all(callable(getattr(sampler, name, None)) for name in ("ask", "tell")) and hasattr(sampler, "directions")


class StudySearch:
    def __init__(self, study: Any, grid: Mapping[str, Any], metric: str) -> None:
        from optuna.distributions import BaseDistribution, CategoricalDistribution

        if len(study.directions) != 1:
            raise InputError(
                f"Expected a single-objective Optuna study (one metric=). Received: a study with {len(study.directions)} directions."
            )
        self.study = study
        self.metric = metric
        self.mode = "max" if study.direction.name == "MAXIMIZE" else "min"
        self.distributions: dict[str, BaseDistribution] = {}
        for name, values in grid.items():
            if isinstance(values, BaseDistribution):
                self.distributions[name] = values
                continue
            bad = [v for v in values if v is not None and not isinstance(v, (bool, int, float, str))]
            if bad:
                raise InputError(
                    f"Expected Optuna's categorical choices to be None, bool, int, float or str. Received: {name}={values!r}; "
                    "encode such a value as a string (e.g. '64-32') and decode it in the function."
                )
            self.distributions[name] = CategoricalDistribution(values)
        self._open: dict[int, Any] = {}

    def ask(self) -> tuple[int, dict[str, Any]]:
        trial = self.study.ask(self.distributions)
        self._open[trial.number] = trial
        return trial.number, dict(trial.params)

    def tell(self, number: int, rows: list[dict[str, Any]]) -> None:
        """Every seed of the trial's config has ended: tell the mean of the metric, or a failure."""
        from optuna.trial import TrialState

        trial = self._open.pop(number)
        values = [r["metrics"][self.metric] for r in rows if r["status"] == "done" and self.metric in (r["metrics"] or {})]
        if rows and len(values) == len(rows) and all(math.isfinite(v) for v in values):
            self.study.tell(trial, sum(values) / len(values))
        else:
            self.study.tell(trial, state=TrialState.FAIL)

    def abandon(self) -> None:
        """The sweep stops early (an error, Ctrl-C): trials still asked are told they failed."""
        from optuna.trial import TrialState

        for trial in self._open.values():
            try:
                self.study.tell(trial, state=TrialState.FAIL)
            except Exception:  # noqa: BLE001 - best effort while an error propagates
                pass
        self._open.clear()
