"""A .npy input larger than 4 GB with out=: the caller's memory stays small.

The input file is sparse (zeros but for a few marked rows), so the test costs little disk and
no time generating data, while every byte is still mapped and read by the workers.
"""

import subprocess
import sys

import numpy as np
import pytest

from conftest import assert_clean

FEATURES = 4096
ROWS = 270_000  # 270,000 x 4096 x 4 bytes = 4.42 GB
MARKED = [0, 1, 123_456, ROWS // 2, ROWS - 1]


@pytest.mark.timeout(600)
def test_npy_over_4gb_with_out_keeps_caller_rss_under_1gb(tmp_path):
    import keras

    inp = keras.Input((FEATURES,), name="wide")
    model = keras.Model(inp, keras.layers.Dense(8)(inp))
    model.save(tmp_path / "wide.keras")

    x_path = tmp_path / "x.npy"
    x = np.lib.format.open_memmap(x_path, mode="w+", dtype="float32", shape=(ROWS, FEATURES))
    rng = np.random.default_rng(0)
    marked = rng.normal(size=(len(MARKED), FEATURES)).astype("float32")
    x[MARKED] = marked
    x.flush()
    del x
    assert x_path.stat().st_size > 4 * 1024**3

    # VmHWM is this process's own peak RSS (ru_maxrss would carry the forking parent's peak
    # across exec on Linux, i.e. pytest's).
    script = (
        "import kerasfleet\n"
        "if __name__ == '__main__':\n"
        f"    y = kerasfleet.predict({str(tmp_path / 'wide.keras')!r}, {str(x_path)!r}, out={str(tmp_path / 'y.npy')!r}, "
        "workers=2, backend='jax', progress=False)\n"
        "    peak = next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM'))\n"
        "    print(type(y).__name__, y.shape, peak)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stderr
    kind, shape, maxrss_kb = (
        result.stdout.split(" (")[0],
        result.stdout.split("(")[1].split(")")[0],
        int(result.stdout.split()[-1]),
    )
    assert kind == "memmap" and shape == f"{ROWS}, 8"
    assert maxrss_kb * 1024 < 1024**3, f"caller peak RSS {maxrss_kb / 1024:.0f} MB"

    y = np.load(tmp_path / "y.npy", mmap_mode="r")
    np.testing.assert_allclose(y[MARKED], model.predict(marked, verbose=0), rtol=1e-5, atol=1e-5)
    zero_row = model.predict(np.zeros((1, FEATURES), "float32"), verbose=0)[0]
    for row in (2, 77_777, ROWS - 2):
        np.testing.assert_allclose(y[row], zero_row, rtol=1e-5, atol=1e-6)
    print(f"caller peak RSS: {maxrss_kb / 1024:.0f} MB")
    assert_clean()
