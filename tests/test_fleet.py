"""A warm fleet shared by the module: repeated calls, streaming, files, memmaps, out=, lifecycle."""

import os

import numpy as np
import pytest

import kerasfleet
from conftest import load_x, load_y
from kerasfleet.prediction.inputs import normalize_inputs

BACKEND = "jax"


@pytest.fixture(scope="module")
def folder(zoo):
    return zoo(BACKEND)


@pytest.fixture(scope="module")
def fleet(folder):
    with kerasfleet.Fleet(folder / "mlp.keras", workers=2, batch_size=128, backend=BACKEND, engine="keras") as f:
        f.wait_ready(timeout=240)
        yield f


@pytest.fixture(scope="module")
def x(folder):
    return load_x(folder, "mlp")


@pytest.fixture(scope="module")
def y(folder):
    return load_y(folder, "mlp")["output_0"]


def test_repeated_calls_reuse_warm_workers(fleet, x, y):
    pids = fleet.pids
    for _ in range(3):
        np.testing.assert_allclose(fleet.predict(x, progress=False), y, rtol=1e-5, atol=1e-6)
    stats = fleet.stats()
    assert fleet.pids == pids and stats["restarts"] == 0
    assert stats["engine"] == "keras" and stats["batch_size"] == 128 and len(stats["workers"]) == 2


def test_single_row_and_other_batch_sizes(fleet, x, y):
    np.testing.assert_allclose(fleet.predict(x[:1]), y[:1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fleet.predict(x, batch_size=1000), y, rtol=1e-5, atol=1e-6)


def test_float64_and_int_inputs_are_cast_like_keras(fleet, folder, x, y):
    import keras

    np.testing.assert_allclose(fleet.predict(x.astype("float64")), y, rtol=1e-5, atol=1e-6)
    # Integers feed a float model as Keras feeds them: converted to float32.
    ints = np.round(x * 3).astype("int32")
    expected = keras.saving.load_model(folder / "mlp.keras").predict(ints, verbose=0)
    got = fleet.predict(ints)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_zero_rows_give_empty_outputs_of_the_right_shape(fleet, folder, x, tmp_path):
    got = fleet.predict(x[:0])
    assert got.shape == (0, 10) and got.dtype == np.float32
    assert fleet.predict(x[:0], out=str(tmp_path / "empty.npy")).shape == (0, 10)
    parts = list(fleet.imap([x[:3], x[:0], x[3:5]]))
    assert [p.shape for p in parts] == [(3, 10), (0, 10), (2, 10)]
    assert kerasfleet.predict(
        folder / "multi_output.keras", load_x(folder, "multi_output")[:0], workers=1, engine="keras", backend=BACKEND
    )["classes"].shape == (0, 5)


def test_sixteen_threads_share_one_warm_fleet(fleet, folder, x):
    """1,000 calls from 16 threads at once, each on its own rows and size: every result is
    model.predict's on that input, and nothing deadlocks (each call has a timeout)."""
    from concurrent.futures import ThreadPoolExecutor

    import keras

    model = keras.saving.load_model(folder / "mlp.keras")
    rng = np.random.default_rng(7)
    big = rng.normal(size=(20_000, 32)).astype("float32")
    expected = model.predict(big, verbose=0, batch_size=4096)
    sizes = rng.integers(1, 2_500, size=1000)
    starts = rng.integers(0, len(big) - 2_500, size=1000)

    def call(i):
        lo, n = int(starts[i]), int(sizes[i])
        return i, fleet.predict(big[lo : lo + n])

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(1000), timeout=240))
    for i, got in results:
        lo, n = int(starts[i]), int(sizes[i])
        np.testing.assert_allclose(got, expected[lo : lo + n], rtol=1e-5, atol=1e-6)
    assert fleet.stats()["restarts"] == 0


def test_imap_streams_in_order(fleet, x, y):
    bounds = [0, 1, 500, 501, 2000, len(x)]
    parts = list(fleet.imap((x[a:b] for a, b in zip(bounds, bounds[1:])), max_inflight=2))
    assert [len(p) for p in parts] == [b - a for a, b in zip(bounds, bounds[1:])]
    np.testing.assert_allclose(np.concatenate(parts), y, rtol=1e-5, atol=1e-6)


def segments():
    return {f for f in os.listdir("/dev/shm") if f.startswith("kerasfleet")}


