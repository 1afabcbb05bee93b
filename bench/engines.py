"""Engines against the machine's limits, in one run.

    KERAS_BACKEND=jax python bench/engines.py [--calls 10000]

- the fp32 GEMM peak of this machine: the best ONNX Runtime MatMul over a few shapes (2048^2,
  1024^2, 512^2 and the MLP-like 4096x256x256 and 1024x256x256), 1 thread and all cores;
- on the MLP (32-256-256-10) and the small CNN: best `model.predict`, a warm fleet with the
  Keras engine, with the ONNX engine and with engine="auto", and a one-shot
  `kerasfleet.predict` with the default engine (plan cached) - as rows/s, ratio to the best
  `model.predict`, and as GFLOP/s and share of the GEMM peak (FLOPs per row counted from the
  model's Dense and convolution layers);
- `Predictor` latency for one row over `--calls` calls (p50, p99, p99/p50, retraces), with
  `model.predict` and `model(x)` for one row as the peers.
"""

from __future__ import annotations

import argparse
import os
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
from _common import CEILING_SHAPES, flops_per_row, gemm_ceiling  # noqa: E402
from bulk import build  # noqa: E402


def rate(fn, rows: int) -> float:
    best = 0.0
    for _ in range(3):
        started = time.perf_counter()
        fn()
        best = max(best, rows / (time.perf_counter() - started))
    return best


def latency(fn, calls: int) -> tuple[float, float]:
    times = np.empty(calls)
    for i in range(calls):
        started = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - started
    p50, p99 = np.percentile(times * 1e3, [50, 99])
    return float(p50), float(p99)


def bench_model(name: str, n: int, tmp: Path, peak: float, calls: int) -> None:
    import kerasfleet

    model = build(name)
    path = tmp / f"{name}.keras"
    model.save(path)
    x = np.random.default_rng(0).normal(size=(n, *model.input_shape[1:])).astype("float32")
    rows = {}
    best_b, best = None, 0.0
    for b in (256, 1024, 4096):
        model.predict(x[:b], verbose=0, batch_size=b)
        r = rate(lambda b=b: model.predict(x, verbose=0, batch_size=b), n)
        if r > best:
            best_b, best = b, r
    rows[f"model.predict, best batch ({best_b})"] = best
    for engine in ("keras", "onnx", "auto"):
        with kerasfleet.Fleet(path, engine=engine) as fleet:
            fleet.predict(x[:1000], progress=False)
            r = rate(lambda: fleet.predict(x, progress=False), n)
            rows[
                f"Fleet.predict warm, engine={engine} ({fleet.engine} {fleet.plan.workers}x{fleet.plan.threads_per_worker}, batch {fleet.batch_size or 'default'})"
            ] = r
    started = time.perf_counter()
    kerasfleet.predict(path, x, progress=False)
    rows["kerasfleet.predict one-shot, default engine, plan cached (everything it starts)"] = n / (time.perf_counter() - started)
    flops = flops_per_row(model)
    print(f"\n## {name}: {n:,} rows, {flops:,} FLOPs per row (Dense and conv layers)")
    print("| path | rows/s | vs best model.predict | GFLOP/s | share of GEMM peak |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, r in rows.items():
        print(f"| {label} | {r:,.0f} | {r / best:.2f}x | {r * flops / 1e9:.0f} | {r * flops / 1e9 / peak:.0%} |")
    sys.stdout.flush()
    if name != "mlp":
        return
    one = x[:1]
    print(f"\n## one-row latency on the MLP, {calls:,} calls each")
    print("| path | p50 ms | p99 ms | p99/p50 | retraces after warm-up |")
    print("| --- | ---: | ---: | ---: | ---: |")
    p50, p99 = latency(lambda: model.predict(one, verbose=0), min(calls, 1000))
    print(f"| model.predict ({min(calls, 1000):,} calls) | {p50:.3f} | {p99:.3f} | {p99 / p50:.1f} | - |")
    p50, p99 = latency(lambda: model(one, training=False), calls)
    print(f"| model(x) eager | {p50:.3f} | {p99:.3f} | {p99 / p50:.1f} | - |")
    for engine in ("keras", "onnx"):
        predictor = kerasfleet.Predictor(path, engine=engine, max_batch_size=1024)
        for _ in range(100):
            predictor.predict(one)
        predictor.reset_stats()
        for _ in range(calls):
            predictor.predict(one)
        s = predictor.stats()
        for b in (1, 3, 17, 100, 1000):
            predictor.predict(x[:b])
        print(
            f"| Predictor, engine={engine} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | {s['p99_ms'] / s['p50_ms']:.1f} | "
            f"{predictor.stats()['retraces']} (after sizes 1..1000 too) |"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=10_000)
    args = parser.parse_args()
    import keras

    cores = len(os.sched_getaffinity(0))
    (peak1, shape1), (peak, shape) = gemm_ceiling(1), gemm_ceiling(cores)
    print(f"# keras {keras.__version__}, backend {keras.backend.backend()}, {cores} cores")
    print(
        f"fp32 GEMM peak (best ONNX Runtime MatMul of {', '.join('x'.join(map(str, s)) for s in CEILING_SHAPES)}): "
        f"{peak1:.0f} GFLOP/s on 1 thread ({'x'.join(map(str, shape1))}), {peak:.0f} GFLOP/s on {cores} ({'x'.join(map(str, shape))})"
    )
    tmp = Path(tempfile.mkdtemp(prefix="kf-engines-"))
    for name, n in (("mlp", 400_000), ("cnn", 40_000)):
        bench_model(name, n, tmp, peak, args.calls)


if __name__ == "__main__":
    main()
