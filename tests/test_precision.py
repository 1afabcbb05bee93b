"""The OpenVINO engine (parity over the zoo, refusals) and precision= (int8, bf16, fp16) under the accuracy gate."""

import dataclasses
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

import kerasfleet
from conftest import HERE, load_x, load_y
from kerasfleet.cli.main import main as cli
from kerasfleet.engines.model_file import resolve_model
from kerasfleet.engines.openvino_engine import EngineRefused, check_parity
from kerasfleet.runtime import cpu_flags
from kerasfleet.serving.execution import InProcess
from kerasfleet.serving.options import ModelSpec, ServeOptions
from kerasfleet.tune import PrecisionRefused, TunedPlan, cached_choices, plan_path, resolve_in_process
from kerasfleet.tune import precision as precision_module
from kerasfleet.tune.precision import Gate, check_hardware

EXPORTABLE = ["mlp", "multi_input", "multi_output", "batchnorm_dropout", "embedding", "custom_layer"]


def assert_close(got, expected, rtol=1e-4, atol=1e-5):
    """The export's parity rule (rtol 1e-4, atol 1e-5); `expected` is the zoo's saved dict."""
    pairs = [(got[k], expected[k]) for k in expected] if isinstance(got, dict) else [(got, expected["output_0"])]
    for g, e in pairs:
        assert g.shape == e.shape and g.dtype == e.dtype
        np.testing.assert_allclose(g, e, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def folder(zoo):
    return zoo("jax")


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """classifier.keras (trained), ties.keras (nearly tied logits), x.npy and each model's predictions."""
    out = tmp_path_factory.mktemp("precision_models")
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    subprocess.run(
        [sys.executable, str(HERE / "precision_models.py"), str(out)], env=env, check=True, timeout=300, capture_output=True
    )
    return out


@pytest.mark.parametrize("name", EXPORTABLE)
def test_openvino_matches_model_predict(folder, name):
    x = load_x(folder, name)
    predictor = kerasfleet.Predictor(folder / f"{name}.keras", engine="openvino", max_batch_size=256)
    assert predictor.engine_name == "openvino" and predictor.precision is None
    assert_close(predictor.predict(x), load_y(folder, name))
    assert predictor.stats()["retraces"] == 0


def test_openvino_fleet_matches_model_predict(folder):
    got = kerasfleet.predict(
        folder / "multi_output.keras", load_x(folder, "multi_output"), engine="openvino", workers=2, progress=False
    )
    assert_close(got, load_y(folder, "multi_output"))


def test_openvino_refuses_what_it_cannot_run_with_the_reason(folder, tmp_path):
    # The ONNX export is refused for this model, and OpenVINO reads only that export.
    with pytest.raises(kerasfleet.ModelLoadError, match="ONNX"):
        kerasfleet.Predictor(folder / "not_exportable.keras", engine="openvino")
    # OpenVINO's own check: against outputs that are not Keras's, refused with the numbers.
    from kerasfleet.engines.export import export

    onnx = export(resolve_model(folder / "mlp.keras"), custom_objects=None, safe_mode=True)
    with np.load(onnx.sample) as data:
        arrays = dict(data)
    arrays["out_0"] = arrays["out_0"] + 0.01
    wrong = tmp_path / "wrong.sample.npz"
    np.savez(wrong, **arrays)
    copy = tmp_path / "wrong.onnx"
    copy.write_bytes(onnx.path.read_bytes())
    with pytest.raises(EngineRefused, match=r"Expected OpenVINO to match Keras within rtol=0.0001, atol=1e-05.*max abs 0.01"):
        check_parity(copy, onnx.meta, wrong, rtol=1e-4, atol=1e-5)
    assert check_parity(onnx.path, onnx.meta, onnx.sample, rtol=1e-4, atol=1e-5)["max_abs"] < 1e-5


def test_auto_in_process_uses_openvino_when_the_plan_found_it_fastest(folder, monkeypatch, tmp_path):
    monkeypatch.setenv("KERASFLEET_CACHE_DIR", str(tmp_path / "cache"))
    model = resolve_model(folder / "mlp.keras")
    plan = TunedPlan(
        "openvino", 2, 1, 256, 9e5, 1.0, in_process_rows_per_s=8e5, in_process_batch=256, in_process_engine="openvino"
    )
    path = plan_path(model, "jax")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(dataclasses.asdict(plan)))
    choice = resolve_in_process(model, engine="auto", backend="jax", custom_objects=None, safe_mode=True)
    assert choice.engine == "openvino" and choice.onnx is not None and choice.precision is None


