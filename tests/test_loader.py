"""kerasfleet.Loader and kerasfleet.data_parallel: real datasets, real workers, real fit."""

import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import psutil
import pytest

import kerasfleet
from conftest import HERE
from kerasfleet.training.batches import flatten, pack, slot_bytes, unflatten, unpack

sys.path.insert(0, str(HERE))
import loader_fns  # noqa: E402


def batches_equal(a, b):
    ta, xa = flatten(a)
    tb, xb = flatten(b)
    return ta == tb and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(xa, xb))


def assert_no_trace(loader, pids):
    """The loader's workers are gone and its shared memory unlinked (other fixtures may live on)."""
    assert loader.closed
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"loader workers left behind: {alive}"
    segments = [spec.location for _, spec in loader._ring.slots]
    assert [s for s in segments if os.path.exists(os.path.join("/dev/shm", s)) or os.path.exists(s)] == []


def one_epoch(loader):
    loader.on_epoch_begin()
    got = [loader[k] for k in range(len(loader))]
    loader.on_epoch_end()
    return got


@pytest.fixture(scope="module")
def rows_loader():
    ds = loader_fns.Rows(batches=12)
    with kerasfleet.Loader(ds, workers=2) as loader:
        yield ds, loader


# -- pure logic --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "batch",
    [
        np.arange(6, dtype="float32").reshape(2, 3),
        (np.ones((2, 3), "float32"), np.zeros((2, 1), "int64")),
        ({"a": np.ones((2, 3), "float16"), "b": np.arange(2)}, [np.ones(2, bool)], None),
        (np.array(["a", "b"]), np.ones(2)),  # strings travel pickled
        (np.zeros((0, 4), "float32"), np.float32(3.0)),
    ],
    ids=["array", "tuple", "dict-list-none", "strings", "empty-scalar"],
)
def test_pack_round_trip(batch):
    _, arrays = flatten(batch)
    slot = np.zeros(slot_bytes(arrays) + 64, np.uint8)
    packed = pack(batch, slot)
    back = unpack(packed, slot)
    slot[:] = 255  # the batch was copied out: reusing the slot must not change it
    assert batches_equal(back, batch)
    assert packed.in_slot == all(a.dtype.kind in "biufc" for a in arrays)
    assert batches_equal(unflatten(*flatten(batch)), batch)


def test_pack_too_big_goes_inline():
    batch = (np.ones((4, 4), "float32"),)
    packed = pack(batch, np.zeros(16, np.uint8))
    assert not packed.in_slot and batches_equal(unpack(packed, None), batch)


# -- order -------------------------------------------------------------------------------------
def test_stream_equals_dataset_in_order(rows_loader):
    ds, loader = rows_loader
    for _ in range(2):  # two passes, prefetched across the boundary
        got = one_epoch(loader)
        assert all(batches_equal(g, ds[i]) for i, g in enumerate(got))
    # outside an epoch: random access, the stream untouched
    assert batches_equal(loader[3], ds[3]) and batches_equal(loader[-1], ds[11])
    assert all(batches_equal(g, ds[i]) for i, g in enumerate(one_epoch(loader)))


def test_shuffled_order_is_a_function_of_seed_and_pass():
    ds = loader_fns.Dicts(batches=9)
    with kerasfleet.Loader(ds, shuffle=True, seed=3) as a, kerasfleet.Loader(ds, shuffle=True, seed=3, workers=1) as b:
        orders = [a.batch_order(p) for p in range(2)]
        assert sorted(orders[0]) == list(range(9)) and orders[0] != orders[1]
        assert orders == [b.batch_order(p) for p in range(2)]
        for p in range(2):
            got_a, got_b = one_epoch(a), one_epoch(b)
            assert all(batches_equal(g, ds[i]) for i, g in zip(orders[p], got_a))
            assert all(batches_equal(x, y) for x, y in zip(got_a, got_b))


def test_seed_makes_global_rng_augmentation_repeat():
    ds = loader_fns.Augmented(batches=6)
    with kerasfleet.Loader(ds, seed=11) as a, kerasfleet.Loader(ds, seed=11, workers=1) as b:
        first, second = one_epoch(a), one_epoch(b)
        assert all(batches_equal(x, y) for x, y in zip(first, second))
        assert not batches_equal(first[0], ds[0])  # the noise is there


