"""Loader and data_parallel against plain Keras, in a fresh process for one backend.

    KERAS_BACKEND=tensorflow python tests/train_cases.py OUT.json

Writes, per case, whether kerasfleet's training equals Keras's own (max relative difference of
the weights), so the test process compares without importing a second backend.
"""

import contextlib
import json
import sys
from pathlib import Path

import keras
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import kerasfleet  # noqa: E402
import loader_fns  # noqa: E402

backend = keras.backend.backend()
results = {}
if backend != "torch":
    # Before anything starts the backend's runtime: two CPU devices for data_parallel.
    results["devices"] = kerasfleet.devices(cpu_devices=2)


def dense_model(dict_inputs=False):
    keras.utils.set_random_seed(1)
    if dict_inputs:
        a, b = keras.Input((3,), name="a"), keras.Input((3,), name="b")
        h = keras.layers.Concatenate()([a, b])
        inputs = {"a": a, "b": b}
    else:
        inputs = h = keras.Input((6,))
    h = keras.layers.Dense(16, activation="relu")(h)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(h))
    model.compile(keras.optimizers.SGD(0.1), "binary_crossentropy", metrics=["accuracy"])
    return model


def max_rel(a, b):
    return max(float(np.max(np.abs(x - y) / (np.abs(y) + 1e-6))) for x, y in zip(a, b))


def weights(model):
    return [np.asarray(w) for w in model.get_weights()]


def fit_parity(cls, dict_inputs, workers, val_workers):
    """val_workers=0: the validation data goes to fit as it is (only the training data streams)."""
    ds = cls(batches=10)
    val = cls(batches=3)
    direct = dense_model(dict_inputs)
    h1 = direct.fit(ds, validation_data=val, epochs=2, shuffle=False, verbose=0)
    fleet = dense_model(dict_inputs)
    # fit's own shuffle (True by default) must not reorder what the Loader streams.
    with contextlib.ExitStack() as stack:
        train = stack.enter_context(kerasfleet.Loader(ds, workers=workers))
        valid = stack.enter_context(kerasfleet.Loader(val, workers=val_workers)) if val_workers else val
        h2 = fleet.fit(train, validation_data=valid, epochs=2, verbose=0)
    return {
        "max_rel": max_rel(weights(fleet), weights(direct)),
        "val_loss": [h1.history["val_loss"], h2.history["val_loss"]],
    }


# Worker starts dominate this script's time (each imports Keras and the backend): few of them.
# The order across 2 workers does not depend on the backend: it is checked on JAX and TF, and
# torch (the heaviest import) checks how its trainer takes the Loader's batches, with 1 worker.
results["tuple"] = fit_parity(loader_fns.Rows, False, workers=1 if backend == "torch" else 2, val_workers=1)
results["dict"] = fit_parity(loader_fns.Dicts, True, workers=1, val_workers=0)

if backend == "torch":
    try:
        with kerasfleet.data_parallel():
            pass
        results["torch_refused"] = ""
    except kerasfleet.InputError as exc:
        results["torch_refused"] = str(exc)
else:
    ds = loader_fns.Rows(batches=8, rows=16)
    single = dense_model()
    start = weights(single)
    single.fit(ds, epochs=2, shuffle=False, verbose=0)
    with kerasfleet.data_parallel(cpu_devices=2) as strategy, kerasfleet.Loader(ds, workers=1) as loader:
        model = dense_model()
        model.set_weights(start)
        model.fit(loader, epochs=2, verbose=0)  # Keras's look at one batch must not use one up
    results["data_parallel"] = {"max_rel": max_rel(weights(model), weights(single)), "strategy": type(strategy).__name__}
    try:
        kerasfleet.devices(cpu_devices=3)
        results["too_late"] = ""
    except kerasfleet.InputError as exc:
        results["too_late"] = str(exc)
    if backend == "jax":
        try:
            with kerasfleet.data_parallel():
                uneven = dense_model()  # 7 rows in batches of 4: the last batch (3 rows) cannot split
                uneven.fit(np.ones((7, 6), "float32"), np.ones((7, 1), "float32"), batch_size=4, epochs=1, verbose=0)
            results["uneven"] = ""
        except kerasfleet.InputError as exc:
            results["uneven"] = str(exc)

Path(sys.argv[1]).write_text(json.dumps(results))
