"""Bulk prediction throughput: kerasfleet against what Keras users do today, in one run.

    KERAS_BACKEND=jax python bench/bulk.py [--quick] [--models mlp,cnn,mobilenet] [--rows N] [--skip PARTS]

For each model (MLP 32-256-256-10, a small CNN on 32x32x3, MobileNetV2 96x96x3 weights=None)
it times, on the same input in the same process run:

- `model.predict` at the default batch size (32) and at the best of 256/1024/4096 (each the
  best of three runs, like the warm fleets);
- ONNX Runtime in this one process on all usable cores (`intra_op_num_threads` = cores), on
  the file kerasfleet's exporter produced, at the best of batch 256/1024/4096 (best of three);
- the blog recipe: `multiprocessing.Pool(spawn).starmap(predict_chunk, [(model, chunk), ...])`,
  the model passed as a task argument (pickled per task), pool start included; once with
  `model.predict`'s default batch size and once at the best batch size found above;
- joblib (loky) with the model loaded once per worker and cached, at the best batch size: the
  first call (pool start and model loads included) and warm (best of calls 2-4 on the same
  loky workers);
- `kerasfleet.predict(path, x)` one-shot (every process it starts included) and a warm
  `Fleet.predict` (best of three calls on a started fleet), for `engine="keras"`,
  `engine="onnx"` (export cached by a first call, as after a user's first run) and the default
  `engine="auto"` (plan cached by a first call, whose duration is printed); the time each
  fleet took to be ready is printed with it.

Ratios are against the best `model.predict` of the same run; absolute rows/s drift on a
shared machine. The machine's ceiling is measured in the same run: the fp32 GEMM peak (the best
ONNX Runtime MatMul over 2048^2, 1024^2, 512^2 and the MLP-like 4096x256x256 and 1024x256x256,
on 1 thread and on all cores: 2048^2 alone is beaten by the MLP's layers); each model's FLOPs per row are
counted from its Dense and convolution layers, and each path's share of the all-core peak is
rows/s x FLOPs per row / peak. It also measures time to first prediction: a fresh process
that imports keras, loads the model and predicts 100 rows, against a fresh process that
imports kerasfleet and calls kerasfleet.predict on the same 100 rows.

`--quick` runs tiny row counts, a short GEMM measure and one fresh process per
first-prediction case: a smoke run, not a measurement. `--skip` takes a comma list of
`ort,blog,joblib,fleets,first` to leave parts out.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "KERASFLEET_CACHE_DIR" not in os.environ:  # spawned children inherit it: no stray dirs
    os.environ["KERASFLEET_CACHE_DIR"] = tempfile.mkdtemp(prefix="kf-bench-cache-")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import CEILING_SHAPES, body_layers, flops_per_row, gemm_ceiling, joblib_task, machine_facts  # noqa: E402

WORKERS = len(os.sched_getaffinity(0))


def build(name):
    import keras

    keras.utils.set_random_seed(0)
    if name in ("mlp", "cnn"):
        model = keras.Sequential([*body_layers(name), keras.layers.Dense(10)])
    else:
        model = keras.applications.MobileNetV2(input_shape=(96, 96, 3), weights=None)
    return model


def timed(fn, rows):
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    return out, rows / seconds


# -- peers ------------------------------------------------------------------------------------
def predict_chunk(model, chunk, batch_size=None):
    """The blog recipe's task: the model arrives pickled with every task."""
    return model.predict(chunk, verbose=0, batch_size=batch_size)


def blog_recipe(model, x, batch_size=None):
    chunks = np.array_split(x, WORKERS)
    with mp.get_context("spawn").Pool(WORKERS) as pool:  # fork hangs with TF/JAX started
        return np.concatenate(pool.starmap(predict_chunk, [(model, c, batch_size) for c in chunks]))


def joblib_run(path, x, batch_size):
    # joblib_task lives in bench/_common.py: imported by reference, its model cache persists in
    # each loky worker (a task defined here in __main__ would be pickled with a fresh cache).
    from joblib import Parallel, delayed

    chunks = np.array_split(x, WORKERS * 4)
    return np.concatenate(Parallel(n_jobs=WORKERS)(delayed(joblib_task)(path, c, batch_size) for c in chunks))


def stop_joblib_workers():
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True)