def test_imap_closed_early_frees_its_buffers(fleet, x):
    before = segments()
    stream = fleet.imap((x[i : i + 100] for i in range(0, 3000, 100)), max_inflight=6)
    next(stream)
    stream.close()
    # Buffers of unfinished batches are unlinked; finished ones are kept for reuse, bounded.
    assert len(segments()) <= len(before) + 2 * 6
    assert len(fleet.predict(x[:10])) == 10  # the fleet is usable again


def test_warm_calls_reuse_shared_memory(fleet, x):
    fleet.predict(x)
    before = segments()
    for _ in range(3):
        fleet.predict(x)
    assert segments() == before


def test_npy_path_is_memory_mapped_not_copied(fleet, tmp_path, x, y):
    path = tmp_path / "x.npy"
    np.save(path, x)
    (source,) = normalize_inputs(str(path), fleet.signature)
    assert source.file is not None and source.array is None  # workers map the file themselves
    np.testing.assert_allclose(fleet.predict(str(path)), y, rtol=1e-5, atol=1e-6)


def test_memmap_input_is_mapped_by_workers(fleet, tmp_path, x, y):
    mm = np.lib.format.open_memmap(tmp_path / "m.npy", mode="w+", dtype="float32", shape=x.shape)
    mm[:] = x
    mm.flush()
    (source,) = normalize_inputs(mm, fleet.signature)
    assert source.file is not None
    np.testing.assert_allclose(fleet.predict(mm), y, rtol=1e-5, atol=1e-6)
    # A strided slice of a memmap cannot be reopened by path: it is copied, still correct.
    (sliced,) = normalize_inputs(mm[1::2], fleet.signature)
    assert sliced.file is None
    np.testing.assert_allclose(fleet.predict(mm[1::2]), y[1::2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_path(fleet, tmp_path, x, y, compressed):
    path = tmp_path / "x.npz"
    (np.savez_compressed if compressed else np.savez)(path, features=x)
    (source,) = normalize_inputs(str(path), fleet.signature)
    assert (source.file is None) == compressed
    np.testing.assert_allclose(fleet.predict(str(path)), y, rtol=1e-5, atol=1e-6)


def test_out_writes_through_a_memmap(fleet, tmp_path, x, y):
    out = tmp_path / "y.npy"
    got = fleet.predict(x, out=str(out))
    assert isinstance(got, np.memmap)
    np.testing.assert_allclose(np.load(out), y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            np.zeros((10, 31), "float32"),
            r"Expected input 'features' of shape \(rows, 32\) \(rank 2\). Received: shape \(10, 31\)",
        ),
        (np.zeros((10, 32, 1), "float32"), r"rank 2"),
        (np.zeros(32, "float32"), r"Add the batch axis"),
        (np.zeros((), "float32"), r"batch axis"),
        (np.array([[1.0] * 32, [1.0] * 31], dtype=object), r"Received: dtype object \(ragged rows"),
        (np.zeros((4, 32), "complex64"), r"Received: dtype complex64"),
        (
            {"feature": np.zeros((2, 32))},
            r"Expected a dict with keys \['features'\].*missing \['features'\]; unknown \['feature'\]",
        ),
        ([np.zeros((2, 32)), np.zeros((2, 32))], r"Expected 1 input array"),
        ("missing.npy", r"Expected an existing input file"),
        ("data.csv", r"Expected a .npy or .npz file"),
        ("not an array", r"Expected a .npy or .npz file"),
        (12, r"Expected input 'features' to be a NumPy array"),
    ],
)
def test_bad_input_is_refused_with_what_was_expected(fleet, bad, message):
    with pytest.raises(kerasfleet.InputError, match=message):
        fleet.predict(bad)


