"""What a sweep runs: configs x seeds, each trial with a stable key; every check before any work.

    grid={"lr": [1e-3, 1e-2], "units": [16, 32]}  ─ sampler="grid"   ─► the product (4 configs)
    configs=[{"lr": 1e-3, "units": 16}, ...]      ─ sampler="grid"   ─► those configs
    grid + n_trials                               ─ sampler="random" ─► n distinct configs of the
                                                                         product, drawn with a fixed
                                                                         RNG seed (a re-run draws the
                                                                         same ones, so it resumes)
    grid (lists or Optuna distributions) + n_trials ─ an Optuna study ─► asked one config at a time
                                                                         (see study.py)
    every config x every seed ─► TrialSpec(key, config, seed): key = hash(fn name, config, seed)
    a worker is free ─► pick(): a config it already ran, else one nobody started, else the first

Configs are JSON (str, int, float, bool, None, lists and dicts of them): they are stored as JSON
and the key hashes their canonical JSON, so the same config is the same trial in every run.
NumPy scalars and arrays in a grid are converted to Python values.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

# Seeds go to np.random.seed and keras.utils.set_random_seed: both want 0 <= seed < 2**32.
SEED_LIMIT = 1 << 32
# The random sampler's own seed: fixed, so the same call draws the same configs (and resumes).
RANDOM_SAMPLER_SEED = 0


@dataclass(frozen=True)
class TrialSpec:
    """One trial: a config and a seed; `key` identifies it in the store across runs."""

    key: str
    config: dict[str, Any]
    seed: int
    config_id: str  # the config's canonical JSON: groups a config's seeds


def canonical(config: Mapping[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)


def trial_key(fn_name: str, config_id: str, seed: int) -> str:
    return hashlib.sha256(f"{fn_name}\n{config_id}\n{seed}".encode()).hexdigest()[:32]


def trials_for(fn_name: str, configs: Iterable[dict[str, Any]], seeds: Sequence[int]) -> list[TrialSpec]:
    """Every config x every seed, a config's seeds next to each other (its mean is complete early)."""
    specs: list[TrialSpec] = []
    for config in configs:
        config_id = canonical(config)
        specs.extend(TrialSpec(trial_key(fn_name, config_id, seed), config, seed, config_id) for seed in seeds)
    return specs


def pick(todo: Sequence[TrialSpec], warm: set[str], started: set[str]) -> int:
    """Which queued trial a free worker runs next (an index into `todo`, which is not empty).

    A trial of a config the worker already ran (`warm`: its compiled functions are cached),
    else the first trial of a config no worker has started (it compiles once, here), else the
    first one: an idle worker never waits for a better match.
    """
    fresh = None
    for index, spec in enumerate(todo):
        if spec.config_id in warm:
            return index
        if fresh is None and spec.config_id not in started:
            fresh = index
            if not warm:
                break  # nothing beats a fresh config for a worker that has run nothing
    return fresh if fresh is not None else 0


def check_seeds(seeds: Any) -> tuple[int, ...]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = (seeds,)
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable):
        raise InputError(f"Expected seeds to be a list of ints, e.g. seeds=(0, 1, 2). Received: seeds={seeds!r}.")
    out = tuple(_plain(s) for s in seeds)
    bad = [s for s in out if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < SEED_LIMIT]
    if not out or bad:
        raise InputError(
            f"Expected seeds to be a non-empty list of ints in [0, 2**32), e.g. seeds=(0, 1, 2). Received: seeds={seeds!r}."
        )
    if len(set(out)) != len(out):
        raise InputError(f"Expected distinct seeds (each seed is one run of every config). Received: seeds={list(out)}.")
    return out