def test_int8_on_a_trained_classifier_passes_the_gate_and_is_cached(classifiers, monkeypatch):
    path, x = classifiers / "classifier.keras", np.load(classifiers / "x.npy")
    expected = np.load(classifiers / "classifier.y.npy")
    with kerasfleet.Fleet(path, workers=2, precision="int8", calibration=x, backend="jax") as fleet:
        got = fleet.predict(x, progress=False)
        choice = fleet.precision
        assert fleet.stats()["precision"] == choice.describe()
    assert choice.precision == "int8" and choice.gate["rows"] == 1024 and choice.gate["top1_agreement"] >= 0.995
    assert np.mean(got.argmax(1) == expected.argmax(1)) >= 0.995
    # Every candidate was measured and gated; each passes on this trained classifier.
    gated = [c for c in choice.candidates if "passed" in c]
    assert {c["variant"] for c in gated} == {"ort-static", "ort-dynamic", "openvino-int8"}
    assert all(c["passed"] and c["top1_agreement"] >= 0.995 and 0 < c["max_abs"] < 0.1 for c in gated)
    fastest = max(gated, key=lambda c: c["rows_per_s"])
    fp32 = max(c["rows_per_s"] for c in choice.candidates if c["variant"].endswith("-fp32"))
    if fastest["rows_per_s"] >= fp32:  # the fastest passing candidate runs (2.5x fp32 on the bench MLP here)
        assert (choice.variant, choice.rows_per_s, choice.note) == (fastest["variant"], fastest["rows_per_s"], "")
        assert 0 < np.abs(got - expected).max() < 0.1  # int8: close, but not fp32's answers
    else:  # a noisy neighbour can make int8 lose the race: then the exact export runs, said so
        assert choice.variant.endswith("-fp32") and "no int8 candidate beat fp32 here" in choice.note
    # Stored: the next use reads the verdict, no Keras reference runs again.
    verdicts = cached_choices(resolve_model(path), "jax")
    assert any(not v["refused"] and v["choice"]["variant"] == choice.variant for v in verdicts)
    # The server takes the same verdict (calibration rows from a .npy file: the same rows, the same key).
    monkeypatch.setattr(precision_module, "keras_reference", lambda *a, **k: pytest.fail("the gate ran again"))
    options = ServeOptions(precision="int8", calibration=str(classifiers / "x.npy"), max_batch_size=64)
    served = InProcess(ModelSpec("classifier", path), options)
    try:
        assert served.engine == f"{choice.engine}_int8" and choice.describe() in served.description
        # Dynamic int8 scales activations per batch: other batch sizes give other (gated) answers.
        rows = served.run([x[:64]])[0]
        assert np.mean(rows.argmax(1) == expected[:64].argmax(1)) >= 0.98 and np.abs(rows - expected[:64]).max() < 0.1
    finally:
        served.close()


