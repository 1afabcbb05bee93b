"""fp16 (and fp32) on a GPU through ONNX Runtime's CUDA and TensorRT providers, under the accuracy gate.

Two steps, because the GPU machine may have neither Keras nor TensorFlow:

    # here (Keras, TensorFlow, kerasfleet): train the bench models briefly, export, write the folder
    KERAS_BACKEND=jax python bench/gpu_precision.py --export DIR [--models mlp,cnn,mobilenet]

    # on the GPU machine (numpy + onnxruntime[-gpu]; Keras and JAX used when importable)
    python bench/gpu_precision.py DIR [--seconds 0.5] [--budget-s 150]

The folder holds, per model, `<name>.onnx` (the parity-checked fp32 export), `<name>.fp16.onnx`
(ONNX Runtime's float16 conversion, fp32 inputs and outputs kept), `<name>.x.npy` (held-out
rows of the synthetic classes), `<name>.ref.npy` (fp32 Keras outputs on them) and
`<name>.keras`. The GPU step prints which providers exist (a CPU-only onnxruntime build says
so and measures the CPU only), then per model and provider: rows/s at the best batch
(64/256/1024/4096, host arrays in and out, so copies count) and the gate's numbers against
fp32 Keras (top-1 agreement, max and mean abs difference; passes at top-1 disagreement <=
0.5%); fp16 is used only where it passes. Keras's own `model.predict` on the same GPU is the
peer when Keras is installed there. Ends with one JSON object of everything measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MAX_TOP1_DISAGREEMENT = 0.005
BATCHES = (64, 256, 1024, 4096)
# Held-out rows written per model: the folder travels to the GPU machine (keep it well under 64 MB).
HELD_ROWS = {"mlp": 2048, "cnn": 1024, "mobilenet": 256}


def export(folder: Path, models: list[str]) -> None:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    sys.path.insert(0, str(Path(__file__).parent))
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from kerasfleet.engines.export import export as export_onnx
    from kerasfleet.engines.model_file import resolve_model
    from precision import SHAPES, SIZES, build, clusters

    folder.mkdir(parents=True, exist_ok=True)
    for name in models:
        n_train, epochs, _, _ = SIZES[name]
        model = build(name)
        x_train, y_train = clusters(SHAPES[name], n_train, seed=1)
        x_held, _ = clusters(SHAPES[name], HELD_ROWS[name], seed=2)
        model.compile("adam", "sparse_categorical_crossentropy")
        model.fit(x_train, y_train, epochs=epochs, batch_size=64, verbose=0)
        model.save(folder / f"{name}.keras")
        checked = export_onnx(resolve_model(folder / f"{name}.keras"), custom_objects=None, safe_mode=True)
        shutil.copyfile(checked.path, folder / f"{name}.onnx")
        half = convert_float_to_float16(onnx.load(str(checked.path)), keep_io_types=True)
        onnx.save(half, str(folder / f"{name}.fp16.onnx"))
        np.save(folder / f"{name}.x.npy", x_held)
        np.save(folder / f"{name}.ref.npy", model.predict(x_held, verbose=0, batch_size=256))
        print(f"wrote {name}: {folder / name}.onnx, .fp16.onnx, .x.npy ({len(x_held)} rows), .ref.npy, .keras", flush=True)


def gate(ref: np.ndarray, got: np.ndarray) -> dict:
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    top1 = float(np.mean(ref.argmax(1) == got.argmax(1)))
    return {
        "top1_agreement": top1,
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "passed": 1.0 - top1 <= MAX_TOP1_DISAGREEMENT,
    }


def best_rate(run, x: np.ndarray, seconds: float) -> tuple[float, int]:
    best = (0.0, 0)
    for b in BATCHES:
        if b > len(x):
            break
        run(x[:b])
        done, started = 0, time.perf_counter()
        while True:
            for lo in range(0, len(x) - b + 1, b):
                run(x[lo : lo + b])
                done += b
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                break
        best = max(best, (done / elapsed, b))
    return best


def sessions(ort, folder: Path, name: str, available: list[str]) -> list[tuple[str, str, list]]:
    """(label, file, providers) to try, those whose provider this build has."""
    fp32, fp16 = str(folder / f"{name}.onnx"), str(folder / f"{name}.fp16.onnx")
    cpu = ("CPUExecutionProvider", {})
    plans = [("CPU fp32", fp32, [cpu])]
    if "CUDAExecutionProvider" in available:
        plans += [
            ("CUDA fp32", fp32, [("CUDAExecutionProvider", {}), cpu]),
            ("CUDA fp16", fp16, [("CUDAExecutionProvider", {}), cpu]),
        ]
    if "TensorrtExecutionProvider" in available:
        trt = "TensorrtExecutionProvider"
        plans += [
            ("TensorRT fp32", fp32, [(trt, {}), ("CUDAExecutionProvider", {}), cpu]),
            ("TensorRT fp16", fp32, [(trt, {"trt_fp16_enable": True}), ("CUDAExecutionProvider", {}), cpu]),
        ]
    return plans


def keras_peer(folder: Path, name: str, x: np.ndarray, ref: np.ndarray, seconds: float) -> dict:
    os.environ.setdefault("KERAS_BACKEND", "jax")  # the GPU machine's framework
    try:
        import keras
    except ImportError as exc:
        return {"error": f"keras not installed here ({exc})"}
    path = folder / f"{name}.keras"
    if not path.exists():
        return {"error": f"{path.name} is not in the folder (left out to travel under the size limit)"}
    model = keras.saving.load_model(path)
    rate, batch = best_rate(lambda a: model.predict(a, verbose=0, batch_size=len(a)), x, seconds)
    return {"backend": keras.backend.backend(), "rows_per_s": rate, "batch": batch, **gate(ref, model.predict(x, verbose=0))}


def measure(folder: Path, seconds: float, budget_s: float) -> dict:
    started = time.perf_counter()
    report: dict = {"python": sys.version.split()[0], "numpy": np.__version__}
    try:
        report["gpus"] = (
            subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        )
    except (OSError, subprocess.SubprocessError) as exc:
        report["gpus"] = f"nvidia-smi not available: {exc}"
    try:
        import onnxruntime as ort
    except ImportError as exc:
        report["error"] = f"onnxruntime not installed: {exc}"
        return report
    available = ort.get_available_providers()
    report.update(onnxruntime=ort.__version__, device=ort.get_device(), providers=available)
    missing = [p for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") if p not in available]
    if missing:
        report["missing_providers"] = missing
        print(f"# this onnxruntime build ({ort.__version__}, {ort.get_device()}) lacks {missing}: not measured", flush=True)
    report["models"] = {}
    for x_path in sorted(folder.glob("*.x.npy")):
        name = x_path.name[: -len(".x.npy")]
        x, ref = np.load(x_path), np.load(folder / f"{name}.ref.npy")
        results: dict = {}
        for label, path, providers in sessions(ort, folder, name, available):
            if time.perf_counter() - started > budget_s:
                results[label] = {"skipped": f"over the {budget_s:.0f} s budget"}
                continue
            try:
                options = ort.SessionOptions()
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                built = time.perf_counter()
                session = ort.InferenceSession(path, options, providers=providers)
                build_s = time.perf_counter() - built
                used = session.get_providers()
                input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name

                def run(a, session=session, input_name=input_name, output_name=output_name):
                    return session.run([output_name], {input_name: a})[0]

                got = np.concatenate([run(x[lo : lo + 256]) for lo in range(0, len(x), 256)])
                rate, batch = best_rate(run, x, seconds)
                results[label] = {
                    "providers_used": used[:1],
                    "session_s": round(build_s, 2),
                    "rows_per_s": rate,
                    "batch": batch,
                    **gate(ref, got),
                }
            except Exception as exc:  # noqa: BLE001 - reported per provider, the others still run
                results[label] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"{name:<10} {label:<14} {json.dumps(results[label])}", flush=True)
        results["keras model.predict"] = keras_peer(folder, name, x, ref, seconds)
        print(f"{name:<10} {'keras':<14} {json.dumps(results['keras model.predict'])}", flush=True)
        report["models"][name] = results
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", nargs="?", help="Folder written by --export (the GPU step).")
    parser.add_argument("--export", metavar="DIR", help="Train, export and write the folder (here, with Keras).")
    parser.add_argument("--models", default="mlp,cnn,mobilenet")
    parser.add_argument("--seconds", type=float, default=0.5, help="Timed seconds per provider and batch size.")
    parser.add_argument("--budget-s", type=float, default=150.0, help="Skip what is left past this many seconds.")
    args = parser.parse_args()
    if args.export:
        export(Path(args.export), [m.strip() for m in args.models.split(",")])
        return
    if not args.folder:
        parser.error("Expected a folder written by --export, or --export DIR. Received: neither.")
    print(json.dumps(measure(Path(args.folder), args.seconds, args.budget_s), indent=1))


if __name__ == "__main__":
    main()
