"""`kerasfleet profile`: a real run on a small model, its table, words and report."""

import os
import subprocess
import sys


def test_profile_prints_table_and_writes_report(zoo, tmp_path):
    folder = zoo("jax")
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kerasfleet",
            "profile",
            str(folder / "mlp.keras"),
            "--batch-sizes",
            "1,16",
            "--calls",
            "30",
            "-o",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for path in ("model.predict", "predict_on_batch", "model(x)", "compiled buckets (Keras)", "ONNX Runtime"):
        assert out.count(path) >= 2, path  # one row per batch size
    assert "The first model.predict call took" in out and "A new batch shape (17 rows)" in out
    assert "kerasfleet would use: engine" in out
    report = (tmp_path / "r" / "report.html").read_text()
    assert "latency_cdf.png" in report and "Throughput per engine" in report
    for png in ("latency_cdf.png", "throughput.png"):
        assert (tmp_path / "r" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_refuses_bad_batch_sizes(zoo):
    result = subprocess.run(
        [sys.executable, "-m", "kerasfleet", "profile", str(zoo("jax") / "mlp.keras"), "--batch-sizes", "one"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "Expected comma-separated integers" in result.stderr