def test_a_model_that_fails_the_gate_is_refused_with_its_numbers_never_used(classifiers, monkeypatch):
    path, x = classifiers / "ties.keras", np.load(classifiers / "x.npy")
    message = r"Expected int8 outputs within the accuracy gate \(max_top1_disagreement=0.005\) on 1024 held-out rows\. Received: ort-static: top-1 agreement 9\d\.\d\d%, max abs diff .*top-1 disagreement .*% > max_top1_disagreement 0\.50%"
    with pytest.raises(PrecisionRefused, match=message):
        kerasfleet.predict(path, x, precision="int8", workers=2, backend="jax", progress=False)
    # The refusal is remembered: asked again, no candidate is built or gated.
    monkeypatch.setattr(precision_module, "keras_reference", lambda *a, **k: pytest.fail("the gate ran again"))
    with pytest.raises(PrecisionRefused, match="Refused, never used"):
        kerasfleet.Predictor(path, precision="int8", calibration=None)
    # A threshold set tight refuses the trained classifier too, by its max abs difference.
    monkeypatch.undo()
    with pytest.raises(PrecisionRefused, match=r"max abs difference [0-9.e-]+ > atol 1e-06"):
        kerasfleet.Predictor(classifiers / "classifier.keras", precision="int8", calibration=x, atol=1e-6)
    result = CliRunner().invoke(cli, ["info", str(path)])
    assert result.exit_code == 0 and "precision int8 refused: Expected int8 outputs" in result.output


@pytest.mark.skipif(not {"avx512_bf16", "amx_bf16"} & cpu_flags(), reason="this CPU has no bf16 instructions")
def test_bf16_runs_on_openvino_under_the_gate(classifiers):
    path, x = classifiers / "classifier.keras", np.load(classifiers / "x.npy")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predictor = kerasfleet.Predictor(path, precision="bf16", calibration=x, max_batch_size=64)
    choice = predictor.precision
    (bf16,) = [c for c in choice.candidates if c["variant"] == "openvino-bf16"]
    assert bf16["passed"] and bf16["top1_agreement"] >= 0.995 and 0 < bf16["max_abs"] < 0.05
    if choice.variant == "openvino-bf16":
        assert predictor.engine_name == "openvino" and choice.ov_precision == "bf16" and not choice.note
    else:
        # On a model this small bf16 can lose to fp32's overheads: the fp32 export runs, said so.
        assert choice.ov_precision == "f32" and "no bf16 candidate beat fp32 here" in choice.note
        assert any("no bf16 candidate beat fp32" in str(w.message) for w in caught)
    expected = np.load(classifiers / "classifier.y.npy")
    got = predictor.predict(x)
    assert np.mean(got.argmax(1) == expected.argmax(1)) >= 0.995 and np.abs(got - expected).max() < 0.05


def test_bf16_and_fp16_are_refused_on_cpus_without_the_instructions(classifiers):
    with pytest.raises(
        kerasfleet.InputError,
        match=r"Expected a CPU with AVX512_BF16 or AMX_BF16 for precision='bf16'.*Received: a CPU with avx2",
    ):
        check_hardware("bf16", frozenset({"avx2", "fma"}))
    check_hardware("bf16", frozenset({"avx512_bf16"}))
    check_hardware("fp16", frozenset({"amx_fp16"}))
    if not {"avx512_fp16", "amx_fp16"} & cpu_flags():
        with pytest.raises(kerasfleet.InputError, match="Expected a CPU with AVX512_FP16 or AMX_FP16 for precision='fp16'"):
            kerasfleet.Predictor(classifiers / "classifier.keras", precision="fp16", calibration=np.load(classifiers / "x.npy"))
        result = CliRunner().invoke(
            cli,
            ["tune", str(classifiers / "classifier.keras"), "--precision", "fp16", "--calibration", str(classifiers / "x.npy")],
        )
        assert result.exit_code == 1 and "AVX512_FP16" in result.output


