"""The plan is pure logic over machine facts, tested here with the facts passed in."""

import pytest

from kerasfleet import InputError, make_plan
from kerasfleet.engines import default_batch_size
from kerasfleet.runtime import worker_environment

GIB = 1 << 30


def test_default_cpu_plan_uses_every_core_once():
    plan = make_plan(cpus=range(8), gpus=(), memory=64 * GIB)
    assert (plan.device, plan.workers, plan.threads_per_worker) == ("cpu", 8, 1)
    assert [s.cpus for s in plan.slots] == [(i,) for i in range(8)]
    assert not plan.oversubscribed


def test_threads_per_worker_splits_cores_into_disjoint_blocks():
    plan = make_plan(threads_per_worker=4, cpus=[0, 1, 2, 3, 8, 9, 10, 11], gpus=(), memory=64 * GIB)
    assert plan.workers == 2 and [s.cpus for s in plan.slots] == [(0, 1, 2, 3), (8, 9, 10, 11)]
    plan = make_plan(workers=3, cpus=range(16), gpus=(), memory=64 * GIB)
    assert plan.threads_per_worker == 5
    cores = [c for s in plan.slots for c in s.cpus]
    assert len(cores) == len(set(cores)) == 15


def test_memory_caps_the_default_worker_count():
    assert make_plan(cpus=range(16), gpus=(), memory=4 * GIB).workers == 3


def test_oversubscription_warns():
    with pytest.warns(RuntimeWarning, match="exceeds the 2 usable cores"):
        plan = make_plan(workers=4, cpus=[0, 1], gpus=())
    assert plan.oversubscribed and [s.cpus for s in plan.slots] == [(0,), (1,), (0,), (1,)]


def test_gpu_plan_one_worker_per_gpu_with_cores_split():
    plan = make_plan(cpus=range(16), gpus=("0", "1", "2", "3"))
    assert (plan.device, plan.workers, plan.threads_per_worker) == ("gpu", 4, 4)
    assert [s.gpu for s in plan.slots] == ["0", "1", "2", "3"]
    env = worker_environment(plan.slots[2], "jax", any_gpu=True)
    assert env["CUDA_VISIBLE_DEVICES"] == "2" and env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true" and env["OMP_NUM_THREADS"] == "4"


def test_gpu_subset_and_cpu_override():
    plan = make_plan(devices=[1, 3], cpus=range(8), gpus=("0", "1", "2", "3"))
    assert [s.gpu for s in plan.slots] == ["1", "3"]
    cpu = make_plan(devices="cpu", cpus=range(8), gpus=("0",), memory=64 * GIB)
    assert cpu.device == "cpu" and cpu.workers == 8
    # A CPU worker on a GPU machine must not initialise a GPU.
    assert worker_environment(cpu.slots[0], "tensorflow", any_gpu=True)["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"workers": 0}, "Expected workers to be a positive int"),
        ({"threads_per_worker": 1.5}, "Expected threads_per_worker to be a positive int"),
        ({"devices": "gpu", "gpus": ()}, "Expected at least one visible GPU"),
        ({"devices": [7], "gpus": ("0",)}, r"Expected GPU ids among the visible \['0'\]"),
        ({"workers": 3, "gpus": ("0", "1")}, "Expected at most one worker per GPU"),
        ({"devices": "tpu"}, "Expected devices to be 'auto', 'cpu', 'gpu'"),
    ],
)
def test_bad_plans_are_refused(kwargs, message):
    kwargs.setdefault("cpus", range(4))
    with pytest.raises(InputError, match=message):
        make_plan(**kwargs)


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    from kerasfleet.runtime import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert visible_gpus() == ("2", "5")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == ()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_gpus() == ()


@pytest.mark.parametrize("row_bytes, expected", [(128, 1024), (32 * 32 * 3 * 4, 256), (96 * 96 * 3 * 4, 32), (1 << 24, 16)])
def test_default_batch_size_targets_a_few_megabytes(row_bytes, expected):
    assert default_batch_size(row_bytes) == expected
