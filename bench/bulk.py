"""Bulk prediction throughput: kerasfleet against what Keras users do today, in one run.

    KERAS_BACKEND=jax python bench/bulk.py [--quick] [--models mlp,cnn,mobilenet]

For each model (MLP 32-256-256-10, a small CNN on 32x32x3, MobileNetV2 96x96x3 weights=None)
it times, on the same input in the same process run:

- `model.predict` at the default batch size (32) and at the best of 256/1024/4096 (each the
  best of three runs, like the warm fleets);
- the blog recipe: `multiprocessing.Pool(spawn).starmap(predict_chunk, [(model, chunk), ...])`,
  the model passed as a task argument (pickled per task), pool start included;
- joblib (loky) with the model loaded once per worker and cached, pool start included;
- `kerasfleet.predict(path, x)` one-shot (every process it starts included) and a warm
  `Fleet.predict` (best of three calls on a started fleet), for `engine="keras"`,
  `engine="onnx"` (export cached by a first call, as after a user's first run) and the default
  `engine="auto"` (plan cached by a first call, whose duration is printed); the time each
  fleet took to be ready is printed with it.

Ratios are against the best `model.predict` of the same run; absolute rows/s drift on a
shared machine. It also measures time to first prediction: a fresh process that imports
keras, loads the model and predicts 100 rows, against a fresh process that imports kerasfleet
and calls kerasfleet.predict on the same 100 rows.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERASFLEET_CACHE_DIR", tempfile.mkdtemp(prefix="kf-bench-cache-"))

import numpy as np  # noqa: E402

WORKERS = len(os.sched_getaffinity(0))


def build(name):
    import keras

    keras.utils.set_random_seed(0)
    if name == "mlp":
        model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(256, activation="relu"), keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10)])
    elif name == "cnn":
        model = keras.Sequential(
            [
                keras.Input((32, 32, 3)),
                keras.layers.Conv2D(32, 3, activation="relu"),
                keras.layers.MaxPooling2D(),
                keras.layers.Conv2D(64, 3, activation="relu"),
                keras.layers.MaxPooling2D(),
                keras.layers.Flatten(),
                keras.layers.Dense(128, activation="relu"),
                keras.layers.Dense(10),
            ]
        )
    else:
        model = keras.applications.MobileNetV2(input_shape=(96, 96, 3), weights=None)
    return model


def timed(fn, rows):
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    return out, rows / seconds


# -- peers ------------------------------------------------------------------------------------
def predict_chunk(model, chunk):
    """The blog recipe's task: the model arrives pickled with every task."""
    return model.predict(chunk, verbose=0)


def blog_recipe(model, x):
    chunks = np.array_split(x, WORKERS)
    with mp.get_context("spawn").Pool(WORKERS) as pool:  # fork hangs with TF/JAX started
        return np.concatenate(pool.starmap(predict_chunk, [(model, c) for c in chunks]))


_cached = {}


def joblib_task(path, chunk):
    import keras

    if path not in _cached:
        _cached[path] = keras.saving.load_model(path)
    return _cached[path].predict(chunk, verbose=0, batch_size=1024)


def joblib_run(path, x):
    from joblib import Parallel, delayed

    chunks = np.array_split(x, WORKERS * 4)
    return np.concatenate(Parallel(n_jobs=WORKERS)(delayed(joblib_task)(path, c) for c in chunks))


# -- time to first prediction ---------------------------------------------------------------
def first_prediction(path, x_path):
    """Best of 3 fresh processes: import + load + predict 100 rows, Keras alone vs kerasfleet."""
    single = f"import keras, numpy as np; m = keras.saving.load_model({str(path)!r}); m.predict(np.load({str(x_path)!r}), verbose=0)"
    fleet = f"import kerasfleet; kerasfleet.predict({str(path)!r}, {str(x_path)!r}, engine='keras', progress=False)"
    auto = f"import kerasfleet; kerasfleet.predict({str(path)!r}, {str(x_path)!r}, progress=False)"
    times = {}
    for label, code in (("single process", single), ("kerasfleet", fleet), ("auto", auto)):
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})
            runs.append(time.perf_counter() - start)
        times[label] = min(runs)
    return times


