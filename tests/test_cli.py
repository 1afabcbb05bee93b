"""The command line, run as a user runs it: a real process, real files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import assert_same, load_x, load_y


def cli(*args, timeout=240, **env_vars):
    env = {**os.environ, "KERAS_BACKEND": "jax", **env_vars}
    return subprocess.run(
        [sys.executable, "-m", "kerasfleet", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def folder(zoo):
    return zoo("jax")


def test_predict_npy_to_npy(folder, tmp_path):
    np.save(tmp_path / "x.npy", load_x(folder, "mlp"))
    result = cli(
        "predict",
        folder / "mlp.keras",
        tmp_path / "x.npy",
        "-o",
        tmp_path / "y.npy",
        "--workers",
        2,
        "--batch-size",
        256,
        "--engine",
        "keras",
    )
    assert result.returncode == 0, result.stderr
    assert "rows/s" in result.stderr
    assert_same(np.load(tmp_path / "y.npy"), load_y(folder, "mlp"))


def test_predict_multi_io_npz_to_npz(folder, tmp_path):
    np.savez(tmp_path / "x.npz", x=load_x(folder, "multi_output"))
    result = cli(
        "predict",
        folder / "multi_output.keras",
        tmp_path / "x.npz",
        "-o",
        tmp_path / "y.npz",
        "--workers",
        1,
        "--engine",
        "keras",
    )
    assert result.returncode == 0, result.stderr
    assert_same(dict(np.load(tmp_path / "y.npz")), load_y(folder, "multi_output"))


def test_bad_input_exits_non_zero_with_the_reason(folder, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 7), "float32"))
    result = cli("predict", folder / "mlp.keras", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    assert result.returncode != 0
    assert "Expected input 'features' of shape (rows, 32)" in result.stderr
    assert not (tmp_path / "y.npy").exists()


def test_info_json(folder, tmp_path):
    cache = str(tmp_path / "cache")  # empty: nothing measured for this model yet

    def info():
        result = cli("info", folder / "mlp.keras", "--json", KERASFLEET_CACHE_DIR=cache)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    facts = info()
    assert facts["usable_cores"] == len(os.sched_getaffinity(0))
    assert facts["workers"] * facts["threads_per_worker"] <= facts["usable_cores"]
    assert facts["backend"] == "jax" and facts["engine"] == "auto"
    assert facts["plan_in_force"].startswith("not measured yet")
    # Before any plan, the Keras engine's default batch: about 4 MB of input per batch, capped at
    # 1024 rows on CPU, and the MLP's rows are 32 float32 = 128 bytes, so 4 MB / 128 B -> 1024.
    assert facts["batch_size"] == 1024

    tuned = cli("tune", folder / "mlp.keras", "--seconds", 1, KERASFLEET_CACHE_DIR=cache)
    assert tuned.returncode == 0, tuned.stderr
    plan_line = next(line for line in tuned.stdout.splitlines() if line.startswith("plan: "))
    described = plan_line.removeprefix("plan: ")
    engine = described.split(",")[0].removeprefix("engine ")
    assert engine in ("onnx", "keras"), plan_line
    assert f"stored in {cache}" in tuned.stdout

    facts = info()
    assert facts["plan_in_force"].startswith(f"engine {engine},")
    assert facts["plan_in_force"] == described  # the stored plan, read back as tune printed it
    # What a call would use now: the plan's engine, split and batch size.
    stored = json.loads(next((tmp_path / "cache" / "plans").glob("*.json")).read_text())
    assert facts["engine"] == f"auto ({engine})" and facts["batch_size_in_force"] == stored["batch_size"]
    assert (facts["workers"], facts["threads_per_worker"]) == (stored["workers"], stored["threads_per_worker"])