def test_epoch_hooks_run_here_and_reach_the_workers():
    ds = loader_fns.Reshuffling(batches=6)
    mirror = loader_fns.Reshuffling(batches=6)  # the same dataset, stepped by hand
    with kerasfleet.Loader(ds) as loader:
        for _ in range(3):
            got = one_epoch(loader)
            assert all(batches_equal(g, mirror[i]) for i, g in enumerate(got))
            mirror.on_epoch_end()
        assert ds.epochs == 3


def test_a_factory_dataset_replays_its_epoch_hooks_in_the_workers():
    mirror = loader_fns.Reshuffling(batches=6)
    with kerasfleet.Loader("loader_fns:make_reshuffling", workers=2) as loader:
        for _ in range(3):
            got = one_epoch(loader)
            assert all(batches_equal(g, mirror[i]) for i, g in enumerate(got))
            mirror.on_epoch_end()


def test_batches_bigger_than_the_first_still_come_through_shared_memory():
    ds = loader_fns.Growing(batches=5)
    with kerasfleet.Loader(ds, shuffle=True, seed=1, workers=1) as loader:
        order = loader.batch_order(0)
        got = one_epoch(loader)
        assert all(batches_equal(g, ds[i]) for i, g in zip(order, got))
        biggest = max(slot_bytes(flatten(ds[i])[1]) for i in range(5))
        assert loader._ring.size >= biggest  # grown past the first batch collected


def test_factory_and_plain_objects():
    with kerasfleet.Loader("loader_fns:make_rows") as loader:
        assert len(loader) == 6
        assert all(batches_equal(g, loader_fns.Rows()[i]) for i, g in enumerate(one_epoch(loader)))
    plain = loader_fns.Plain()
    with kerasfleet.Loader(plain, workers=1) as loader:
        assert all(batches_equal(g, plain[i]) for i, g in enumerate(one_epoch(loader)))


# -- fit ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["jax", "tensorflow", "torch"])
def test_fit_and_data_parallel_equal_plain_keras(backend, tmp_path):
    """Loader: the same weights as fit on the dataset itself, on every backend (tuple and dict
    batches, validation_data). data_parallel on 2 CPU devices: the weights of one device."""
    out = tmp_path / "results.json"
    env = {**os.environ, "KERAS_BACKEND": backend}
    run = subprocess.run(
        [sys.executable, str(HERE / "train_cases.py"), str(out)], env=env, capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    for case in ("tuple", "dict"):
        assert results[case]["max_rel"] == 0.0, results[case]  # the same batches, in the same order
        keras_val, fleet_val = results[case]["val_loss"]
        np.testing.assert_allclose(fleet_val, keras_val, rtol=1e-6)
    if backend == "torch":
        assert "Keras has no distribution support on torch" in results["torch_refused"]
        return
    assert results["devices"] == ["cpu:0", "cpu:1"]
    assert results["data_parallel"]["max_rel"] < 1e-4, results["data_parallel"]
    assert results["data_parallel"]["strategy"] == ("CheckedDataParallel" if backend == "jax" else "MirroredStrategy")
    assert "Expected cpu_devices=3 to be set before" in results["too_late"]
    if backend == "jax":
        assert "Expected every global batch to divide evenly over the 2 devices. Received: a batch of 3 rows" in results["uneven"]


def _model():
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.05), "mse")
    return model


class _KillWorker(keras.callbacks.Callback):
    def __init__(self, loader, at_batch):
        super().__init__()
        self.loader, self.at_batch, self.killed = loader, at_batch, None

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.at_batch and self.killed is None:
            self.killed = self.loader.workers_info[0]["pid"]
            os.kill(self.killed, signal.SIGKILL)


def test_sigkill_mid_epoch_gives_the_same_training():
    ds = loader_fns.Rows(batches=16, delay_s=0.02)
    expected = _model()
    expected.fit(ds, epochs=2, shuffle=False, verbose=0)
    model = _model()
    with kerasfleet.Loader(ds, workers=2) as loader:
        killer = _KillWorker(loader, at_batch=5)
        model.fit(loader, epochs=2, verbose=0, callbacks=[killer])
        assert killer.killed is not None and loader.restarts >= 1
        pids = [w["pid"] for w in loader.workers_info]
        assert killer.killed not in pids and loader._ring.sized
    for got, want in zip(model.get_weights(), expected.get_weights()):
        np.testing.assert_array_equal(got, want)
    assert_no_trace(loader, pids)


