"""kerasfleet demo: train a small CNN, then score 100k images three ways and compare.

    make demo                      (or: make demo BACKEND=jax, or: python examples/demo.py [--rows N])

It builds and briefly trains a CNN on generated 32x32x3 images (the class is which colour
channel is brightest in which quadrant), saves it, and predicts the same rows with
`model.predict` (default batch size), `model.predict` at its best batch size, and
`kerasfleet.predict`: its first call (which measures and caches the fastest verified plan for
this model on this machine), a second call (start-up of every worker included) and a warm
`Fleet`. The table shows rows/s, the speed-up over the default, and the largest absolute
difference from `model.predict`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # Keras's own default
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def make_images(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 0.4, size=(rows, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 12, size=rows)
    channel, quadrant = y % 3, y // 3
    for q in range(4):
        r, c = divmod(q, 2)
        for ch in range(3):
            sel = (quadrant == q) & (channel == ch)
            x[sel, r * 16 : r * 16 + 16, c * 16 : c * 16 + 16, ch] += 0.6
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="rows to predict (default 100,000)")
    args = parser.parse_args()

    import keras

    import kerasfleet

    print(f"kerasfleet {kerasfleet.__version__}, keras {keras.__version__}, backend {keras.backend.backend()}")
    print(f"plan: {kerasfleet.make_plan().describe()}\n")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3), name="image"),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(12, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    x_train, y_train = make_images(6_000, seed=1)
    started = time.perf_counter()
    history = model.fit(x_train, y_train, epochs=2, batch_size=128, verbose=0)
    print(
        f"trained 2 epochs on 6,000 images in {time.perf_counter() - started:.1f} s, accuracy {history.history['accuracy'][-1]:.3f}"
    )

    path = Path(tempfile.mkdtemp(prefix="kerasfleet-demo-")) / "cnn.keras"
    model.save(path)
    x, y = make_images(args.rows, seed=2)
    print(f"saved {path}; predicting {args.rows:,} rows ({x.nbytes / 1e9:.2f} GB of float32)\n")

    rows: list[tuple[str, float, np.ndarray]] = []

    def run(label: str, fn) -> None:  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        out = fn()
        rows.append((label, args.rows / (time.perf_counter() - start), out))

    model.predict(x[:64], verbose=0)  # the first call traces; not counted against Keras
    run("model.predict (default batch_size=32)", lambda: model.predict(x, verbose=0))
    best = rows[0]
    for b in (256, 1024):
        model.predict(x[:b], verbose=0, batch_size=b)
        run(f"model.predict (batch_size={b})", lambda b=b: model.predict(x, verbose=0, batch_size=b))
        best = max(best, rows.pop(), key=lambda r: r[1])
    if best is not rows[0]:
        rows.append(best)  # the best batch size, shown when it beats the default
    run("kerasfleet.predict, first call (measures the plan)", lambda: kerasfleet.predict(path, x))
    run("kerasfleet.predict, plan cached (start-up included)", lambda: kerasfleet.predict(path, x))
    with kerasfleet.Fleet(path) as fleet:
        fleet.predict(x[:1000], progress=False)
        run("kerasfleet Fleet.predict (warm workers)", lambda: fleet.predict(x))
        engine = f"{fleet.engine}, {fleet.plan.workers} x {fleet.plan.threads_per_worker}, batch {fleet.batch_size}"

    reference = rows[0][2]
    base = rows[0][1]
    best_rate = best[1]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'path':<{width}}  {'rows/s':>10}  {'speed-up':>8}  {'max abs diff':>12}")
    for label, rate, out in rows:
        print(f"{label:<{width}}  {rate:>10,.0f}  {rate / base:>7.2f}x  {float(np.abs(out - reference).max()):>12.2e}")
    accuracy = float((rows[-1][2].argmax(axis=1) == y).mean())
    print(
        f"\nvs the best model.predict: one-shot {rows[-2][1] / best_rate:.2f}x, warm {rows[-1][1] / best_rate:.2f}x "
        f"(plan: {engine}); accuracy on the predicted rows: {accuracy:.3f}"
    )


if __name__ == "__main__":
    main()
