"""Trial functions for tests/test_sweep.py, imported by sweep workers through the caller's sys.path."""

import os
import signal
import sys
import time


def score(x, seed, k=0):
    return {"score": x * 10 + seed + k}


def pid(i, seed):
    return {"pid": os.getpid()}


_kept = []


def hog(i, seed, mb=50):
    _kept.append(bytearray(mb << 20))  # kept by the module: the worker's RSS grows
    return {"pid": os.getpid()}


def behave(mode, seed):
    """One trial per failure case (tests/test_sweep.py's table)."""
    if mode == "hang":
        time.sleep(3600)
    elif mode == "raise":
        raise ValueError("trial raised on purpose")
    elif mode == "segfault":
        import ctypes

        ctypes.string_at(0)
    elif mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "exit":
        os._exit(3)
    elif mode == "system_exit":
        sys.exit(2)
    elif mode == "not_a_dict":
        return 0.5
    elif mode == "list_metric":
        return {"loss": [0.9, 0.5, 0.3]}
    elif mode == "nan":
        return {"value": float("nan")}
    return {"value": 1.0}


def side_effect(path, i, seed, sleep=0.0):
    """Appends a line when it starts, so a test counts how often each trial ran."""
    with open(path, "a") as f:
        f.write(f"{i} {seed}\n")
    time.sleep(sleep)
    return {"i": i}


def flaky(marker, seed):
    if not os.path.exists(marker):
        raise RuntimeError("not yet: the marker file is missing")
    return {"ok": 1}


def train_tiny_keras(units, seed, epochs=1):
    """A tiny Dense classifier, 1 epoch on fixed synthetic rows: its metrics depend only on the seed."""
    import keras
    import numpy as np

    rng = np.random.default_rng(0)  # the data is the same for every seed
    x = rng.normal(size=(256, 8)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int32")
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(units, activation="relu"), keras.layers.Dropout(0.2), keras.layers.Dense(2)]
    )
    model.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = model.fit(x, y, epochs=epochs, batch_size=32, shuffle=True, verbose=0)
    return {
        "loss": float(history.history["loss"][-1]),
        "accuracy": float(history.history["accuracy"][-1]),
        "backend": 0 if keras.backend.backend() == "jax" else 1,
    }


def tensorflow_seeded(use_tf, seed):
    """Whether TensorFlow was imported before the call, and (use_tf) a draw from its global seed."""
    import sys

    had_tf = "tensorflow" in sys.modules
    draw = 0.0
    if use_tf:
        import importlib.util

        importlib.util.find_spec("tensorflow")  # a probe first, as libraries do: TF must still be seeded
        import tensorflow as tf

        draw = float(tf.random.uniform(()))
    return {"had_tf": int(had_tf), "draw": draw}