def test_exception_names_the_batch_and_nothing_is_left():
    model = _model()
    with pytest.raises(kerasfleet.WorkerError, match=r"dataset\[5\].*bad record in batch 5") as info:
        with kerasfleet.Loader(loader_fns.Failing(batches=8)).wait_ready(60) as loader:
            pids = [w["pid"] for w in loader.workers_info]
            model.fit(loader, epochs=1, verbose=0)
    # the worker's traceback, in the message: Keras re-raises inside fit without the cause
    assert "loader_fns.py" in str(info.value) and 'raise ValueError("bad record in batch 5")' in str(info.value)
    assert_no_trace(loader, pids)


def test_unreferenced_loader_closes_itself():
    import gc
    import weakref

    model = _model()
    loader = kerasfleet.Loader(loader_fns.Rows(batches=4)).wait_ready(60)
    ref, pids = weakref.ref(loader), [w["pid"] for w in loader.workers_info]
    model.fit(loader, epochs=1, verbose=0)
    del loader
    gc.collect()
    assert ref() is None  # fit kept no reference: the Loader closed itself
    assert [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE] == []


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((object(),), {}, "Expected dataset to be a keras.utils.PyDataset or an object with __len__ and __getitem__"),
        ((loader_fns.Rows(batches=0),), {}, r"at least one batch. Received: len\(dataset\) == 0"),
        ((loader_fns.Unpicklable(),), {}, "Expected a dataset that pickles .* Received: Unpicklable"),
        (("no_such_module:make",), {}, "Expected an importable factory 'module:function'. Received: 'no_such_module:make'"),
        (("loader_fns",), {}, "Expected a dataset object or an importable factory"),
        ((loader_fns.Rows(),), {"shuffle": "yes"}, "Expected shuffle to be True or False"),
        ((loader_fns.Rows(),), {"seed": -1}, "Expected seed to be a non-negative int or None"),
        ((loader_fns.Rows(),), {"prefetch": 0}, "Expected prefetch to be a positive int or None"),
        ((loader_fns.Rows(),), {"workers": 0}, "Expected workers to be a positive int or None"),
    ],
    ids=["no-protocol", "empty", "unpicklable", "bad-factory", "not-a-factory", "shuffle", "seed", "prefetch", "workers"],
)
def test_bad_input_is_refused_before_workers_start(args, kwargs, message):
    before = psutil.Process().children(recursive=True)
    with pytest.raises(kerasfleet.InputError, match=message):
        kerasfleet.Loader(*args, **kwargs)
    assert psutil.Process().children(recursive=True) == before


def test_closed_loader_and_bad_index(rows_loader):
    _, loader = rows_loader
    with pytest.raises(IndexError, match=r"Expected a batch index in \[0, 12\)"):
        loader[12]
    closed = kerasfleet.Loader(loader_fns.Rows(batches=2), workers=1)
    closed.close()
    with pytest.raises(kerasfleet.InputError, match="Expected an open Loader"):
        closed[0]


def test_data_parallel_on_one_device_sets_nothing():
    import keras.distribution

    assert kerasfleet.devices() == ["cpu:0"]  # this process's JAX: one CPU device
    with kerasfleet.data_parallel() as strategy:
        assert strategy is None and keras.distribution.distribution() is None
        model = _model()
        model.fit(np.ones((8, 6), "float32"), np.ones((8, 1), "float32"), epochs=1, verbose=0)


def test_data_parallel_refuses_bad_devices():
    with pytest.raises(kerasfleet.InputError, match="Expected devices among"):
        with kerasfleet.data_parallel(devices=["gpu:7"]):
            pass
    with pytest.raises(kerasfleet.InputError, match="Expected devices='auto' or a list"):
        with kerasfleet.data_parallel(devices="all"):
            pass
    with pytest.raises(kerasfleet.InputError, match="Expected cpu_devices to be a positive int"):
        kerasfleet.devices(cpu_devices=0)
