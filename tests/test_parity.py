"""Outputs equal model.predict (rtol 1e-5, atol 1e-6) across the model zoo, on JAX, TensorFlow and torch."""

import pytest

import kerasfleet
from conftest import BACKENDS, assert_same, load_x, load_y

MODELS = ["mlp", "multi_input", "multi_output", "batchnorm_dropout", "embedding", "custom_layer", "not_exportable"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_model_predict(zoo, backend, name):
    folder = zoo(backend)
    got = kerasfleet.predict(folder / f"{name}.keras", load_x(folder, name), workers=2, batch_size=256, backend=backend, engine="keras", progress=False)
    assert_same(got, load_y(folder, name))


@pytest.mark.parametrize("backend", BACKENDS)
def test_list_input_and_default_batch(zoo, backend):
    folder = zoo(backend)
    x = load_x(folder, "multi_input")
    # The functional model was built from a dict, so Keras takes the dict; a list in input
    # order is refused with the expected keys rather than silently misassigned.
    with pytest.raises(kerasfleet.InputError, match="Expected a list or dict of 2 arrays"):
        kerasfleet.predict(folder / "multi_input.keras", x["numeric"], backend=backend)
    got = kerasfleet.predict(folder / "multi_input.keras", x, workers=1, backend=backend, engine="keras", progress=False)
    assert_same(got, load_y(folder, "multi_input"))