def check_grid(grid: Any, *, distributions: bool = False) -> dict[str, list[Any] | Any]:
    """{name: [values]} with at least one value each; Optuna distributions too when `distributions`."""
    if not isinstance(grid, Mapping) or not grid:
        raise InputError(
            f"Expected grid to be a non-empty dict of value lists, e.g. grid={{'lr': [1e-3, 1e-2]}}. Received: grid={grid!r}."
        )
    out: dict[str, list[Any] | Any] = {}
    for name, values in grid.items():
        _check_name(name, "grid")
        if distributions and _is_distribution(values):
            out[name] = values
            continue
        if hasattr(values, "tolist") and not isinstance(values, (str, bytes)):
            values = values.tolist()  # a NumPy array (np.logspace(...))
        if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
            hint = " or an Optuna distribution" if distributions else ""
            raise InputError(
                f"Expected each grid value to be a list of candidate values{hint}. Received: {name}={values!r} "
                f"(for a single value write {name}=[{values!r}])."
            )
        values = [_plain(v) for v in values]
        if not values:
            raise InputError(f"Expected at least one value for each grid key. Received: {name}=[].")
        for value in values:
            _check_json(name, value)
        out[name] = values
    return out


def check_configs(configs: Any) -> list[dict[str, Any]]:
    if isinstance(configs, Mapping) or isinstance(configs, (str, bytes)) or not isinstance(configs, Iterable):
        raise InputError(f"Expected configs to be a list of dicts, e.g. configs=[{{'lr': 1e-3}}]. Received: configs={configs!r}.")
    out = []
    for config in configs:
        if not isinstance(config, Mapping):
            raise InputError(f"Expected each config to be a dict of arguments. Received: {config!r}.")
        plain = {}
        for name, value in config.items():
            _check_name(name, "config")
            plain[name] = _plain(value)
            _check_json(name, plain[name])
        out.append(plain)
    if not out:
        raise InputError("Expected at least one config. Received: configs=[].")
    ids = [canonical(c) for c in out]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise InputError(f"Expected distinct configs (seeds repeat a config). Received: duplicates {dupes}.")
    return out


def expand_grid(grid: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def draw_random(grid: Mapping[str, list[Any]], n_trials: int) -> list[dict[str, Any]]:
    """`n_trials` distinct configs of the grid's product, uniformly, with a fixed RNG seed."""
    names = list(grid)
    sizes = [len(grid[n]) for n in names]
    total = math.prod(sizes)
    if n_trials > total:
        raise InputError(
            f"Expected n_trials <= the grid's {total} distinct configs for sampler='random'. Received: n_trials={n_trials}. "
            "Use sampler='grid' to run them all."
        )
    rng = random.Random(RANDOM_SAMPLER_SEED)
    configs = []
    for index in rng.sample(range(total), n_trials):  # range: no list of a huge product is built
        config = {}
        for name, size in zip(reversed(names), reversed(sizes)):
            index, position = divmod(index, size)
            config[name] = grid[name][position]
        configs.append({n: config[n] for n in names})
    return configs


def check_positive_int(value: Any, name: str, *, optional: bool = True) -> int | None:
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"Expected {name} to be a positive int{' or None' if optional else ''}. Received: {name}={value!r}.")
    return value


def check_positive_number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise InputError(f"Expected {name} to be a positive number or None. Received: {name}={value!r}.")
    return float(value)


def _check_name(name: Any, where: str) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise InputError(f"Expected {where} keys to be argument names of the function. Received: {name!r}.")
    if name == "seed":
        raise InputError(f"Expected no 'seed' key in the {where}: seeds come from seeds=. Received: seed in the {where}.")


def _check_json(name: str, value: Any) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"Expected config values to be JSON (str, int, float, bool, None, lists and dicts of them; they are stored "
            f"as JSON). Received: {name}={value!r} ({exc})."
        ) from None


def _plain(value: Any) -> Any:
    """NumPy scalars to Python ones (np.int64 is no int; np.float32 is no float)."""
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


def _is_distribution(value: Any) -> bool:
    return type(value).__module__.startswith("optuna.distributions")
