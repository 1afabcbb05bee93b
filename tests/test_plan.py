"""The plan is pure logic over machine facts, tested here with the facts passed in."""

import math
import os
import warnings

import pytest

from kerasfleet import InputError, make_plan
from kerasfleet.engines import default_batch_size
from kerasfleet.runtime import WorkerSlot, worker_environment
from kerasfleet.runtime.machine import cgroup_cpu_limit, usable_cpus
from kerasfleet.tune.trial import trial_rows

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
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default is capped silently: nobody asked for more
        assert make_plan(cpus=range(16), gpus=(), memory=4 * GIB).workers == 3


def test_explicit_worker_count_beyond_memory_warns():
    with pytest.warns(RuntimeWarning, match=r"more than three quarters.*At most 3 fit"):
        plan = make_plan(workers=8, cpus=range(8), gpus=(), memory=4 * GIB)
    assert plan.workers == 8  # an explicit count is the user's call: warned, not cut
    with pytest.warns(RuntimeWarning, match="At most 3 fit"):
        make_plan(threads_per_worker=1, cpus=range(8), gpus=(), memory=4 * GIB)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_plan(workers=3, cpus=range(8), gpus=(), memory=4 * GIB)


def cgroup_v2(root, cpu_max):
    (root / "docker" / "abc").mkdir(parents=True)
    (root / "docker" / "abc" / "cpu.max").write_text(cpu_max + "\n")
    return "0::/docker/abc\n"


def cgroup_v1(root, quota, period="100000", folder="cpu,cpuacct"):
    leaf = root / folder / "docker" / "abc"
    leaf.mkdir(parents=True)
    (leaf / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (leaf / "cpu.cfs_period_us").write_text(f"{period}\n")
    return "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n"


AFFINITY = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    "cpu_max, limit",
    [("200000 100000", 2.0), ("max 100000", None), ("150000 100000", 1.5), ("100000 100000", 1.0), ("50000 100000", 0.5)],
)
def test_cgroup_v2_cpu_quota(tmp_path, cpu_max, limit):
    proc = cgroup_v2(tmp_path, cpu_max)
    assert cgroup_cpu_limit(tmp_path, proc) == limit
    cpus = usable_cpus(tmp_path, proc)
    # A fraction of a CPU still needs a whole core to run on: the quota rounds up, never to 0.
    expected = AFFINITY if limit is None else min(AFFINITY, max(1, math.ceil(limit)))
    assert len(cpus) == expected and set(cpus) <= os.sched_getaffinity(0)


def test_cgroup_quota_cuts_the_usable_cores(tmp_path):
    assert len(usable_cpus(tmp_path / "a", cgroup_v2(tmp_path / "a", "100000 100000"))) == 1
    assert len(usable_cpus(tmp_path / "b", cgroup_v2(tmp_path / "b", "200000 100000"))) == min(2, AFFINITY)
    # A quota rounds up: 1.5 CPUs of time need two cores to be used at all.
    assert len(usable_cpus(tmp_path / "c", cgroup_v2(tmp_path / "c", "150000 100000"))) == min(2, AFFINITY)


@pytest.mark.parametrize("folder", ["cpu,cpuacct", "cpu"])  # the joint mount, or its `cpu` alias
@pytest.mark.parametrize("quota, limit", [("200000", 2.0), ("100000", 1.0), ("-1", None)])
def test_cgroup_v1_cpu_quota(tmp_path, folder, quota, limit):
    proc = cgroup_v1(tmp_path, quota, folder=folder)
    assert cgroup_cpu_limit(tmp_path, proc) == limit
    expected = AFFINITY if limit is None else min(AFFINITY, int(limit))
    assert len(usable_cpus(tmp_path, proc)) == expected


def test_no_cgroup_files_means_no_limit(tmp_path):
    assert cgroup_cpu_limit(tmp_path, "0::/\n") is None
    assert cgroup_cpu_limit(tmp_path, "") is None
    assert usable_cpus(tmp_path, "0::/docker/abc\n") == tuple(sorted(os.sched_getaffinity(0)))


def test_worker_environment_orders_gpus_as_nvidia_smi_does():
    cpu = WorkerSlot(0, (0,), 1, None)
    gpu = WorkerSlot(1, (1,), 1, "1")
    for slot in (cpu, gpu):
        assert worker_environment(slot, "jax")["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_trial_rows_give_every_worker_four_chunks():
    row = 12 * 1024
    rows = trial_rows(row, [256, 1024], 64)
    # Before the per-worker term the cap was 2 batches + 64 MB of rows (about 7.5k rows here):
    # 64 workers would have split them into fewer than one 1024-row batch each.
    assert rows >= 64 * 4 * 1024
    assert trial_rows(row, [1024], 1) < rows  # the extra rows are for the workers, not a flat raise


def test_oversubscription_warns():
    with pytest.warns(RuntimeWarning, match="exceeds the 2 usable cores"):
        plan = make_plan(workers=4, cpus=[0, 1], gpus=())
    assert plan.oversubscribed and [s.cpus for s in plan.slots] == [(0,), (1,), (0,), (1,)]


def test_gpu_plan_one_worker_per_gpu_with_cores_split():
    plan = make_plan(cpus=range(16), gpus=("0", "1", "2", "3"))
    assert (plan.device, plan.workers, plan.threads_per_worker) == ("gpu", 4, 4)
    assert [s.gpu for s in plan.slots] == ["0", "1", "2", "3"]
    env = worker_environment(plan.slots[2], "jax")
    assert env["CUDA_VISIBLE_DEVICES"] == "2" and env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true" and env["OMP_NUM_THREADS"] == "4"
    assert "JAX_PLATFORMS" not in env  # a GPU worker finds its GPU


def test_gpu_subset_and_cpu_override(monkeypatch):
    plan = make_plan(devices=[1, 3], cpus=range(8), gpus=("0", "1", "2", "3"))
    assert [s.gpu for s in plan.slots] == ["1", "3"]
    cpu = make_plan(devices="cpu", cpus=range(8), gpus=("0",), memory=64 * GIB)
    assert cpu.device == "cpu" and cpu.workers == 8
    # A CPU worker on a GPU machine must not initialise a GPU, even when the caller's
    # environment names one.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert worker_environment(cpu.slots[0], "tensorflow")["CUDA_VISIBLE_DEVICES"] == ""
    assert worker_environment(cpu.slots[0], "jax")["JAX_PLATFORMS"] == "cpu"


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
