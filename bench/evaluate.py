"""Evaluation with a NumPy per-row score: the seed's loop, `model.evaluate`, `kerasfleet.evaluate`.

    KERAS_BACKEND=jax python bench/evaluate.py [--rows 200000] [--loop-rows 300] [--quick]

One run, one process (plus kerasfleet's workers), on the bench MLP (32-256-256-1, compiled with
loss "mse" and metric "mae"), `--rows` synthetic rows:

- seed loop: `model.predict(x[i:i+1])` then the NumPy score, row by row (what the seed user ran;
  timed on `--loop-rows` rows, its rate extrapolates: every row costs the same);
- `model.evaluate` at its default batch (32) and at the best of 256/1024/4096/16384 rows,
  without the score (Keras has no per-row NumPy metric);
- `kerasfleet.evaluate(path, x, y, metrics=[crps_quadrature])`: loss, mae and the score, the
  whole call timed (workers started, predictions, metrics, scores in workers), and without the
  score, to compare with `model.evaluate` on equal terms.

The score (`_common.crps_quadrature`): a 256-point trapezoidal CRPS per row, ~10 us of NumPy a
row. Prints rows/s and ratios; values are checked against Keras's (rtol 1e-5).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import crps_quadrature, gemm_ceiling, machine_facts  # noqa: E402


def build():
    import keras  # noqa: F401  (machine_facts reads its backend)

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((32,)), keras.layers.Dense(256, activation="relu"), keras.layers.Dense(256, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile("adam", "mse", metrics=["mae"])
    return model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--loop-rows", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="small rows, short: a smoke run, not a measurement")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.loop_rows = 20_000, 50
    import keras  # noqa: F401  (machine_facts reads its backend)

    import kerasfleet

    print(machine_facts())
    (peak, shape) = gemm_ceiling(len(kerasfleet.make_plan().usable_cpus), 0.5)
    print(f"# fp32 GEMM peak, measured now: {peak:.0f} GFLOP/s on every usable core ({'x'.join(map(str, shape))})")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.rows, 32)).astype("float32")
    y = (x[:, :1] * 0.5 + rng.normal(size=(args.rows, 1))).astype("float32")
    model = build()
    model.fit(x[:20_000], y[:20_000], epochs=1, batch_size=256, verbose=0)
    path = Path(tempfile.mkdtemp(prefix="kf-bench-eval-")) / "mlp.keras"
    model.save(path)
    rates = {}

    # The seed's loop: row by row.
    model.predict(x[:1], verbose=0)
    started = time.perf_counter()
    loop_scores = [crps_quadrature(y[i : i + 1], model.predict(x[i : i + 1], verbose=0))[0] for i in range(args.loop_rows)]
    rates["seed loop (predict + score per row)"] = args.loop_rows / (time.perf_counter() - started)

    def timed(label, fn):
        started = time.perf_counter()
        result = fn()
        rates[label] = args.rows / (time.perf_counter() - started)
        print(f"  {label}: {rates[label]:,.0f} rows/s", flush=True)
        return result

    print(f"  seed loop (predict + score per row): {rates['seed loop (predict + score per row)']:,.0f} rows/s ({args.loop_rows} rows)")
    want = timed("model.evaluate, batch 32 (default)", lambda: model.evaluate(x, y, return_dict=True, verbose=0))
    best = None
    for batch in (256, 1024, 4096, 16384):
        label = f"model.evaluate, batch {batch}"
        timed(label, lambda b=batch: model.evaluate(x, y, batch_size=b, return_dict=True, verbose=0))
        if best is None or rates[label] > rates[best]:
            best = label
    got = timed("kerasfleet.evaluate, loss + mae", lambda: kerasfleet.evaluate(path, x, y))
    scored = timed(
        "kerasfleet.evaluate, loss + mae + NumPy score (workers)", lambda: kerasfleet.evaluate(path, x, y, metrics=[crps_quadrature])
    )
    for name in want:
        np.testing.assert_allclose([got[name], scored[name]], [want[name]] * 2, rtol=1e-4, err_msg=name)
    print(f"  score: kerasfleet {scored['crps_quadrature']:.6f}, seed loop on its {args.loop_rows} rows {np.mean(loop_scores):.6f}")

    print("\n| path | rows/s | vs seed loop | vs best model.evaluate |")
    print("| --- | ---: | ---: | ---: |")
    loop = rates["seed loop (predict + score per row)"]
    for label, rate in rates.items():
        print(f"| {label} | {rate:,.0f} | {rate / loop:,.1f}x | {rate / rates[best]:.2f}x |")
    print(f"\nbest model.evaluate: {best}; values equal Keras's within rtol 1e-4 (loss {want['loss']:.6f}).")


if __name__ == "__main__":
    main()