def test_a_folder_of_shards_in_gives_a_folder_of_shards_out(fleet, folder, tmp_path, x, y):
    shards, results = tmp_path / "shards", tmp_path / "preds"
    shards.mkdir()
    bounds = [0, 700, 701, len(x)]  # uneven, one of a single row
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        np.save(shards / f"part-{i:03d}.npy", x[a:b])
    (shards / "README.txt").write_text("not a shard")
    written = fleet.predict(str(shards), out=str(results))
    assert written == [str(results / f"part-{i:03d}.npy") for i in range(3)]
    np.testing.assert_allclose(np.concatenate([np.load(p) for p in written]), y, rtol=1e-5, atol=1e-6)
    # a multi-output model: one subfolder per output, the same one-shot call as for arrays
    x_multi, y_multi = load_x(folder, "multi_output"), load_y(folder, "multi_output")
    np.save(shards / "part-000.npy", x_multi[:50])
    np.save(shards / "part-001.npy", x_multi[50:51])
    np.save(shards / "part-002.npy", x_multi[51:])
    multi = kerasfleet.predict(folder / "multi_output.keras", shards, out=tmp_path / "multi", workers=1, engine="keras")
    for name, want in y_multi.items():
        got = np.concatenate([np.load(tmp_path / "multi" / name / f"part-{i:03d}.npy") for i in range(3)])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert sorted(multi[0]) == sorted(y_multi)
    for out, message in [
        (None, "Expected out= a folder for the results of a folder of shards"),
        (str(tmp_path / "y.npy"), "Expected out= a folder"),
        (str(shards), "Expected out= a folder other than the input folder"),
    ]:
        with pytest.raises(kerasfleet.InputError, match=message):
            fleet.predict(str(shards), out=out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(kerasfleet.InputError, match="Expected a folder of .npy shards"):
        fleet.predict(str(tmp_path / "empty"), out=str(results))
    np.save(shards / "part-003.npy", x[:5, :3])
    with pytest.raises(kerasfleet.InputError, match="Expected every shard's rows to have shape"):
        fleet.predict(str(shards), out=str(results))


def test_bad_arguments(fleet, x):
    with pytest.raises(kerasfleet.InputError, match="batch_size"):
        fleet.predict(x, batch_size=0)
    with pytest.raises(kerasfleet.InputError, match="out to be a .npy path"):
        fleet.predict(x, out="y.csv")


def test_workers_are_pinned_to_their_cores(fleet):
    for worker in fleet.stats()["workers"]:
        for tid in os.listdir(f"/proc/{worker['pid']}/task"):
            assert sorted(os.sched_getaffinity(int(tid))) == worker["cpus"]


def test_worker_environment_has_thread_budget(fleet):
    for pid in fleet.pids:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        assert env[b"OMP_NUM_THREADS"] == b"1" and env[b"TF_NUM_INTRAOP_THREADS"] == b"1"
        assert env[b"CUDA_VISIBLE_DEVICES"] == b"" and env[b"CUDA_DEVICE_ORDER"] == b"PCI_BUS_ID"  # CPU workers hold no GPU


def test_progress_bar_only_when_asked_or_on_a_terminal(fleet, x, capsys):
    fleet.predict(x)  # stderr is not a terminal under pytest: silent by default
    assert "rows" not in capsys.readouterr().err
    fleet.predict(x, progress=True)
    err = capsys.readouterr().err
    assert "kerasfleet" in err and "100%" in err and "rows/s" in err  # rate, and ETA while running


@pytest.mark.parametrize("enabled", [True, False])
def test_jax_workers_share_the_persistent_compilation_cache(folder, x, y, monkeypatch, tmp_path, enabled):
    """Loading a model compiles its initializers, predicting compiles per batch shape: the
    programs go to kerasfleet's cache folder and the next worker reads them back (same numbers)."""
    monkeypatch.setenv("KERASFLEET_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    if not enabled:
        monkeypatch.setenv("JAX_ENABLE_COMPILATION_CACHE", "false")
    programs = []
    for _ in range(2):  # written by the first fleet, read back by the second
        with kerasfleet.Fleet(folder / "mlp.keras", workers=1, batch_size=128, backend=BACKEND, engine="keras") as f:
            np.testing.assert_allclose(f.predict(x, progress=False), y, rtol=1e-5, atol=1e-6)
        programs.append(sorted(p.name for p in tmp_path.glob("jax-compile/*-cache")))
    if enabled:
        assert any(name.startswith("jit__uniform") for name in programs[0]), programs[0]  # the initializers
        assert programs[1] == programs[0]  # the second worker compiled nothing new: it read them back
    else:
        assert programs == [[], []]


def test_compile_cache_environment_leaves_the_users_settings(monkeypatch, tmp_path):
    from kerasfleet.errors import InputError
    from kerasfleet.runtime.compile_cache import check_compile_cache, compile_cache_env

    monkeypatch.setenv("KERASFLEET_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_MAX_SIZE", "12345")
    env = compile_cache_env(True)
    assert env["JAX_COMPILATION_CACHE_DIR"] == str((tmp_path / "jax-compile").resolve())
    assert "JAX_COMPILATION_CACHE_MAX_SIZE" not in env  # the user's bound stays in force
    assert env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_env(True) == {}  # the user's own cache
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    # A cache folder that cannot be made (under a file; chmod would not stop root): no cache by
    # default, an error (before any work) when the folder is named.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("KERASFLEET_CACHE_DIR", str(blocker))
    assert compile_cache_env(True) == {}
    with pytest.raises(InputError, match="Expected compile_cache to be a folder kerasfleet can write to"):
        check_compile_cache(str(blocker / "jax"))
