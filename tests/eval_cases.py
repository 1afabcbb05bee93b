"""Runs model.evaluate and kerasfleet.evaluate side by side in a fresh process (one backend).

    KERAS_BACKEND=tensorflow python tests/eval_cases.py OUT_DIR

writes OUT_DIR/results.json: for every case, Keras's dict and kerasfleet's dict, and the
score functions' values computed with a plain loop, so the test process compares them without
importing a second backend.
"""

import json
import sys
from pathlib import Path

import keras
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import eval_fns  # noqa: E402
import kerasfleet  # noqa: E402
import kerasfleet.evaluation.evaluate as ev  # noqa: E402

ROWS = 1504  # a multiple of model.evaluate's batch of 32: see evaluate.py on per-output losses under TF


def single():
    inp = keras.Input((12,), name="features")
    h = keras.layers.Dense(16, activation="relu")(inp)
    model = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(h))
    model.compile("adam", "binary_crossentropy", metrics=["accuracy", keras.metrics.AUC(name="auc")])
    return model


def multi():
    inp = keras.Input((12,), name="features")
    h = keras.layers.Dense(16, activation="relu")(inp)
    out = {"cls": keras.layers.Dense(1, activation="sigmoid", name="cls")(h), "reg": keras.layers.Dense(2, name="reg")(h)}
    model = keras.Model(inp, out)
    model.compile(
        "adam",
        loss={"cls": "binary_crossentropy", "reg": "mse"},
        metrics={"cls": ["accuracy", keras.metrics.AUC(name="auc")], "reg": ["mae"]},
    )
    return model


def main(out_dir):
    out = Path(out_dir)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, 12)).astype("float32")
    y_cls = (x[:, :1] + 0.3 * rng.normal(size=(ROWS, 1)) > 0).astype("float32")
    y_reg = rng.normal(size=(ROWS, 2)).astype("float32")
    weight = rng.uniform(0.2, 2.0, ROWS).astype("float32")
    np.save(out / "x.npy", x)
    np.save(out / "y_cls.npy", y_cls)
    results = {}
    # Several windows per call: the merge across windows is what is checked.
    ev._WINDOW_BYTES, ev._MIN_WINDOW_ROWS = 8192, 100
    for kind, build, y in [("single", single, y_cls), ("multi", multi, {"cls": y_cls, "reg": y_reg})]:
        model = build()
        model.fit(x, y, epochs=1, batch_size=64, verbose=0)  # trained a little: a real AUC
        path = out / f"{kind}.keras"
        model.save(path)
        # One warm Fleet for both calls (the calls on a path are the score and ONNX cases below).
        # Windows from 2 workers merge on the single-output model; 1 worker (several windows
        # still) is enough for the multi-output one, and spares a worker's start.
        with kerasfleet.Fleet(path, engine="keras", workers=2 if kind == "single" else 1) as fleet:
            for weighted in (False, True):
                sw = weight if weighted else None
                name = f"{kind}{'-weighted' if weighted else ''}"
                want = model.evaluate(x, y, sample_weight=sw, return_dict=True, verbose=0)
                got = kerasfleet.evaluate(fleet, x, y, sample_weight=sw)
                results[name] = {"keras": {k: float(v) for k, v in want.items()}, "fleet": got}
            if kind == "multi":  # a score function on dicts, in the fleet's workers (one core each)
                y_pred = model.predict(x, verbose=0)
                got = kerasfleet.evaluate(fleet, x, y, metrics=[eval_fns.abs_error_first])
                loop = float(np.mean([np.abs(y_reg[i, 0] - y_pred["reg"][i, 0]) for i in range(ROWS)]))
                results["multi-score"] = {"fleet": got["abs_error_first"], "loop": loop, "loss": got["loss"]}
    # NumPy per-row scores in the workers, against the plain loop over rows.
    model = keras.saving.load_model(out / "single.keras")
    y_pred = model.predict(x, verbose=0)
    loop = float(np.mean([eval_fns.crps_gaussian_quadrature(y_cls[i : i + 1], y_pred[i : i + 1])[0] for i in range(ROWS)]))
    got, per_row = kerasfleet.evaluate(
        out / "single.keras",
        str(out / "x.npy"),
        str(out / "y_cls.npy"),
        metrics=[eval_fns.crps_gaussian_quadrature, "mae", lambda t, p: np.abs(t - p)[:, 0]],
        engine="keras",
        return_scores=True,
    )
    keras_mae = keras.metrics.MeanAbsoluteError()
    keras_mae.update_state(y_cls, y_pred)
    results["scores"] = {
        "loop_crps": loop,
        "fleet": got,
        "per_row_len": len(per_row["crps_gaussian_quadrature"]),
        "keras_mae": float(keras_mae.result()),
        "loop_abs": float(np.mean(np.abs(y_cls - y_pred))),
        "keras_eval": {k: float(v) for k, v in model.evaluate(x, y_cls, return_dict=True, verbose=0).items()},
    }
    # ONNX Runtime predictions: parity-checked to rtol 1e-4, so the metrics follow closely.
    results["onnx"] = {
        "keras": results["single"]["keras"],
        "fleet": kerasfleet.evaluate(str(out / "single.keras"), x, y_cls, engine="onnx", workers=2),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
