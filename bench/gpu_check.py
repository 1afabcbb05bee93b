"""GPU assignment and CPU scaling on a machine with a GPU and many cores (a lent device machine).

    KERAS_BACKEND=jax python bench/gpu_check.py [--rows 200000] [--seconds 3]

1. What the plan does with the GPU: `make_plan()` (devices="auto"), a `Fleet` on the GPU (one
   worker, `CUDA_VISIBLE_DEVICES` set to its GPU), its results against `model.predict` in this
   process (on the GPU too), and rows/s of both on the CNN.
2. CPU scaling: Keras-engine fleets of 1, 2, 4, 8 and all usable cores (1 thread each, CPU
   workers never see the GPU) on the CNN, rows/s and efficiency against 1 worker.

The Keras engine is used throughout (the ONNX export needs TensorFlow, which such a machine may
lack). Prints one line per measurement and a JSON summary at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import body_layers  # noqa: E402


def build_cnn():
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([*body_layers("cnn"), keras.layers.Dense(10)])


def rate(fn, rows, seconds):
    fn()  # warm
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()
        done += rows
    return done / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    import keras

    import kerasfleet

    summary = {}
    smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    summary["gpus"] = smi.stdout.strip()
    print(
        f"# {summary['gpus']}; cores {os.cpu_count()}, usable {len(os.sched_getaffinity(0))}; keras {keras.__version__}, backend {keras.backend.backend()}"
    )
    import jax

    print(f"# jax {jax.__version__}: {jax.devices()}")
    plan = kerasfleet.make_plan()
    summary["plan_auto"] = plan.describe()
    print(f"plan (devices=auto): {plan.describe()}")
    model = build_cnn()
    path = Path(tempfile.mkdtemp()) / "cnn.keras"
    model.save(path)
    x = np.random.default_rng(0).normal(size=(args.rows, 32, 32, 3)).astype("float32")
    want = model.predict(x[:4096], batch_size=1024, verbose=0)
    r = rate(lambda: model.predict(x, batch_size=4096, verbose=0), args.rows, args.seconds)
    summary["model.predict_gpu_rows_per_s"] = r
    print(f"model.predict on the GPU (this process, batch 4096): {r:,.0f} rows/s")

    started = time.perf_counter()
    with kerasfleet.Fleet(path, engine="keras", devices="auto") as fleet:
        fleet.wait_ready()
        ready = time.perf_counter() - started
        stats = fleet.stats()
        got = fleet.predict(x[:4096])
        diff = float(np.max(np.abs(got - want)))
        r = rate(lambda: fleet.predict(x), args.rows, args.seconds)
        summary["gpu_fleet"] = {
            "plan": stats["plan"],
            "workers": stats["workers"],
            "batch": fleet.batch_size,
            "ready_s": ready,
            "max_abs_diff_vs_model_predict": diff,
            "rows_per_s": r,
        }
        print(f"GPU fleet: {stats['plan']}, batch {fleet.batch_size}, ready in {ready:.1f} s, workers {stats['workers']}")
        print(f"GPU fleet: {r:,.0f} rows/s; max abs diff vs model.predict {diff:.2e}")

    usable = len(os.sched_getaffinity(0))
    counts = sorted({c for c in (1, 2, 4, 8, usable) if c <= usable})
    scaling = {}
    for workers in counts:
        started = time.perf_counter()
        with kerasfleet.Fleet(path, engine="keras", devices="cpu", workers=workers, threads_per_worker=1) as fleet:
            fleet.wait_ready()
            ready = time.perf_counter() - started
            got = fleet.predict(x[:4096])
            diff = float(np.max(np.abs(got - want)))
            r = rate(lambda: fleet.predict(x), args.rows, args.seconds)
        scaling[workers] = r
        eff = r / (scaling[counts[0]] * workers)
        print(
            f"CPU fleet {workers:>2} x 1 thread: {r:,.0f} rows/s, efficiency {eff:.2f} vs 1 worker, ready in {ready:.1f} s, max abs diff {diff:.1e}"
        )
    summary["cpu_scaling_rows_per_s"] = scaling
    print("SUMMARY " + json.dumps(summary))


if __name__ == "__main__":
    main()