def test_precision_arguments_are_refused_before_any_work(classifiers, folder):
    path, x = classifiers / "classifier.keras", np.load(classifiers / "x.npy")
    cases = [
        (dict(precision="int4"), r"Expected precision to be one of \['fp32', 'int8', 'bf16', 'fp16'\]"),
        (dict(precision="int8", engine="keras"), "Expected engine 'auto', 'onnx' or 'openvino' with precision='int8'"),
        (dict(precision="bf16", engine="onnx"), "Expected engine 'auto' or 'openvino' with precision='bf16'"),
        (dict(precision="int8", max_top1_disagreement=2), r"Expected max_top1_disagreement to be a number in \[0, 1\]"),
        (dict(precision="int8", atol=-1.0), "Expected atol to be a number >= 0"),
    ]
    for kwargs, match in cases:
        with pytest.raises(kerasfleet.InputError, match=match):
            kerasfleet.predict(path, x, **kwargs)
    with pytest.raises(kerasfleet.InputError, match="Expected at least 64 rows to calibrate and gate"):
        kerasfleet.Predictor(folder / "mlp.keras", precision="int8", calibration=load_x(folder, "mlp")[:10])
    with pytest.raises(kerasfleet.InputError, match="Expected calibration= rows for precision='int8'"):
        kerasfleet.Fleet(folder / "mlp.keras", precision="int8", workers=1)
    with pytest.raises(kerasfleet.InputError, match="Expected engine 'auto', 'onnx' or 'openvino'"):
        ServeOptions(precision="int8", engine="keras")
    with pytest.raises(kerasfleet.InputError, match="Expected precision='fp32' with cluster='ray'"):
        kerasfleet.Fleet(folder / "mlp.keras", precision="int8", cluster="ray", calibration=load_x(folder, "mlp"))
    assert Gate().judge({"max_abs": 1.0, "mean_abs": 0.1, "top1_agreement": None})[0] is False  # no threshold applies


def test_gate_numbers_are_what_they_say():
    ref = [np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], "float32"), np.zeros((4, 1), "float32")]
    got = [np.array([[0.8, 0.2], [0.2, 0.8], [0.4, 0.6], [0.3, 0.7]], "float32"), np.full((4, 1), 0.05, "float32")]
    numbers = precision_module.gate_numbers(ref, got)
    assert numbers["top1_agreement"] == 0.75 and numbers["rows"] == 4
    assert numbers["max_abs"] == pytest.approx(0.2) and numbers["mean_abs"] == pytest.approx((0.1 * 2 + 0.2 * 2 + 0.05 * 4) / 12)
    assert Gate().judge(numbers) == (False, "top-1 disagreement 25.00% > max_top1_disagreement 0.50%")
    # top-1 agreement gates the classifier head only: the regression head needs atol
    assert Gate(max_top1_disagreement=0.25).judge(numbers)[1].startswith("no threshold applies to output 1")
    assert Gate(max_top1_disagreement=0.25, atol=0.25).judge(numbers) == (True, "")
    assert Gate(0.3, atol=0.1).judge(numbers)[1] == "max abs difference 0.2 > atol 0.1"
    # a NaN where fp32 is finite fails whatever the thresholds
    nan = [got[0], np.array([[np.nan]] * 4, "float32")]
    assert Gate(1.0, atol=10.0).judge(precision_module.gate_numbers(ref, nan))[0] is False


def test_openvino_imported_by_kerasfleet_sends_no_usage_report():
    """`import openvino` reports itself to Google Analytics from a forked process unless the user
    opted out; kerasfleet imports it on the user's behalf, so its converter gets its no-op stub."""
    code = (
        "import sys\n"
        "from kerasfleet.engines.openvino_engine import import_openvino\n"
        "ov = import_openvino()\n"
        "import openvino.tools.ovc.telemetry_utils as t\n"
        "print(t.tm.__name__, 'openvino_telemetry' in sys.modules, hasattr(ov, 'Core'))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["openvino.tools.ovc.telemetry_stub", "False", "True"]
    # A process that imported OpenVINO (and its telemetry) itself keeps them (CI=true: the
    # telemetry declines to send from CI, so this test sends nothing either).
    code = "import openvino, openvino_telemetry\n" + code
    env = {**os.environ, "CI": "true"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["openvino_telemetry", "True", "True"]
