"""Model sources: paths (.keras, .h5), in-memory models, custom objects, and clear refusals."""

from pathlib import Path

import numpy as np
import pytest

import kerasfleet
from conftest import assert_same, load_x, load_y
from kerasfleet.engines.model_file import resolve_model


@pytest.fixture(scope="module")
def folder(zoo):
    return zoo("jax")


@pytest.mark.parametrize(
    "model, error, message",
    [
        ("nowhere.keras", kerasfleet.ModelLoadError, r"Expected an existing model file"),
        ("model.pt", kerasfleet.InputError, r"Expected a model file ending in .keras, .h5"),
        (42, kerasfleet.InputError, r"Received: model of type int"),
    ],
)
def test_bad_model_argument(model, error, message):
    with pytest.raises(error, match=message):
        kerasfleet.predict(model, np.zeros((2, 2)))


def test_corrupt_model_files_are_refused_before_start(tmp_path):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"definitely not a zip")
    with pytest.raises(kerasfleet.ModelLoadError, match=r"corrupt or not a Keras model"):
        kerasfleet.predict(bad, np.zeros((2, 2)))
    bad_h5 = tmp_path / "bad.h5"
    bad_h5.write_bytes(b"nor an hdf5 file")
    with pytest.raises(kerasfleet.ModelLoadError, match=r"Expected an HDF5 model file"):
        kerasfleet.predict(bad_h5, np.zeros((2, 2)))


def test_unknown_custom_layer_gets_a_hint_before_any_worker(folder):
    with pytest.raises(
        kerasfleet.ModelLoadError,
        match=r"'Secret'.*neither in custom_objects nor importable.*custom_objects=\{'Secret': Secret\}",
    ):
        kerasfleet.predict(folder / "unimportable.keras", np.zeros((2, 4), "float32"))


def test_signature_read_without_keras(folder):
    sig = resolve_model(folder / "multi_input.keras").signature
    assert sig.structure == "dict"
    assert [(s.name, s.shape, s.dtype) for s in sig.inputs] == [("numeric", (12,), "float32"), ("image", (6, 6, 2), "float32")]
    assert resolve_model(folder / "custom_layer.keras").signature.custom_modules == ("zoo_layers",)


def test_in_memory_model_with_custom_layer_matches_predict():
    import keras

    from zoo_layers import ScaledDense

    inp = keras.Input((6,), name="x")
    model = keras.Model(inp, keras.layers.Dense(2)(ScaledDense(4)(inp)))
    x = np.random.default_rng(0).normal(size=(777, 6)).astype("float32")
    got = kerasfleet.predict(model, x, workers=1, engine="keras", progress=False)
    np.testing.assert_allclose(got, model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_h5_model_and_custom_objects(folder, tmp_path):
    import keras

    from zoo_layers import ScaledDense

    model = keras.saving.load_model(folder / "custom_layer.keras")
    path = tmp_path / "legacy.h5"
    model.save(path)
    got = kerasfleet.predict(
        path,
        load_x(folder, "custom_layer"),
        workers=1,
        custom_objects={"ScaledDense": ScaledDense},
        engine="keras",
        progress=False,
    )
    assert_same(got, load_y(folder, "custom_layer"))


def test_lambda_layers_need_an_explicit_opt_out_of_safe_mode(tmp_path):
    import keras

    inp = keras.Input((3,), name="x")
    model = keras.Model(inp, keras.layers.Lambda(lambda t: t * 3.0)(inp))
    path = tmp_path / "lambda.keras"
    model.save(path)
    x = np.ones((5, 3), "float32")
    with pytest.raises(kerasfleet.ModelLoadError, match="safe_mode=False only if you trust the file"):
        kerasfleet.predict(path, x, workers=1, engine="keras")
    np.testing.assert_allclose(kerasfleet.predict(path, x, workers=1, safe_mode=False, engine="keras"), x * 3.0)


def _init_source():
    """`_LAZY`, `__all__` and the TYPE_CHECKING imports, read from kerasfleet/__init__.py's source."""
    import ast

    tree = ast.parse(Path(kerasfleet.__file__).read_text())
    lazy = all_names = None
    typed = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id == "_LAZY":
                lazy = ast.literal_eval(node.value)
            elif node.targets[0].id == "__all__":
                all_names = ast.literal_eval(node.value)
        elif isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.level == 1, ast.dump(imp)
                typed.update({alias.asname or alias.name: "." + imp.module for alias in imp.names})
    assert lazy and all_names and typed, "kerasfleet/__init__.py no longer has _LAZY, __all__ and TYPE_CHECKING imports"
    return lazy, all_names, typed


def test_public_api_is_complete():
    import importlib
    import re
    import subprocess
    import sys

    lazy, all_names, typed = _init_source()
    # The three lists in __init__.py agree: what is exported, what loads lazily, what type checkers see.
    assert len(all_names) == len(set(all_names))
    assert set(all_names) == set(lazy) | {"__version__"}
    assert typed == lazy
    assert kerasfleet.__all__ == all_names
    # Each lazy name is the object defined in the module it names (not a re-export from elsewhere).
    for name, module_name in lazy.items():
        module = importlib.import_module("kerasfleet" + module_name)
        obj = getattr(module, name)
        assert obj.__module__ == module.__name__, f"{name} is defined in {obj.__module__}, _LAZY says {module.__name__}"
        assert getattr(kerasfleet, name) is obj
    star = {}
    exec("from kerasfleet import *", star)
    assert set(all_names) <= set(star)
    # Every name the README and the package docstring use as kerasfleet.<Name>, and every error
    # class the README names, is exported.
    root = Path(kerasfleet.__file__).parents[2]
    text = (root / "README.md").read_text() + kerasfleet.__doc__
    used = set(re.findall(r"\bkerasfleet\.([A-Za-z_]\w*)", text)) | set(re.findall(r"`(\w+Error)`", text))
    assert {"predict", "Fleet", "Predictor", "make_plan", "WorkerCrashedError"} <= used
    assert used <= set(all_names), f"documented but not exported: {sorted(used - set(all_names))}"
    # `import kerasfleet` is lazy: a fresh process imports no framework, not even NumPy.
    probe = (
        "import sys, kerasfleet; print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'keras', 'jax', 'jaxlib', 'tensorflow', 'torch', 'onnxruntime', 'onnx', 'numpy'} "
        "| {m for m in sys.modules if m.startswith('kerasfleet.')}))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]", f"import kerasfleet imported {result.stdout.strip()}"
