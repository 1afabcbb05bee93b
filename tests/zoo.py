"""Builds the test model zoo in a fresh process for one backend (run as a script).

    KERAS_BACKEND=jax python tests/zoo.py OUT_DIR

writes OUT_DIR/<name>.keras, OUT_DIR/<name>.x.npz (inputs) and OUT_DIR/<name>.y.npz (what
`model.predict` returned), so tests compare kerasfleet against Keras itself without importing
a backend into the test process.
"""

import sys
from pathlib import Path

import keras
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from zoo_layers import ScaledDense, SpectrumMagnitude  # noqa: E402

ROWS = 3001  # not a multiple of any batch size: the last batch is padded


def mlp():
    inp = keras.Input((32,), name="features")
    h = keras.layers.Dense(64, activation="relu")(inp)
    return keras.Model(inp, keras.layers.Dense(10, activation="softmax")(h)), {"features": "float32"}


def multi_input():
    a = keras.Input((12,), name="numeric")
    b = keras.Input((6, 6, 2), name="image")
    hb = keras.layers.Flatten()(keras.layers.Conv2D(4, 3, activation="relu")(b))
    h = keras.layers.Concatenate()([a, hb])
    return keras.Model({"numeric": a, "image": b}, keras.layers.Dense(3)(h)), {"numeric": "float32", "image": "float32"}


def multi_output():
    inp = keras.Input((16,), name="x")
    h = keras.layers.Dense(32, activation="relu")(inp)
    out = {
        "score": keras.layers.Dense(1, name="score")(h),
        "classes": keras.layers.Dense(5, activation="softmax", name="classes")(h),
    }
    return keras.Model(inp, out), {"x": "float32"}


def batchnorm_dropout():
    model = keras.Sequential(
        [
            keras.Input((20,), name="inputs"),
            keras.layers.Dense(32),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(4),
        ]
    )
    model.compile("adam", "mse")
    rng = np.random.default_rng(1)
    model.fit(rng.normal(3.0, 2.0, (512, 20)).astype("float32"), rng.normal(size=(512, 4)).astype("float32"), epochs=2, verbose=0)
    return model, {"inputs": "float32"}


def embedding():
    inp = keras.Input((8,), dtype="int32", name="tokens")
    h = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(100, 4)(inp))
    return keras.Model(inp, keras.layers.Dense(2)(h)), {"tokens": "int32"}


def custom_layer():
    inp = keras.Input((10,), name="x")
    return keras.Model(inp, keras.layers.Dense(3)(ScaledDense(8, scale=1.5)(inp))), {"x": "float32"}


def not_exportable():
    inp = keras.Input((16,), name="signal")
    return keras.Model(inp, keras.layers.Dense(3)(SpectrumMagnitude()(inp))), {"signal": "float32"}


BUILDERS = {f.__name__: f for f in (mlp, multi_input, multi_output, batchnorm_dropout, embedding, custom_layer, not_exportable)}


def inputs_for(model, dtypes, rng):
    arrays = {}
    for tensor in model.inputs:
        name = tensor.name if tensor.name in dtypes else next(iter(dtypes))
        shape = (ROWS, *tensor.shape[1:])
        if dtypes[name].startswith("int"):
            arrays[name] = rng.integers(0, 100, shape).astype(dtypes[name])
        else:
            arrays[name] = rng.normal(size=shape).astype("float32")
    return arrays


def main(out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    for name, build in BUILDERS.items():
        model, dtypes = build()
        model.save(out / f"{name}.keras")
        arrays = inputs_for(model, dtypes, rng)
        x = arrays if len(arrays) > 1 else next(iter(arrays.values()))
        y = model.predict(x, verbose=0)
        np.savez(out / f"{name}.x.npz", **arrays)
        if isinstance(y, dict):
            np.savez(out / f"{name}.y.npz", **y)
        else:
            np.savez(out / f"{name}.y.npz", output_0=y)

    # A model whose custom class lives only in this script: workers can never import it.
    @keras.saving.register_keras_serializable(package="only_in_script")
    class Secret(keras.layers.Layer):
        def call(self, x):
            return x * 2.0

    inp = keras.Input((4,), name="x")
    keras.Model(inp, Secret()(inp)).save(out / "unimportable.keras")


if __name__ == "__main__":
    main(sys.argv[1])
