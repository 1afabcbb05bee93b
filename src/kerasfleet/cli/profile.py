"""`kerasfleet profile`: where a model's prediction latency goes, and what kerasfleet would use.

In the caller's process (it imports Keras): for each batch size it times many calls of each
path - `model.predict`, `predict_on_batch`, `model(x)`, the compiled buckets of a Keras
`Predictor` and, when the export passes its parity check, ONNX Runtime and OpenVINO - and measures the
cost of the first call (tracing) and of a new batch shape (retracing). It prints a table
(p50, p90, p99, max, rows/s), says in plain words where the variance comes from, shows the
tuned plan (throughput per engine and workers x threads split), and writes an HTML report
with matplotlib plots (latency CDF per path, throughput against batch size).
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..engines.model_file import resolve_model
from ..prediction import Fleet, Predictor
from ..tune import cached_choices, describe_verdict, get_plan, synthetic_inputs


def _times(fn: Any, calls: int) -> np.ndarray[Any, Any]:
    fn()
    out = np.empty(calls)
    for i in range(calls):
        started = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - started
    return out * 1e3


def _first_and_second(fn: Any) -> tuple[float, float]:
    started = time.perf_counter()
    fn()
    first = time.perf_counter() - started
    started = time.perf_counter()
    fn()
    return first * 1e3, (time.perf_counter() - started) * 1e3


def profile(
    model_path: str,
    *,
    batch_sizes: tuple[int, ...] = (1, 32, 256),
    calls: int = 200,
    out_dir: Path | None = None,
    backend: str,
    echo: Any = print,
) -> Path:
    import keras
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model_file = resolve_model(model_path)
    signature = model_file.signature
    synthetic_inputs(signature, 1)  # refuses variable shapes with a clear error
    model = keras.saving.load_model(model_path, compile=False)
    biggest = max(batch_sizes)
    x_all = synthetic_inputs(signature, biggest + 1)

    def rows(n: int) -> Any:
        if isinstance(x_all, dict):
            return {k: v[:n] for k, v in x_all.items()}
        return [v[:n] for v in x_all] if isinstance(x_all, list) else x_all[:n]

    first_ms, warm_ms = _first_and_second(lambda: model.predict(rows(batch_sizes[0]), verbose=0))
    new_shape_ms, _ = _first_and_second(lambda: model.predict(rows(biggest + 1), verbose=0))
    predictors = {"compiled buckets (Keras)": Predictor(model_path, engine="keras", max_batch_size=biggest)}
    onnx_note = ""
    try:
        predictors["ONNX Runtime"] = Predictor(model_path, engine="onnx", max_batch_size=biggest)
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        onnx_note = f"ONNX Runtime not profiled: {exc}"
    try:
        predictors["OpenVINO"] = Predictor(model_path, engine="openvino", max_batch_size=biggest)
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        onnx_note = " ".join(n for n in (onnx_note, f"OpenVINO not profiled: {exc}") if n)
    results: dict[str, dict[int, np.ndarray[Any, Any]]] = {}
    for b in batch_sizes:
        xb = rows(b)
        paths: dict[str, Any] = {
            "model.predict": lambda xb=xb: model.predict(xb, verbose=0),
            "predict_on_batch": lambda xb=xb: model.predict_on_batch(xb),
            "model(x)": lambda xb=xb: model(xb, training=False),
        }
        for name, predictor in predictors.items():
            paths[name] = lambda xb=xb, p=predictor: p.predict(xb)
        for name, fn in paths.items():
            n = min(calls, 100) if name == "model.predict" else calls
            results.setdefault(name, {})[b] = _times(fn, n)
    plan = get_plan(model_file, backend=backend, fleet_factory=Fleet)

    header = f"{'path':<26} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'max ms':>9} {'rows/s':>12}"
    lines = [header, "-" * len(header)]
    table_rows = []
    for name, by_batch in results.items():
        for b, ms in by_batch.items():
            p50, p90, p99 = np.percentile(ms, [50, 90, 99])
            row = (name, b, p50, p90, p99, ms.max(), b / p50 * 1e3)
            table_rows.append(row)
            lines.append(f"{name:<26} {b:>5} {p50:>9.3f} {p90:>9.3f} {p99:>9.3f} {ms.max():>9.3f} {row[6]:>12,.0f}")
    at1 = {name: by_batch[batch_sizes[0]] for name, by_batch in results.items()}
    fastest = min(at1, key=lambda k: float(np.median(at1[k])))
    words = [
        f"The first model.predict call took {first_ms:.1f} ms against {warm_ms:.1f} ms for the next: tracing and compiling.",
        f"A new batch shape ({biggest + 1} rows) cost {new_shape_ms:.1f} ms on its first call: Keras retraces per shape; "
        "kerasfleet pads to a few warmed buckets instead.",
        f"model.predict builds a data adapter on every call: at batch {batch_sizes[0]} its p50 is "
        f"{np.median(at1['model.predict']):.3f} ms against {np.median(at1[fastest]):.3f} ms for {fastest}.",
        "The tail (p99 against p50) per path at batch "
        + f"{batch_sizes[0]}: "
        + ", ".join(f"{k} {np.percentile(v, 99) / np.median(v):.1f}x" for k, v in at1.items())
        + "; on a shared machine the remaining tail is scheduling noise.",
        f"kerasfleet would use: {plan.describe()}.",
    ] + ([onnx_note] if onnx_note else [])
    # Reduced precisions measured so far (kerasfleet tune --precision, or a first use): their gate numbers.
    words += [f"precision {describe_verdict(v)}" for v in cached_choices(model_file, backend)]
    for line in lines + [""] + words:
        echo(line)

    out = Path(out_dir or f"kerasfleet-profile-{Path(model_path).stem}")
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ms in at1.items():
        ax.plot(np.sort(ms), np.linspace(0, 1, len(ms)), label=name)
    ax.set_xscale("log")
    ax.set_xlabel(f"latency at batch {batch_sizes[0]} (ms, log)")
    ax.set_ylabel("fraction of calls")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, by_batch in results.items():
        ax.plot(list(by_batch), [b / np.median(ms) * 1e3 for b, ms in by_batch.items()], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("rows/s (from p50)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=100)
    plt.close(fig)
    plan_rows = "".join(
        f"<tr><td>{r['where']}</td><td>{r['engine']}</td><td>{r['workers']} x {r['threads']}</td><td>{r['batch_size']}</td><td>{r['rows_per_s']:,.0f}</td></tr>"
        for r in plan.table
    )
    body = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{b}</td><td>{p50:.3f}</td><td>{p90:.3f}</td><td>{p99:.3f}</td><td>{mx:.3f}</td><td>{r:,.0f}</td></tr>"
        for n, b, p50, p90, p99, mx, r in table_rows
    )
    report = out / "report.html"
    report.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>kerasfleet profile: {html.escape(Path(model_path).name)}</title></head><body>"
        f"<h1>kerasfleet profile: {html.escape(Path(model_path).name)}</h1>"
        f"<p>Keras {html.escape(keras.__version__)}, backend {html.escape(keras.backend.backend())}.</p>"
        "<ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in words) + "</ul>"
        "<h2>Latency per path and batch size</h2><table border=1 cellpadding=3><tr><th>path</th><th>batch</th><th>p50 ms</th>"
        f"<th>p90 ms</th><th>p99 ms</th><th>max ms</th><th>rows/s</th></tr>{body}</table>"
        "<img src='latency_cdf.png' alt='latency CDF per path'><img src='throughput.png' alt='throughput against batch size'>"
        "<h2>Throughput per engine and workers x threads (the tuned plan)</h2><table border=1 cellpadding=3>"
        f"<tr><th>where</th><th>engine</th><th>split</th><th>batch</th><th>rows/s</th></tr>{plan_rows}</table></body></html>"
    )
    model_file.cleanup()
    return report
