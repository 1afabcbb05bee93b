"""Past the fp32 ceiling: int8 and bf16 against the best fp32 engines, with accuracy, in one run.

    KERAS_BACKEND=jax python bench/precision.py [--models mlp,cnn,mobilenet] [--seconds 1.0]

For the bench MLP (32-256-256-10), the small CNN (32x32x3) and MobileNetV2 (96x96x3, alpha
0.35), each trained briefly on seeded synthetic classes (Gaussian clusters around random
centres, so top-1 is meaningful), on every usable core, in this process:

- best-batch `model.predict` (the Keras backend's own path), ONNX Runtime fp32 and OpenVINO
  fp32 on the checked export;
- ONNX Runtime int8 (static QDQ calibrated on 128 training rows, and dynamic), OpenVINO int8
  (the same QDQ file), OpenVINO bf16 where the CPU has AVX512_BF16/AMX;
- per path: rows/s (best batch of 64/256/1024), ratio to the best fp32 path of the same run,
  GFLOP/s and share of the fp32 GEMM peak measured in the same run (fp32 FLOPs per row, also
  for int8: the share says how far past the fp32 ceiling it goes), and accuracy on held-out
  rows: top-1 agreement with fp32 Keras, max and mean abs difference, accuracy on the labels;
- what kerasfleet itself picks: `Predictor(precision="int8" / "bf16", calibration=...)`,
  the gate's verdict and the chosen variant.

The machine's CPU flags (VNNI, BF16, AMX, FP16) are printed at the top.
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
from _common import body_layers, cores, flops_per_row, gemm_ceiling, machine_facts  # noqa: E402

CLASSES = 10
SHAPES = {"mlp": (32,), "cnn": (32, 32, 3), "mobilenet": (96, 96, 3)}
# (training rows, epochs, held-out rows, timed rows): MobileNetV2 is ~100x the CNN's FLOPs.
SIZES = {"mlp": (8192, 3, 2048, 200_000), "cnn": (8192, 2, 2048, 20_000), "mobilenet": (2048, 2, 512, 1_500)}
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_fp16", "amx_fp16")


def clusters(shape, rows, seed):
    """Rows around CLASSES random centres (the same centres for every seed), and their labels."""
    centres = np.random.default_rng(0).normal(size=(CLASSES, *shape)).astype("float32")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, rows)
    return (centres[labels] + rng.normal(size=(rows, *shape))).astype("float32"), labels


def build(name):
    import keras

    keras.utils.set_random_seed(0)
    if name == "mobilenet":
        model = keras.applications.MobileNetV2(input_shape=SHAPES[name], alpha=0.35, weights=None, classes=CLASSES)
        # A brief training: BatchNorm's moving statistics must catch up within a few dozen steps
        # (at Keras's 0.99 they would still be half their initial values, and the model's
        # inference outputs nearly constant).
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.8
        return model
    return keras.Sequential([*body_layers(name), keras.layers.Dense(CLASSES, activation="softmax")])


def best_rate(run, x, seconds, batches=(64, 256, 1024)):
    """(rows/s, batch) of the best batch size: each warmed, then timed over about `seconds`."""
    best = (0.0, 0)
    for b in batches:
        run(x[:b], b)
        done, started = 0, time.perf_counter()
        while True:
            run(x, b)
            done += len(x)
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                break
        best = max(best, (done / elapsed, b))
    return best


def engine_runner(engine):
    from kerasfleet.engines.runner import Runner

    runner = Runner(engine)

    def run(x, b):
        return runner.predict((b, (((tuple(x.shape[1:])), "<f4"),)), [x])[0]

    return run


def flags_line():
    from kerasfleet.runtime import cpu_flags

    have = cpu_flags()
    return "# CPU flags: " + ", ".join(f"{f} {'yes' if f in have else 'no'}" for f in FLAGS)


def bench_model(name, tmp, peak, seconds):

    import kerasfleet
    from kerasfleet.engines.export import export
    from kerasfleet.engines.model_file import resolve_model
    from kerasfleet.engines.onnx_engine import OnnxEngine
    from kerasfleet.engines.openvino_engine import OpenVinoEngine
    from kerasfleet.engines.quantize import quantize
    from kerasfleet.runtime import cpu_flags
    from kerasfleet.tune.precision import gate_numbers

    n_train, epochs, n_held, n_timed = SIZES[name]
    shape = SHAPES[name]
    model = build(name)
    x_train, y_train = clusters(shape, n_train, seed=1)
    x_held, y_held = clusters(shape, n_held, seed=2)
    x_timed, _ = clusters(shape, min(n_timed, 8192), seed=3)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    started = time.perf_counter()
    model.fit(x_train, y_train, epochs=epochs, batch_size=64, verbose=0)
    train_s = time.perf_counter() - started
    reference = model.predict(x_held, verbose=0, batch_size=256)
    path = tmp / f"{name}.keras"
    model.save(path)
    onnx = export(resolve_model(path), custom_objects=None, safe_mode=True)
    flops = flops_per_row(model)
    threads = cores()
    static = quantize(onnx.path, onnx.meta, "static", [x_train[:128]], tmp / f"{name}-static.onnx")
    dynamic = quantize(onnx.path, onnx.meta, "dynamic", [x_train[:128]], tmp / f"{name}-dynamic.onnx")

    paths = {
        "model.predict, best batch": (lambda x, b: model.predict(x, verbose=0, batch_size=b), "fp32"),
        "ONNX Runtime fp32": (engine_runner(OnnxEngine(str(onnx.path), onnx.meta, threads=threads, gpu=False)), "fp32"),
        "OpenVINO fp32": (engine_runner(OpenVinoEngine(str(onnx.path), onnx.meta, threads=threads)), "fp32"),
        "ONNX Runtime int8 static (QDQ)": (engine_runner(OnnxEngine(str(static), onnx.meta, threads=threads, gpu=False)), "int8"),
        "ONNX Runtime int8 dynamic": (engine_runner(OnnxEngine(str(dynamic), onnx.meta, threads=threads, gpu=False)), "int8"),
        "OpenVINO int8 (QDQ)": (engine_runner(OpenVinoEngine(str(static), onnx.meta, threads=threads)), "int8"),
    }
    if {"avx512_bf16", "amx_bf16"} & cpu_flags():
        paths["OpenVINO bf16"] = (
            engine_runner(OpenVinoEngine(str(onnx.path), onnx.meta, threads=threads, precision="bf16")),
            "bf16",
        )
    rows = []
    for label, (run, precision) in paths.items():
        rate, batch = best_rate(run, x_timed, seconds)
        got = np.concatenate([run(x_held[lo : lo + 256], 256) for lo in range(0, n_held, 256)])
        numbers = gate_numbers([reference], [got])
        accuracy = float(np.mean(got.argmax(1) == y_held))
        rows.append((label, precision, batch, rate, numbers, accuracy))
    best_fp32 = max(r[3] for r in rows if r[1] == "fp32")
    print(
        f"\n## {name}: {flops:,} fp32 FLOPs per row; trained {epochs} epochs on {n_train:,} rows ({train_s:.0f} s); "
        f"fp32 Keras accuracy on {n_held:,} held-out rows {np.mean(reference.argmax(1) == y_held):.1%}"
    )
    print(
        "| path | batch | rows/s | x best fp32 | GFLOP/s (fp32 FLOPs) | share of fp32 GEMM peak | top-1 agreement | max abs diff | mean abs diff | accuracy |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, _, batch, rate, numbers, accuracy in rows:
        print(
            f"| {label} | {batch} | {rate:,.0f} | {rate / best_fp32:.2f}x | {rate * flops / 1e9:.0f} | {rate * flops / 1e9 / peak:.0%} | "
            f"{numbers['top1_agreement']:.2%} | {numbers['max_abs']:.2g} | {numbers['mean_abs']:.2g} | {accuracy:.1%} |"
        )
    sys.stdout.flush()
    # What kerasfleet picks, gate included (the calibration pool: training rows then held-out rows).
    pool = np.concatenate([x_train[:128], x_held])
    for precision in ("int8", "bf16"):
        try:
            predictor = kerasfleet.Predictor(path, precision=precision, calibration=pool, max_batch_size=256)
            print(f"- kerasfleet precision={precision!r}: {predictor.precision.describe()}")
        except kerasfleet.FleetError as exc:
            print(f"- kerasfleet precision={precision!r}: {type(exc).__name__}: {exc}")
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="mlp,cnn,mobilenet")
    parser.add_argument("--seconds", type=float, default=1.0, help="Timed seconds per path and batch size.")
    args = parser.parse_args()
    print(machine_facts())
    print(flags_line())
    threads = cores()
    peak, shape = gemm_ceiling(threads)
    print(f"# fp32 GEMM peak on {threads} threads: {peak:.0f} GFLOP/s (ONNX Runtime MatMul {'x'.join(map(str, shape))})")
    tmp = Path(tempfile.mkdtemp(prefix="kf-precision-"))
    for name in args.models.split(","):
        bench_model(name.strip(), tmp, peak, args.seconds)


if __name__ == "__main__":
    main()
