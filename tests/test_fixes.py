"""Fixes found by reading the code, each with the test that failed before it."""

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import kerasfleet
from conftest import HERE, assert_clean, load_x, load_y

BACKEND = "jax"
SRC = Path(kerasfleet.__file__).parent


@pytest.fixture(scope="module")
def folder(zoo):
    return zoo(BACKEND)


def test_a_script_without_a_main_guard_works(folder, tmp_path):
    """Workers never re-run the caller's script (they used to, and died starting workers)."""
    script = tmp_path / "plain_script.py"
    np.save(tmp_path / "x.npy", load_x(folder, "mlp"))
    script.write_text(
        "import numpy as np, kerasfleet\n"
        "print('script body ran', flush=True)\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        f"y = kerasfleet.predict({str(folder / 'mlp.keras')!r}, x, workers=2, engine='keras', backend='jax')\n"
        f"with kerasfleet.Fleet({str(folder / 'mlp.keras')!r}, workers=2, engine='keras', backend='jax') as fleet:\n"
        "    y2 = fleet.predict(x)\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, y)\n"
        f"np.save({str(tmp_path / 'y2.npy')!r}, y2)\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("script body ran") == 1  # once: not again in any worker
    expected = load_y(folder, "mlp")["output_0"]
    for name in ("y.npy", "y2.npy"):
        np.testing.assert_allclose(np.load(tmp_path / name), expected, rtol=1e-5, atol=1e-6)


def test_a_custom_class_from_the_callers_script_is_refused_with_the_fix(tmp_path):
    script = tmp_path / "notebook_like.py"
    script.write_text(
        "import numpy as np, keras, kerasfleet\n"
        "@keras.saving.register_keras_serializable(package='mine')\n"
        "class Doubler(keras.layers.Layer):\n"
        "    def call(self, x):\n"
        "        return x * 2.0\n"
        "inp = keras.Input((4,), name='x')\n"
        "model = keras.Model(inp, Doubler()(inp))\n"
        "try:\n"
        "    kerasfleet.predict(model, np.ones((3, 4), 'float32'), workers=1, engine='keras')\n"
        "except kerasfleet.ModelLoadError as exc:\n"
        "    print('REFUSED:', exc)\n"
        "# In this process (no worker), a Predictor uses the class as it is.\n"
        "print('PREDICTOR:', kerasfleet.Predictor(model, engine='keras', max_batch_size=4).predict(np.ones((3, 4), 'float32')).sum())\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REFUSED:" in result.stdout and "'Doubler'" in result.stdout and "Move the class to a module" in result.stdout
    assert "PREDICTOR: 24.0" in result.stdout


@pytest.mark.parametrize("transient", [True, False])
def test_a_worker_dying_while_compiling_a_new_shape_does_not_hang_the_call(monkeypatch, folder, tmp_path, transient):
    fault = f"kill@probe@{tmp_path / 'fired'}" if transient else "kill@probe"
    monkeypatch.setenv("KERASFLEET_FAULT", fault)
    x = load_x(folder, "mlp")
    with kerasfleet.Fleet(folder / "mlp.keras", workers=2, batch_size=64, backend=BACKEND, engine="keras") as fleet:
        if transient:
            np.testing.assert_allclose(fleet.predict(x, batch_size=96), load_y(folder, "mlp")["output_0"], rtol=1e-5, atol=1e-6)
            assert fleet.restarts == 1
        else:
            with pytest.raises(kerasfleet.WorkerError, match=r"compiling the model for inputs .*killed by SIGKILL"):
                fleet.predict(x, batch_size=96)
    assert_clean()


def test_a_full_dev_shm_falls_back_to_file_backed_buffers(monkeypatch, folder):
    import kerasfleet.runtime.buffers as buffers

    monkeypatch.setattr(buffers, "shm_free_bytes", lambda: 0)  # the machine fact: no room in /dev/shm
    x = load_x(folder, "mlp")
    before = {f for f in os.listdir("/dev/shm") if f.startswith("kerasfleet")}
    with kerasfleet.Fleet(folder / "mlp.keras", workers=2, batch_size=128, backend=BACKEND, engine="keras") as fleet:
        got = fleet.predict(np.concatenate([x] * 30))  # 90k rows: the chunked, buffered path
        assert {f for f in os.listdir("/dev/shm") if f.startswith("kerasfleet")} == before
        folders = list(Path(fleet._buffers._temp_folder()).iterdir())
        assert folders and all(p.name.endswith(".buf") for p in folders)
    np.testing.assert_allclose(got, np.concatenate([load_y(folder, "mlp")["output_0"]] * 30), rtol=1e-5, atol=1e-6)
    assert_clean()


def test_a_half_built_job_releases_its_segments(folder, tmp_path):
    # A compressed .npz whose second member is truncated: the first member is already in shared
    # memory when the second fails to decompress.
    x = load_x(folder, "multi_input")
    path = tmp_path / "broken.npz"
    np.savez_compressed(path, **x)
    with zipfile.ZipFile(path) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data[: len(data) // 2] if name == "image.npy" else data)
    with kerasfleet.Fleet(folder / "multi_input.keras", workers=1, backend=BACKEND, engine="keras") as fleet:
        fleet.wait_ready(120)
        before = {f for f in os.listdir("/dev/shm") if f.startswith("kerasfleet")}
        with pytest.raises(kerasfleet.InputError, match="truncated"):
            fleet.predict(str(path))
        assert {f for f in os.listdir("/dev/shm") if f.startswith("kerasfleet")} == before
    assert_clean()


def test_jax_predictor_on_an_in_memory_model_sees_later_training():
    import keras

    keras.utils.set_random_seed(1)
    inp = keras.Input((5,), name="x")
    model = keras.Model(inp, keras.layers.Dense(3)(inp))
    model.compile("sgd", "mse")
    x = np.random.default_rng(0).normal(size=(16, 5)).astype("float32")
    predictor = kerasfleet.Predictor(model, engine="keras", max_batch_size=16)
    np.testing.assert_allclose(predictor.predict(x), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    model.fit(x, np.ones((16, 3), "float32"), epochs=3, verbose=0)
    after = model.predict(x, verbose=0)
    np.testing.assert_allclose(predictor.predict(x), after, rtol=1e-5, atol=1e-6)
    assert predictor.stats()["retraces"] == 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_outputs_come_back_as_real_floats(tmp_path, dtype):
    import keras

    inp = keras.Input((6,), name="x")
    model = keras.Model(inp, keras.layers.Dense(4, dtype=dtype)(inp))
    path = tmp_path / f"{dtype}.keras"
    model.save(path)
    x = np.random.default_rng(0).normal(size=(300, 6)).astype("float32")
    expected = np.asarray(model.predict(x, verbose=0)).astype("float32")
    for got in (
        kerasfleet.predict(path, x, workers=1, engine="keras", backend=BACKEND),
        kerasfleet.Predictor(path, engine="keras", max_batch_size=8).predict(x),
    ):
        assert got.dtype.kind == "f" and got.dtype.itemsize >= 2 and got.dtype.name in ("float16", "float32")
        np.testing.assert_allclose(got.astype("float32"), expected, rtol=1e-2, atol=1e-2)


def test_the_trial_measures_cpu_workers(folder, monkeypatch, tmp_path):
    from kerasfleet.engines.model_file import resolve_model
    from kerasfleet.tune import tune

    monkeypatch.setenv("KERASFLEET_CACHE_DIR", str(tmp_path))
    asked = []

    def recording_fleet(*args, **kwargs):
        asked.append(kwargs)
        return kerasfleet.Fleet(*args, **kwargs)

    tune(resolve_model(folder / "mlp.keras"), backend=BACKEND, seconds=0.5, fleet_factory=recording_fleet)
    assert asked and all(kw["devices"] == "cpu" for kw in asked)  # also on a GPU machine


# -- the package's shape --------------------------------------------------------------------
LAYERS = {
    "runtime": 0,
    "engines": 1,
    "cluster": 1,
    "tune": 2,
    "prediction": 3,
    "serving": 4,
    "evaluation": 4,
    "sweeps": 4,
    "training": 4,
    "cli": 5,
}


def _imports():
    """(module, imported module, names) for every import of the package from inside it."""
    found = []
    for path in SRC.rglob("*.py"):
        module = ".".join(("kerasfleet", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("kerasfleet"):
                    found.append((module, target, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                found.extend((module, a.name, []) for a in node.names if a.name.startswith("kerasfleet"))
    return found


def test_no_import_cycle_and_layers_import_only_downwards():
    graph = {}
    for module, target, names in _imports():
        graph.setdefault(module, set()).add(target)
        for name in names:  # "from .engines import export" imports a module
            graph[module].add(f"{target}.{name}")
    modules = {m for m in graph} | {t for ts in graph.values() for t in ts}

    def layer(name):
        parts = name.split(".")
        return LAYERS.get(parts[1]) if len(parts) > 1 else None

    for module, targets in graph.items():
        for target in targets:
            if layer(module) is not None and layer(target) is not None:
                assert layer(target) <= layer(module), f"{module} imports {target}, a layer above it"
    # Cycles between modules (a package's __init__ re-exporting its own modules is not a cycle).
    edges = {
        m: {t for t in ts if t in modules and not m.startswith(t + ".") and not t.startswith(m + ".")} for m, ts in graph.items()
    }
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in edges.get(node, ()):
            if state.get(nxt) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(stack + [node, nxt])}")
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for node in edges:
        if node not in state:
            visit(node, [])


def test_no_private_name_is_imported_from_another_module():
    private = [(m, t, n) for m, t, names in _imports() for n in names if n.startswith("_") and n != "__version__"]
    assert private == []


def test_import_kerasfleet_starts_no_framework():
    code = "import sys, kerasfleet; kerasfleet.Fleet; kerasfleet.predict; kerasfleet.evaluate; kerasfleet.sweep; print(sorted(m for m in ('keras', 'jax', 'tensorflow', 'torch', 'onnxruntime', 'uvicorn', 'starlette', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=HERE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_closing_a_fleet_under_running_calls_fails_them_cleanly(folder):
    import threading

    x = np.concatenate([load_x(folder, "mlp")] * 100)  # 300k rows: calls long enough to be cut
    outcomes = []
    fleet = kerasfleet.Fleet(folder / "mlp.keras", workers=2, batch_size=64, backend=BACKEND, engine="keras")
    fleet.wait_ready(120)

    def caller():
        for _ in range(20):
            try:
                fleet.predict(x)
                outcomes.append("done")
            except kerasfleet.FleetClosedError:
                outcomes.append("closed")
                return

    threads = [threading.Thread(target=caller) for _ in range(3)]
    for t in threads:
        t.start()
    import time

    time.sleep(1.0)
    fleet.close()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert outcomes.count("closed") == 3  # every caller was told, none hung or saw another error
    assert_clean()
