"""Builds the precision tests' classifiers in a fresh process (run as a script).

    KERAS_BACKEND=jax python tests/precision_models.py OUT_DIR

- classifier.keras: 32 -> 256 -> 256 (relu) -> 10 softmax (wide enough that int8 pays: on a
  32-64-10 model the runtimes' per-call overheads hide it), trained briefly on seeded synthetic classes
  (Gaussian clusters), so top-1 agreement is meaningful;
- ties.keras: the same body with a last layer 1000x smaller at init and untrained: its ten
  logits are nearly tied, so small errors flip its top-1 class (a model int8 must not pass);
- x.npy (rows of the same clusters), classifier.y.npy and ties.y.npy (model.predict on x).
"""

import sys
from pathlib import Path

import keras
import numpy as np

ROWS = 2000


def clusters(rows, seed):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(0).normal(size=(10, 32)).astype("float32")
    labels = rng.integers(0, 10, rows)
    return (centers[labels] + rng.normal(size=(rows, 32))).astype("float32"), labels


def main(out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(0)
    x_train, y_train = clusters(4096, seed=1)
    x, _ = clusters(ROWS, seed=2)
    model = keras.Sequential(
        [
            keras.Input((32,), name="features"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x_train, y_train, epochs=3, batch_size=128, verbose=0)
    model.save(out / "classifier.keras")
    np.save(out / "classifier.y.npy", model.predict(x, verbose=0))
    ties = keras.Sequential(
        [
            keras.Input((32,), name="features"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, kernel_initializer=keras.initializers.RandomNormal(stddev=1e-3)),
        ]
    )
    ties.save(out / "ties.keras")
    np.save(out / "ties.y.npy", ties.predict(x, verbose=0))
    np.save(out / "x.npy", x)


if __name__ == "__main__":
    main(sys.argv[1])