def onnxruntime_rows(path, x, batches):
    """ONNX Runtime in this process on all usable cores, on kerasfleet's checked export."""
    import onnxruntime as ort

    from kerasfleet.engines.export import export
    from kerasfleet.engines.model_file import resolve_model

    onnx = export(resolve_model(path), custom_objects=None, safe_mode=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = WORKERS
    session = ort.InferenceSession(str(onnx.path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(b):
        return np.concatenate([session.run(None, {name: x[lo : lo + b]})[0] for lo in range(0, len(x), b)])

    best, best_b, out = 0.0, None, None
    for b in batches:
        session.run(None, {name: x[:b]})  # the first call of a shape allocates; not counted
        for _ in range(3):
            out_b, rate = timed(lambda b=b: run(b), len(x))
            if rate > best:
                best, best_b, out = rate, b, out_b
    return out, best, best_b


# -- time to first prediction ---------------------------------------------------------------
def first_prediction(path, x_path, repeat=3):
    """Best of `repeat` fresh processes: import + load + predict 100 rows, Keras alone vs kerasfleet."""
    single = (
        f"import keras, numpy as np; m = keras.saving.load_model({str(path)!r}); m.predict(np.load({str(x_path)!r}), verbose=0)"
    )
    fleet = f"import kerasfleet; kerasfleet.predict({str(path)!r}, {str(x_path)!r}, engine='keras', progress=False)"
    auto = f"import kerasfleet; kerasfleet.predict({str(path)!r}, {str(x_path)!r}, progress=False)"
    times = {}
    for label, code in (("single process", single), ("kerasfleet", fleet), ("auto", auto)):
        runs = []
        for _ in range(repeat):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})
            runs.append(time.perf_counter() - start)
        times[label] = min(runs)
    return times


def check(out, reference, label):
    worst = float(np.abs(out - reference).max())
    assert np.allclose(out, reference, rtol=1e-4, atol=1e-5), f"{label}: max abs diff {worst:.1e} vs model.predict"
    return worst


def bench_model(name, n, tmp, peak, skip, repeat):
    import kerasfleet

    model = build(name)
    path = tmp / f"{name}.keras"
    model.save(path)
    flops = flops_per_row(model)
    x = np.random.default_rng(0).normal(size=(n, *model.input_shape[1:])).astype("float32")
    model.predict(x[:64], verbose=0)  # the first call traces; not counted against Keras
    reference = model.predict(x, verbose=0, batch_size=1024)
    results = {}
    diff = 0.0
    # model.predict gets the best of three runs, as warm fleets do: fair to the peer.
    results["model.predict, batch 32 (default)"] = max(timed(lambda: model.predict(x, verbose=0), n)[1] for _ in range(3))
    best, best_b = results["model.predict, batch 32 (default)"], 32
    for b in (256, 1024, 4096):
        model.predict(x[:b], verbose=0, batch_size=b)  # trace that shape first
        rate = max(timed(lambda b=b: model.predict(x, verbose=0, batch_size=b), n)[1] for _ in range(3))
        if rate > best:
            best, best_b = rate, b
    results[f"model.predict, best batch size ({best_b})"] = best
    if "ort" not in skip:
        out, rate, ort_b = onnxruntime_rows(path, x, (256, 1024, 4096))
        diff = max(diff, check(out, reference, "ONNX Runtime"))
        results[f"ONNX Runtime in one process, {WORKERS} threads, best batch size ({ort_b})"] = rate
    if "blog" not in skip:
        out, results["blog recipe: Pool(spawn).starmap((model, chunk))"] = timed(lambda: blog_recipe(model, x), n)
        diff = max(diff, check(out, reference, "blog recipe"))
        out, results[f"blog recipe at the best batch size ({best_b})"] = timed(lambda: blog_recipe(model, x, best_b), n)
        diff = max(diff, check(out, reference, "blog recipe, best batch"))
    if "joblib" not in skip:
        stop_joblib_workers()  # a cold first call: no loky workers left from an earlier model
        out, first = timed(lambda: joblib_run(str(path), x, best_b), n)
        diff = max(diff, check(out, reference, "joblib"))
        warm = [timed(lambda: joblib_run(str(path), x, best_b), n) for _ in range(3)]
        diff = max(diff, max(check(o, reference, "joblib warm") for o, _ in warm))
        stop_joblib_workers()
        results[
            f"joblib (loky), model cached per worker, batch {best_b}: first call ({n / first:.2f} s, pool start and loads)"
        ] = first
        results[f"joblib (loky), model cached per worker, batch {best_b}: warm (best of calls 2-4)"] = max(r for _, r in warm)

    def fleet_rows(engine, label):
        out, results[f"kerasfleet.predict, {label}, one-shot"] = timed(
            lambda: kerasfleet.predict(path, x, engine=engine, progress=False), n
        )
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

    if "fleets" not in skip:
        diff = max(diff, fleet_rows("keras", "engine=keras"))
        kerasfleet.predict(path, x[:10], engine="onnx", progress=False)  # export once; cached from here on
        diff = max(diff, fleet_rows("onnx", "engine=onnx (export cached)"))
        started = time.perf_counter()
        kerasfleet.predict(path, x[:10], progress=False)  # the first auto call measures the plan
        tune_s = time.perf_counter() - started
        diff = max(diff, fleet_rows("auto", f"engine=auto (plan cached; measuring it took {tune_s:.1f} s once)"))
    ceiling = peak * 1e9 / flops
    print(f"\n## {name}: {n:,} rows, {model.count_params():,} params (max abs diff vs model.predict: {diff:.1e})")
    print(
        f"{flops / 1e6:,.3f} MFLOP per row (Dense and conv layers); at the all-core GEMM peak of {peak:.0f} GFLOP/s "
        f"the ceiling is {ceiling:,.0f} rows/s"
    )
    print("| path | rows/s | vs best model.predict | GFLOP/s | share of GEMM peak |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, rate in results.items():
        print(f"| {label} | {rate:,.0f} | {rate / best:.2f}x | {rate * flops / 1e9:,.1f} | {rate / ceiling:.1%} |")
    sys.stdout.flush()
    if name == "mlp" and "first" not in skip:
        x_path = tmp / "x100.npy"
        np.save(x_path, x[:100])
        if "fleets" in skip:
            kerasfleet.predict(path, x[:10], progress=False)  # cache the plan, as the auto rows would have
        t = first_prediction(path, x_path, repeat)
        print(
            f"\ntime to first prediction (fresh process, 100 rows, best of {repeat}): import+load+predict "
            f"{t['single process']:.2f} s; kerasfleet.predict engine=keras {t['kerasfleet']:.2f} s "
            f"(ratio {t['kerasfleet'] / t['single process']:.2f}); default engine, plan cached {t['auto']:.2f} s "
            f"(ratio {t['auto'] / t['single process']:.2f})"
        )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--quick", action="store_true", help="tiny row counts, short GEMM measure (a smoke run, not a measurement)"
    )
    parser.add_argument("--models", default="mlp,cnn,mobilenet")
    parser.add_argument("--rows", type=int, default=None, help="rows for every model (overrides the defaults)")
    parser.add_argument("--skip", default="", help="comma list of parts to leave out: ort,blog,joblib,fleets,first")
    args = parser.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - {"ort", "blog", "joblib", "fleets", "first"}
    if unknown:
        parser.error(f"unknown --skip parts: {','.join(sorted(unknown))}")
    import keras  # noqa: F401  (machine_facts reads its backend)

    rows = {"mlp": 300_000, "cnn": 40_000, "mobilenet": 2_000}
    if args.quick:
        rows = {"mlp": 5_000, "cnn": 500, "mobilenet": 50}
    if args.rows is not None:
        rows = dict.fromkeys(rows, args.rows)
    print(machine_facts())
    seconds = 0.2 if args.quick else 1.0
    (peak1, shape1), (peak, shape) = gemm_ceiling(1, seconds), gemm_ceiling(WORKERS, seconds)
    print(
        f"# fp32 GEMM peak, measured now (best ONNX Runtime MatMul of {', '.join('x'.join(map(str, s)) for s in CEILING_SHAPES)}): "
        f"{peak1:.0f} GFLOP/s on 1 thread ({'x'.join(map(str, shape1))}), {peak:.0f} GFLOP/s on {WORKERS} ({'x'.join(map(str, shape))})"
    )
    sys.stdout.flush()
    tmp = Path(tempfile.mkdtemp(prefix="kf-bench-"))
    for name in args.models.split(","):
        bench_model(name, rows[name], tmp, peak, skip, 1 if args.quick else 3)


if __name__ == "__main__":
    main()
