import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# In-process Keras (for in-memory model tests) uses JAX; workers get their backend per test.
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Exported ONNX files and tuned plans go to a cache private to this test session.
os.environ["KERASFLEET_CACHE_DIR"] = tempfile.mkdtemp(prefix="kerasfleet-test-cache-")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pytest  # noqa: E402

HERE = Path(__file__).parent
BACKENDS = ["jax", "tensorflow", "torch"]


def leftovers():
    """Worker processes and shared-memory segments that outlived their fleet."""
    kids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                kids.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    shm = [f for f in os.listdir("/dev/shm") if f.startswith("kerasfleet")]
    return kids, shm


def wait_until(condition, timeout, what):
    """Poll `condition` until true; fail with `what` after `timeout` s.

    A supervisor learns of a worker's death in its own thread (the pidfd), so a call made just
    after a kill may finish on another worker before the replacement shows in the snapshot.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"expected {what} within {timeout} s"
        time.sleep(0.05)


def assert_clean():
    kids, shm = leftovers()
    assert kids == [], f"child processes left behind: {kids}"
    assert shm == [], f"/dev/shm segments left behind: {shm}"


@pytest.fixture(autouse=True, scope="module")
def no_leaks_per_module():
    yield
    assert_clean()


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """zoo(backend) -> folder of models saved with that backend, inputs and model.predict outputs."""
    built = {}

    def get(backend):
        if backend not in built:
            out = tmp_path_factory.mktemp(f"zoo_{backend}")
            env = {**os.environ, "KERAS_BACKEND": backend}
            subprocess.run(
                [sys.executable, str(HERE / "zoo.py"), str(out)], env=env, check=True, timeout=300, capture_output=True
            )
            built[backend] = out
        return built[backend]

    return get


def load_x(folder, name):
    arrays = dict(np.load(folder / f"{name}.x.npz"))
    return arrays if len(arrays) > 1 else next(iter(arrays.values()))


def load_y(folder, name):
    return dict(np.load(folder / f"{name}.y.npz"))


def assert_same(got, expected):
    """`got` has model.predict's structure; `expected` is the saved dict of its arrays."""
    if isinstance(got, dict):
        assert sorted(got) == sorted(expected)
        pairs = [(got[k], expected[k]) for k in expected]
    else:
        assert isinstance(got, np.ndarray)
        pairs = [(got, expected["output_0"])]
    for g, e in pairs:
        assert g.shape == e.shape and g.dtype == e.dtype
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
