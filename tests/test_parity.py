"""Outputs equal model.predict (rtol 1e-5, atol 1e-6) across the model zoo, on JAX, TensorFlow and torch."""

import pytest

import kerasfleet
from conftest import BACKENDS, assert_same, load_x, load_y
from kerasfleet.engines import default_batch_size

MODELS = ["mlp", "multi_input", "multi_output", "batchnorm_dropout", "embedding", "custom_layer", "not_exportable"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_model_predict(zoo, backend, name):
    folder = zoo(backend)
    got = kerasfleet.predict(
        folder / f"{name}.keras", load_x(folder, name), workers=2, batch_size=256, backend=backend, engine="keras", progress=False
    )
    assert_same(got, load_y(folder, name))


@pytest.mark.parametrize("backend", BACKENDS)
def test_list_input_and_default_batch(zoo, backend):
    folder = zoo(backend)
    path = folder / "multi_input.keras"
    x = load_x(folder, "multi_input")  # {"numeric": (3001, 12), "image": (3001, 6, 6, 2)}
    # The default batch for the Keras engine is about 4 MB of input, capped at 1024 rows: rows of
    # 12 + 72 float32 = 336 bytes give 1024, so 3001 rows run as 3 batches, the last one padded.
    default = default_batch_size((12 + 6 * 6 * 2) * 4, "cpu", "keras")
    assert default == 1024 and len(x["numeric"]) % default != 0
    # A list in the model's input order (numeric, image) is matched to the inputs by position and
    # gives what model.predict gave on the dict; no batch_size: the default batch.
    got = kerasfleet.predict(path, [x["numeric"], x["image"]], workers=1, backend=backend, engine="keras", progress=False)
    assert_same(got, load_y(folder, "multi_input"))
    # Refused before any worker starts: the list in the wrong order (shapes do not fit) and a
    # single array for two inputs, each with what was expected.
    with pytest.raises(kerasfleet.InputError, match=r"Expected input 'numeric' of shape \(rows, 12\)"):
        kerasfleet.predict(path, [x["image"], x["numeric"]], workers=1, backend=backend, engine="keras")
    with pytest.raises(kerasfleet.InputError, match="Expected a list or dict of 2 arrays"):
        kerasfleet.predict(path, x["numeric"], backend=backend)