def bench_model(name, n, tmp):
    import kerasfleet

    model = build(name)
    path = tmp / f"{name}.keras"
    model.save(path)
    x = np.random.default_rng(0).normal(size=(n, *model.input_shape[1:])).astype("float32")
    model.predict(x[:64], verbose=0)  # the first call traces; not counted against Keras
    reference = model.predict(x, verbose=0, batch_size=1024)
    results = {}
    # model.predict gets the best of three runs, as warm fleets do: fair to the peer.
    results["model.predict, batch 32 (default)"] = max(timed(lambda: model.predict(x, verbose=0), n)[1] for _ in range(3))
    best, best_b = results["model.predict, batch 32 (default)"], 32
    for b in (256, 1024, 4096):
        model.predict(x[:b], verbose=0, batch_size=b)  # trace that shape first
        rate = max(timed(lambda b=b: model.predict(x, verbose=0, batch_size=b), n)[1] for _ in range(3))
        if rate > best:
            best, best_b = rate, b
    results[f"model.predict, best batch size ({best_b})"] = best
    out, results["blog recipe: Pool(spawn).starmap((model, chunk))"] = timed(lambda: blog_recipe(model, x), n)
    assert np.allclose(out, reference, rtol=1e-4, atol=1e-5)
    out, results["joblib (loky), model cached per worker"] = timed(lambda: joblib_run(str(path), x), n)
    assert np.allclose(out, reference, rtol=1e-4, atol=1e-5)
    def fleet_rows(engine, label):
        out, results[f"kerasfleet.predict, {label}, one-shot"] = timed(lambda: kerasfleet.predict(path, x, engine=engine, progress=False), n)
        worst = float(np.abs(out - reference).max())
        started = time.perf_counter()
        with kerasfleet.Fleet(path, engine=engine) as fleet:
            fleet.wait_ready()
            ready_s = time.perf_counter() - started
            fleet.predict(x[: max(1, n // 10)], progress=False)
            warm = [timed(lambda: fleet.predict(x, progress=False), n) for _ in range(3)]
            where = f"{fleet.engine}, {fleet.plan.workers}x{fleet.plan.threads_per_worker}, batch {fleet.batch_size or 'default'}"
        results[f"kerasfleet Fleet.predict, {label}, warm ({where}; ready in {ready_s:.2f} s)"] = max(rate for _, rate in warm)
        return max(worst, max(float(np.abs(o - reference).max()) for o, _ in warm))

    diff = fleet_rows("keras", "engine=keras")
    kerasfleet.predict(path, x[:10], engine="onnx", progress=False)  # export once; cached from here on
    diff = max(diff, fleet_rows("onnx", "engine=onnx (export cached)"))
    started = time.perf_counter()
    kerasfleet.predict(path, x[:10], progress=False)  # the first auto call measures the plan
    tune_s = time.perf_counter() - started
    diff = max(diff, fleet_rows("auto", f"engine=auto (plan cached; measuring it took {tune_s:.1f} s once)"))
    print(f"\n## {name}: {n:,} rows, {model.count_params():,} params (max abs diff vs model.predict: {diff:.1e})")
    print("| path | rows/s | vs best model.predict |")
    print("| --- | ---: | ---: |")
    for label, rate in results.items():
        print(f"| {label} | {rate:,.0f} | {rate / best:.2f}x |")
    sys.stdout.flush()
    if name == "mlp":
        x_path = tmp / "x100.npy"
        np.save(x_path, x[:100])
        t = first_prediction(path, x_path)
        print(
            f"\ntime to first prediction (fresh process, 100 rows, best of 3): import+load+predict "
            f"{t['single process']:.2f} s; kerasfleet.predict engine=keras {t['kerasfleet']:.2f} s "
            f"(ratio {t['kerasfleet'] / t['single process']:.2f}); default engine, plan cached {t['auto']:.2f} s "
            f"(ratio {t['auto'] / t['single process']:.2f})"
        )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer rows (a smoke run, not a measurement)")
    parser.add_argument("--models", default="mlp,cnn,mobilenet")
    args = parser.parse_args()
    import keras

    import kerasfleet

    scale = 0.1 if args.quick else 1.0
    rows = {"mlp": int(300_000 * scale), "cnn": int(40_000 * scale), "mobilenet": int(2_000 * scale)}
    print(f"# {platform.machine()}, {WORKERS} usable cores, python {platform.python_version()}, numpy {np.__version__}")
    print(f"# keras {keras.__version__}, backend {keras.backend.backend()}, kerasfleet {kerasfleet.__version__}")
    tmp = Path(tempfile.mkdtemp(prefix="kf-bench-"))
    for name in args.models.split(","):
        bench_model(name, rows[name], tmp)


if __name__ == "__main__":
    main()
