"""Experiment sweeps: configs x seeds of a small Keras training, run five ways on this machine.

    KERAS_BACKEND=jax python bench/sweep.py [--configs 8] [--seeds 4] [--epochs 3] [--rows 4096] [--skip PARTS]

Each trial trains an MLP (32 -> units -> units -> 10, Adam at lr, batch size bs) for `--epochs`
epochs on `--rows` synthetic rows (20% held out) and returns its validation accuracy. The
default 8 configs (units 64/128 x lr 1e-3/3e-3 x batch 32/64) x 4 seeds are 32 trials. Ways:

- sequential: a loop in this one process (warmed up before the clock starts: imports, a first
  tiny fit);
- the seed recipe: `multiprocessing.Pool(spawn).starmap(train, trials)` with one process per
  core and no thread limits (each process's framework uses every core), pool start included;
- joblib: `Parallel(n_jobs=cores)` (loky processes, its default thread handling), workers
  started by the call;
- Optuna: `study.optimize(objective, n_trials, n_jobs=cores)` - threads in this process (the
  GIL), a GridSampler over (config, seed) so it runs exactly the same trials;
- `kerasfleet.sweep(train, configs=..., seeds=...)`: workers x 1 thread = cores, a fresh
  SQLite store (one commit per trial), worker start included, and a fresh (empty) JAX
  compilation cache shared by its workers: each architecture compiles once in the run;
- the same with `compile_cache=False`: every trial compiles, as in the other ways.

Wall time of each, speed-up against the sequential loop, and efficiency = speed-up / usable
cores. The trial function is defined here, in the script's `__main__`, as users write it: Pool
imports it by name in its spawned children (hence the main guard), joblib and kerasfleet send
it by value (cloudpickle). The header has the machine's facts and its fp32 GEMM ceiling (as in
bench/bulk.py), measured in the same run. `--skip` takes a comma list of
`sequential,pool,joblib,optuna,kerasfleet`.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).parent))
from _common import CEILING_SHAPES, cores, gemm_ceiling, machine_facts  # noqa: E402

PARTS = ("sequential", "pool", "joblib", "optuna", "kerasfleet", "kerasfleet-nocache")


def train(units, lr, batch_size, epochs, rows, seed):
    """One trial: what a user's sweep function looks like (imports inside, a dict of numbers out)."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(1234)  # the same data for every trial
    x = rng.normal(size=(rows, 32)).astype("float32")
    w = rng.normal(size=(32, 10)).astype("float32")
    y = np.argmax(x @ w + rng.normal(scale=2.0, size=(rows, 10)), axis=1)
    model = keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(units, activation="relu"),
            keras.layers.Dense(units, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(keras.optimizers.Adam(lr), keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = model.fit(x, y, epochs=epochs, batch_size=batch_size, validation_split=0.2, verbose=0)
    return {"val_accuracy": float(history.history["val_accuracy"][-1]), "loss": float(history.history["loss"][-1])}


def make_configs(n, epochs, rows):
    grid = itertools.product((64, 128), (1e-3, 3e-3), (32, 64))
    configs = [{"units": u, "lr": lr, "batch_size": b, "epochs": epochs, "rows": rows} for u, lr, b in grid]
    if n > len(configs):
        raise SystemExit(f"--configs at most {len(configs)}")
    return configs[:n]


def run_sequential(configs, seeds):
    return [train(**c, seed=s) for c in configs for s in seeds]


def run_pool(configs, seeds):
    trials = [(c["units"], c["lr"], c["batch_size"], c["epochs"], c["rows"], s) for c in configs for s in seeds]
    with mp.get_context("spawn").Pool(cores()) as pool:  # fork hangs with a framework started
        return pool.starmap(train, trials)


def run_joblib(configs, seeds):
    from joblib import Parallel, delayed
    from joblib.externals.loky import get_reusable_executor

    try:
        return Parallel(n_jobs=cores())(delayed(train)(**c, seed=s) for c in configs for s in seeds)
    finally:
        get_reusable_executor().shutdown(wait=True)  # the next way starts on an idle machine


def run_optuna(configs, seeds):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {"config": list(range(len(configs))), "seed": list(seeds)}
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.GridSampler(space))
    results = []

    def objective(trial):
        result = train(
            **configs[trial.suggest_categorical("config", space["config"])], seed=trial.suggest_categorical("seed", space["seed"])
        )
        results.append(result)
        return result["val_accuracy"]

    study.optimize(objective, n_trials=len(configs) * len(seeds), n_jobs=cores())
    return results


def run_kerasfleet(configs, seeds, compile_cache=True):
    import kerasfleet

    folder = Path(tempfile.mkdtemp(prefix="kf-bench-sweep-"))
    # A fresh, empty compilation cache: every architecture is compiled in this run, as in the others.
    cache = folder / "xla" if compile_cache else False
    result = kerasfleet.sweep(
        train,
        configs=configs,
        seeds=seeds,
        store=folder / "runs.sqlite",
        metric="val_accuracy",
        compile_cache=cache,
        progress=False,
    )
    if result.counts != {"done": len(configs) * len(seeds)}:
        raise RuntimeError(f"kerasfleet.sweep did not finish every trial: {result!r}")
    return [t["metrics"] for t in result.trials]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", type=int, default=8, help="configs (at most 8)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per config")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rows", type=int, default=4096, help="synthetic rows per trial (20%% held out)")
    parser.add_argument("--skip", default="", help=f"comma list of parts to leave out: {','.join(PARTS)}")
    args = parser.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(PARTS):
        parser.error(f"unknown --skip parts: {','.join(sorted(skip - set(PARTS)))}")
    import keras  # noqa: F401  (machine_facts reads its backend; the sequential loop's import is not timed)

    configs, seeds = make_configs(args.configs, args.epochs, args.rows), list(range(args.seeds))
    n = len(configs) * len(seeds)
    print(machine_facts())
    (peak1, shape1), (peak, shape) = gemm_ceiling(1, 1.0), gemm_ceiling(cores(), 1.0)
    print(
        f"# fp32 GEMM peak, measured now (best ONNX Runtime MatMul of {', '.join('x'.join(map(str, s)) for s in CEILING_SHAPES)}): "
        f"{peak1:.0f} GFLOP/s on 1 thread ({'x'.join(map(str, shape1))}), {peak:.0f} GFLOP/s on {cores()} ({'x'.join(map(str, shape))})"
    )
    print(f"# {n} trials: {len(configs)} configs x {len(seeds)} seeds, {args.epochs} epochs on {args.rows} rows each")
    # The in-process ways (the loop, Optuna's threads) start warm, like a user's second run in a
    # notebook: TensorFlow's import by set_random_seed and the first compile are not timed.
    started = time.perf_counter()
    train(units=8, lr=1e-3, batch_size=32, epochs=1, rows=64, seed=0)
    print(f"# warm-up of this process (imports, first fit), not timed: {time.perf_counter() - started:.1f} s")
    sys.stdout.flush()
    ways = {
        "sequential": ("sequential loop, one process", run_sequential),
        "pool": (f"seed recipe: Pool(spawn, {cores()}).starmap, no thread limits", run_pool),
        "joblib": (f"joblib Parallel(n_jobs={cores()}) (loky)", run_joblib),
        "optuna": (f"Optuna study.optimize(n_jobs={cores()}) (threads)", run_optuna),
        "kerasfleet": ("kerasfleet.sweep", run_kerasfleet),
        "kerasfleet-nocache": ("kerasfleet.sweep(compile_cache=False)", lambda c, s: run_kerasfleet(c, s, compile_cache=False)),
    }
    times = {}
    print("\n| way | wall s | s / trial | vs sequential | efficiency (speed-up / cores) | mean val_accuracy |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for part, (label, run) in ways.items():
        if part in skip:
            continue
        started = time.perf_counter()
        results = run(configs, seeds)
        seconds = time.perf_counter() - started
        if len(results) != n:
            raise RuntimeError(f"{label}: {len(results)} results for {n} trials")
        times[part] = seconds
        base = times.get("sequential")
        speedup = f"{base / seconds:.2f}x" if base else "-"
        efficiency = f"{base / seconds / cores():.0%}" if base else "-"
        accuracy = sum(r["val_accuracy"] for r in results) / n
        print(f"| {label} | {seconds:.1f} | {seconds / n:.2f} | {speedup} | {efficiency} | {accuracy:.4f} |")
        sys.stdout.flush()
    for part in ("kerasfleet", "kerasfleet-nocache"):
        if part in times and "pool" in times:
            print(f"# {ways[part][0]} vs the seed recipe: {times['pool'] / times[part]:.2f}x")


if __name__ == "__main__":
    main()
