"""Evaluation with a NumPy per-row score: the seed's loop, `model.evaluate`, `kerasfleet.evaluate`.

    KERAS_BACKEND=jax python bench/evaluate.py [--model mlp|cnn] [--rows N] [--loop-rows 300] [--quick]

One run, one process (plus kerasfleet's workers), on bench/bulk.py's MLP (32-256-256-1) or
small CNN (32x32x3, two convolutions, one output), compiled with loss "mse" and metric "mae",
on `--rows` synthetic rows:

- seed loop: `model.predict(x[i:i+1])` then the NumPy score, row by row (what the seed user ran;
  timed on `--loop-rows` rows, the best of up to 3 runs while they take under 10 s in all; its
  rate extrapolates: every row costs the same);
- `model.evaluate` at its default batch (32) and at the best of 256/1024/4096/8192 rows (each the
  best of 3 calls), without the score (Keras has no per-row NumPy metric);
- `kerasfleet.evaluate(path, x, y, metrics=[crps_quadrature])`: loss, mae and the score, the
  whole call timed (workers started, predictions, metrics, scores in workers; the `auto`
  engine's plan, measured once per model and machine, is measured before, untimed);
- the same on a warm `kerasfleet.Fleet` (what a loop of evaluations pays; best of 3 calls),
  with and without the score, and that fleet's `predict` alone (what the predictions cost).

The score (`_common.crps_quadrature`): a 64-point trapezoidal CRPS per row, about 5 us of NumPy
a row. Prints rows/s and ratios; values are checked against Keras's (rtol 1e-4).

Then the machine's ceiling for the scored evaluation, from figures of the same run: the model
at the fp32 GEMM peak on every core (its FLOPs a row / the peak) plus the score's CPU time a
row (timed on one thread at the best of the slice sizes a score worker tries) spread over every
core - nothing else counted (no loss, no metrics, no data movement), so no evaluation with the
score can be faster - and whether the issue's targets (20x the seed loop, 0.9x the best
`model.evaluate`) lie under it; and the same bound from the parts as measured here (the warm
fleet's predictions alone instead of the model at the GEMM peak).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import body_layers, crps_quadrature, flops_per_row, gemm_ceiling, machine_facts  # noqa: E402

# Calls that start nothing (model.evaluate at a chosen batch, a warm Fleet): the best of this many.
REPEATS = 3


def build(name):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([*body_layers(name), keras.layers.Dense(1)])
    model.compile("adam", "mse", metrics=["mae"])
    return model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["mlp", "cnn"], default="cnn")
    parser.add_argument("--rows", type=int, default=None, help="default: 1,000,000 (mlp), 60,000 (cnn)")
    parser.add_argument("--loop-rows", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="small rows, short: a smoke run, not a measurement")
    args = parser.parse_args()
    args.rows = args.rows or (1_000_000 if args.model == "mlp" else 60_000)
    if args.quick:
        args.rows, args.loop_rows = 5_000, 50
    import keras  # noqa: F401  (machine_facts reads its backend)

    import kerasfleet

    print(machine_facts())
    (peak, shape) = gemm_ceiling(len(kerasfleet.make_plan().usable_cpus), 0.5)
    print(f"# fp32 GEMM peak, measured now: {peak:.0f} GFLOP/s on every usable core ({'x'.join(map(str, shape))})")
    rng = np.random.default_rng(0)
    shape = (32,) if args.model == "mlp" else (32, 32, 3)
    x = rng.normal(size=(args.rows, *shape)).astype("float32")
    y = (x.reshape(args.rows, -1)[:, :1] * 0.5 + rng.normal(size=(args.rows, 1))).astype("float32")
    model = build(args.model)
    model.fit(x[:5_000], y[:5_000], epochs=1, batch_size=256, verbose=0)
    print(f"# {args.model}: {args.rows:,} rows, {model.count_params():,} params")
    path = Path(tempfile.mkdtemp(prefix="kf-bench-eval-")) / f"{args.model}.keras"
    model.save(path)
    rates = {}

    # The seed's loop: row by row.
    # The best of up to 3 runs (while they take under 10 s in all): one run moved by 1.5x between runs.
    model.predict(x[:1], verbose=0)
    loop_seconds, spent = math.inf, 0.0
    for _ in range(3):
        started = time.perf_counter()
        loop_scores = [crps_quadrature(y[i : i + 1], model.predict(x[i : i + 1], verbose=0))[0] for i in range(args.loop_rows)]
        took = time.perf_counter() - started
        loop_seconds, spent = min(loop_seconds, took), spent + took
        if spent > 10:
            break
    rates["seed loop (predict + score per row)"] = args.loop_rows / loop_seconds

    def timed(label, fn, repeats=1):
        seconds = math.inf
        for _ in range(repeats):
            started = time.perf_counter()
            result = fn()
            seconds = min(seconds, time.perf_counter() - started)
        rates[label] = args.rows / seconds
        print(f"  {label}: {rates[label]:,.0f} rows/s", flush=True)
        return result

    print(
        f"  seed loop (predict + score per row): {rates['seed loop (predict + score per row)']:,.0f} rows/s ({args.loop_rows} rows)"
    )
    want = timed("model.evaluate, batch 32 (default)", lambda: model.evaluate(x, y, return_dict=True, verbose=0))
    best = None
    for batch in (256, 1024, 4096, 8192):
        label = f"model.evaluate, batch {batch}"
        timed(label, lambda b=batch: model.evaluate(x, y, batch_size=b, return_dict=True, verbose=0), REPEATS)
        if best is None or rates[label] > rates[best]:
            best = label
    # engine="auto" measures its plan once per model and machine: done here, not timed.
    with kerasfleet.Fleet(path) as fleet:
        print(f"# kerasfleet plan: {fleet.stats()['plan']}, engine {fleet.engine}, batch {fleet.batch_size}", flush=True)
    cold = timed(
        "kerasfleet.evaluate + NumPy score, whole call (nothing started before)",
        lambda: kerasfleet.evaluate(path, x, y, metrics=[crps_quadrature]),
    )
    with kerasfleet.Fleet(path) as fleet:
        fleet.wait_ready()
        kerasfleet.evaluate(fleet, x[:1000], y[:1000], metrics=[crps_quadrature])  # warm: every shape compiled
        scored = timed(
            "kerasfleet.evaluate + NumPy score, warm Fleet",
            lambda: kerasfleet.evaluate(fleet, x, y, metrics=[crps_quadrature]),
            REPEATS,
        )
        got = timed("kerasfleet.evaluate (loss + mae only), warm Fleet", lambda: kerasfleet.evaluate(fleet, x, y), REPEATS)
        fleet.predict(x[:1000])
        timed("kerasfleet Fleet.predict alone (no loss, metrics or score), warm", lambda: fleet.predict(x), REPEATS)
    for name in want:
        np.testing.assert_allclose([got[name], scored[name], cold[name]], [want[name]] * 3, rtol=1e-4, err_msg=name)
    print(
        f"  score: kerasfleet {scored['crps_quadrature']:.6f}, seed loop on its {args.loop_rows} rows {np.mean(loop_scores):.6f}"
    )

    ncores = len(kerasfleet.make_plan().usable_cpus)
    model_s = flops_per_row(model) / (peak * 1e9)  # wall seconds a row, every core at the peak
    score_s = score_seconds_per_row(y)
    ceiling = 1.0 / (model_s + score_s / ncores)
    loop, best_rate = rates["seed loop (predict + score per row)"], rates[best]
    print(
        f"\n# ceiling with the score: model {flops_per_row(model):,} FLOPs a row at {peak:.0f} GFLOP/s = {1e6 * model_s:.3f} us a row; "
        f"score {1e6 * score_s:.3f} us of CPU a row (one thread) / {ncores} cores; together {ceiling:,.0f} rows/s "
        f"= {ceiling / loop:,.1f}x the seed loop, {ceiling / best_rate:.2f}x the best model.evaluate"
    )
    # The same bound from the parts as they run here: kerasfleet's predictions (warm fleet,
    # every core: predict alone, or the evaluation without the score when that ran faster) and
    # the score's CPU time, nothing else counted.
    predict_s = 1.0 / max(
        rates["kerasfleet Fleet.predict alone (no loss, metrics or score), warm"],
        rates["kerasfleet.evaluate (loss + mae only), warm Fleet"],
    )
    parts = 1.0 / (predict_s + score_s / ncores)
    print(
        f"# bound from the measured parts: predictions {1e6 * predict_s:.3f} us a row (warm fleet, {model_s / predict_s:.0%} "
        f"of the GEMM peak) + the score / {ncores} cores = {parts:,.0f} rows/s = {parts / best_rate:.2f}x the best model.evaluate"
    )
    for name, need in (("20x the seed loop", 20 * loop), ("0.9x the best model.evaluate", 0.9 * best_rate)):
        verdict = "under the ceiling" if need <= ceiling else "ABOVE the ceiling: no scored evaluation reaches it here"
        print(
            f"# target {name}: {need:,.0f} rows/s, {need / ceiling:.0%} of the ceiling, {need / parts:.0%} of the parts' bound - {verdict}"
        )
    print("\n| path | rows/s | vs seed loop | vs best model.evaluate |")
    print("| --- | ---: | ---: | ---: |")
    for label, rate in rates.items():
        print(f"| {label} | {rate:,.0f} | {rate / loop:,.1f}x | {rate / rates[best]:.2f}x |")
    print(f"\nbest model.evaluate: {best}; values equal Keras's within rtol 1e-4 (loss {want['loss']:.6f}).")


def score_seconds_per_row(y, rows=65_536, repeats=3):
    """The score's CPU time a row on one thread (NumPy's elementwise work is single-threaded),
    at the best of the slice sizes kerasfleet's score workers try (their glibc settings too)."""
    from kerasfleet.evaluation.scoring import SLICE_SIZES

    y = np.resize(y, (rows, *y.shape[1:]))
    y_pred = y + np.float32(0.1)
    best = math.inf
    for size in SLICE_SIZES:
        for _ in range(repeats):
            started = time.perf_counter()
            for lo in range(0, rows, size):
                crps_quadrature(y[lo : lo + size], y_pred[lo : lo + size])
            best = min(best, (time.perf_counter() - started) / rows)
    return best


if __name__ == "__main__":
    main()
