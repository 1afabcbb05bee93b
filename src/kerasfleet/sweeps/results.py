"""A sweep's trials, summarised per config over its seeds; the table `kerasfleet results` prints.

    rows (store) ─► SweepResult.trials ─► summary(metric): group by config, mean / std / n
                                          over the seeds that finished ─► sorted best first
                                       ─► best(metric)    the first row of the summary
                                       ─► table(metric)   aligned text, mean ± std
                                       ─► to_pandas()     one row per trial (pandas optional)

`std` is the sample standard deviation over seeds (ddof=1), NaN when fewer than two seeds
finished. Configs where no seed finished come last.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

from ..errors import InputError

MODES = ("max", "min")


class SweepResult:
    """What `kerasfleet.sweep` returns (and `kerasfleet results` reads from a store).

    | attribute / method | meaning |
    | --- | --- |
    | `trials` | one dict per trial: key, config, seed, status, metrics, started, ended, duration, worker_pid, error, attempts |
    | `counts` | trials per status (done, failed, timeout, crashed) |
    | `summary(metric, mode)` | per config: mean, std, n over the seeds that finished, best first |
    | `best(metric, mode)` | the config with the best mean |
    | `table(metric, mode)` | the summary as aligned text (mean ± std) |
    | `to_pandas()` | a DataFrame, one row per trial (`config.*`, `metrics.*` columns) |
    """

    def __init__(
        self, trials: list[dict[str, Any]], *, metric: str | None = None, mode: str = "max", store: str | None = None
    ) -> None:
        self.trials = trials
        self.metric = metric
        self.mode = _check_mode(mode)
        self.store = store

    @property
    def counts(self) -> dict[str, int]:
        counted = Counter(t["status"] for t in self.trials)
        return {status: counted[status] for status in ("done", "failed", "timeout", "crashed") if counted[status]}

    def metrics(self) -> list[str]:
        """Every metric name a finished trial returned."""
        names: dict[str, None] = {}
        for t in self.trials:
            names.update(dict.fromkeys(t["metrics"] or {}))
        return list(names)

    def summary(self, metric: str | None = None, mode: str | None = None) -> list[dict[str, Any]]:
        """Per config: `config`, `mean`, `std`, `n` (seeds that finished with the metric),
        `seeds`, `values`, `not_done` (its trials that failed, timed out or crashed); best first."""
        metric = self._metric(metric)
        mode = _check_mode(mode or self.mode)
        groups: dict[str, dict[str, Any]] = {}
        for t in self.trials:
            config_id = json.dumps(t["config"], sort_keys=True)
            group = groups.setdefault(config_id, {"config": t["config"], "seeds": [], "values": [], "not_done": 0})
            if t["status"] == "done" and metric in (t["metrics"] or {}):
                group["seeds"].append(t["seed"])
                group["values"].append(t["metrics"][metric])
            elif t["status"] != "done":
                group["not_done"] += 1
        rows = []
        for group in groups.values():
            values = group["values"]
            n = len(values)
            mean = math.fsum(values) / n if n else math.nan
            std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
            rows.append({"config": group["config"], "mean": mean, "std": std, "n": n, **group})
        sign = -1.0 if mode == "max" else 1.0
        # NaN means (nothing finished, or a diverged seed) sort last; ties keep the trials' order.
        rows.sort(key=lambda r: (math.isnan(r["mean"]), sign * r["mean"] if not math.isnan(r["mean"]) else 0.0))
        return rows

    def best(self, metric: str | None = None, mode: str | None = None) -> dict[str, Any]:
        """The summary row of the config with the best mean (`config`, `mean`, `std`, `n`, ...)."""
        rows = self.summary(metric, mode)
        if not rows or math.isnan(rows[0]["mean"]):
            raise InputError(
                f"Expected at least one finished trial with metric {self._metric(metric)!r}. Received: counts {self.counts}."
            )
        return rows[0]

    def table(self, metric: str | None = None, mode: str | None = None) -> str:
        """The summary as aligned text: one line per config, mean ± std over its seeds."""
        metric = self._metric(metric)
        rows = self.summary(metric, mode)
        keys: dict[str, None] = {}
        for r in rows:
            keys.update(dict.fromkeys(r["config"]))
        header = [*keys, f"{metric} (mean ± std)", "n", "not done"]
        lines = [header]
        for r in rows:
            score = "-" if r["n"] == 0 else f"{r['mean']:.4g}" + ("" if r["n"] < 2 else f" ± {r['std']:.2g}")
            lines.append([*(_cell(r["config"].get(k, "")) for k in keys), score, str(r["n"]), str(r["not_done"])])
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)

    def to_pandas(self) -> Any:
        """One row per trial: `config.<name>` and `metrics.<name>` columns, then seed, status, times, error."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(
                "Expected pandas to be installed for SweepResult.to_pandas(). Received: no pandas. "
                "Install it with: pip install pandas (or use .trials, a list of dicts)."
            ) from None
        records = []
        for t in self.trials:
            record = {f"config.{k}": v for k, v in t["config"].items()}
            record["seed"] = t["seed"]
            record["status"] = t["status"]
            record.update({f"metrics.{k}": v for k, v in (t["metrics"] or {}).items()})
            record.update({k: t.get(k) for k in ("duration", "started", "ended", "worker_pid", "error", "attempts", "key")})
            records.append(record)
        return pd.DataFrame.from_records(records)

    def __repr__(self) -> str:
        counts = ", ".join(f"{n} {status}" for status, n in self.counts.items()) or "no trials"
        return f"SweepResult({len(self.trials)} trials: {counts}{f', store={self.store!r}' if self.store else ''})"

    def _metric(self, metric: str | None) -> str:
        names = self.metrics()
        chosen = metric or self.metric
        if chosen is None:
            if len(names) == 1:
                return names[0]
            raise InputError(f"Expected metric= to name one of the trials' metrics. Received: metric=None, metrics {names}.")
        if names and chosen not in names:  # with nothing finished yet, any name is allowed
            raise InputError(f"Expected a metric among the trials' metrics {names}. Received: metric={chosen!r}.")
        return chosen


def _check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise InputError(f"Expected mode to be 'max' or 'min'. Received: mode={mode!r}.")
    return str(mode)


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def describe_not_done(trials: list[dict[str, Any]], limit: int = 10) -> str:
    """One line per trial that did not finish: status, config, seed, the last line of its error."""
    lines = []
    for t in trials:
        if t["status"] == "done":
            continue
        error = [line for line in (t["error"] or "").splitlines() if line.strip()]
        lines.append(
            f"  {t['status']:<8} {json.dumps(t['config'], sort_keys=True)} seed {t['seed']}: {error[-1] if error else ''}"
        )
    if not lines:
        return ""
    more = (
        f"\n  ... and {len(lines) - limit} more (SweepResult.trials, or the store's trials table)" if len(lines) > limit else ""
    )
    return "not done:\n" + "\n".join(lines[:limit]) + more
