"""How many workers, how many threads and which cores each, which GPU each.

The plan is pure logic over the machine's facts (usable cores, visible GPUs, free memory), so
it is unit-tested on any machine by passing those facts in. Defaults:

- CPU: workers x threads = usable cores, one thread per worker (process parallelism beats
  intra-op threads for the small and medium models people score in bulk), capped so that the
  workers' estimated memory fits in three quarters of what is available.
- GPU: one worker per visible GPU, pinned through CUDA_VISIBLE_DEVICES, no full-memory
  preallocation, the cores split evenly between them for input handling.

Each worker gets a disjoint block of cores (CPU affinity is what JAX honours; TF and the BLAS
libraries get the thread count through their environment variables, set before import).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InputError
from .machine import available_memory, usable_cpus, visible_gpus

# A worker that imported Keras and a backend holds roughly this much before any model; used only
# to cap the default worker count on small-memory machines.
WORKER_MEMORY_ESTIMATE = 1 << 30


@dataclass(frozen=True)
class WorkerSlot:
    index: int
    cpus: tuple[int, ...]
    threads: int
    gpu: str | None  # the CUDA_VISIBLE_DEVICES value, None on a CPU-only plan


@dataclass(frozen=True)
class Plan:
    device: str  # "cpu" or "gpu"
    workers: int
    threads_per_worker: int
    slots: tuple[WorkerSlot, ...]
    usable_cpus: tuple[int, ...]
    gpus: tuple[str, ...]
    oversubscribed: bool

    def describe(self) -> str:
        where = f"{self.device}, GPUs {list(self.gpus)}" if self.device == "gpu" else "cpu"
        return (
            f"{self.workers} worker(s) x {self.threads_per_worker} thread(s) on {len(self.usable_cpus)} usable core(s) ({where})"
            + (" - oversubscribed" if self.oversubscribed else "")
        )


def make_plan(
    workers: int | None = None,
    threads_per_worker: int | None = None,
    *,
    devices: str | Sequence[int] = "auto",
    cpus: Sequence[int] | None = None,
    gpus: Sequence[str] | None = None,
    memory: int | None = None,
) -> Plan:
    """Plan the fleet. `cpus`, `gpus` and `memory` default to this machine's."""
    for label, value in (("workers", workers), ("threads_per_worker", threads_per_worker)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InputError(f"Expected {label} to be a positive int or None. Received: {label}={value!r}.")
    cpu_list = tuple(cpus) if cpus is not None else usable_cpus()
    gpu_list = tuple(gpus) if gpus is not None else visible_gpus()
    memory = memory if memory is not None else available_memory()
    ncpu = len(cpu_list)

    if devices == "auto":
        device, chosen = ("gpu", gpu_list) if gpu_list else ("cpu", ())
    elif devices == "cpu":
        device, chosen = "cpu", ()
    elif devices == "gpu":
        if not gpu_list:
            raise InputError(
                "Expected at least one visible GPU for devices='gpu'. Received: none (nvidia-smi and CUDA_VISIBLE_DEVICES show no GPU)."
            )
        device, chosen = "gpu", gpu_list
    elif isinstance(devices, Sequence) and not isinstance(devices, str) and devices:
        wanted = [str(d) for d in devices]
        unknown = [d for d in wanted if d not in gpu_list]
        if unknown:
            raise InputError(f"Expected GPU ids among the visible {list(gpu_list)}. Received: devices={list(devices)!r}.")
        device, chosen = "gpu", tuple(wanted)
    else:
        raise InputError(f"Expected devices to be 'auto', 'cpu', 'gpu' or a list of GPU ids. Received: devices={devices!r}.")

    if device == "gpu":
        if workers is not None and workers > len(chosen):
            raise InputError(
                f"Expected at most one worker per GPU ({len(chosen)} visible). Received: workers={workers}. "
                "Several processes on one GPU compete for its memory; use devices='cpu' for CPU workers."
            )
        n = workers or len(chosen)
        chosen = chosen[:n]
        t = threads_per_worker or max(1, ncpu // n)
    elif workers is None and threads_per_worker is None:
        t = 1
        n = ncpu
        if memory:
            n = max(1, min(n, int(memory * 0.75) // WORKER_MEMORY_ESTIMATE))
    elif workers is None:
        assert threads_per_worker is not None
        t, n = threads_per_worker, max(1, ncpu // threads_per_worker)
    else:
        n, t = workers, threads_per_worker or max(1, ncpu // workers)
    if device == "cpu" and memory and (workers is not None or threads_per_worker is not None):
        fits = max(1, int(memory * 0.75) // WORKER_MEMORY_ESTIMATE)
        if n > fits:
            # An explicit count is the user's call, but it must not pass silently into swapping
            # or the out-of-memory killer.
            warnings.warn(
                f"{n} workers need about {n * WORKER_MEMORY_ESTIMATE / (1 << 30):.0f} GiB (1 GiB each with a framework loaded), "
                f"more than three quarters of the {memory / (1 << 30):.1f} GiB available; expect swapping or the "
                f"out-of-memory killer. At most {fits} fit; pass workers={fits} or fewer.",
                RuntimeWarning,
                stacklevel=3,
            )

    oversubscribed = n * t > ncpu
    if oversubscribed:
        warnings.warn(
            f"{n} workers x {t} threads = {n * t} exceeds the {ncpu} usable cores; workers will share cores "
            "and run slower than a plan that fits (kerasfleet.make_plan() shows the default).",
            RuntimeWarning,
            stacklevel=3,
        )
    slots = tuple(
        WorkerSlot(
            index=i,
            cpus=tuple(sorted({cpu_list[(i * t + j) % ncpu] for j in range(t)})),
            threads=t,
            gpu=chosen[i] if device == "gpu" else None,
        )
        for i in range(n)
    )
    return Plan(device, n, t, slots, cpu_list, tuple(chosen), oversubscribed)


def worker_environment(slot: WorkerSlot, backend: str) -> dict[str, str]:
    """Environment a worker sets before it imports any framework."""
    t = str(slot.threads)
    env = {
        "KERAS_BACKEND": backend,
        "OMP_NUM_THREADS": t,
        "MKL_NUM_THREADS": t,
        "OPENBLAS_NUM_THREADS": t,
        "TF_NUM_INTRAOP_THREADS": t,
        "TF_NUM_INTEROP_THREADS": "1",
        # Several processes share a GPU host: never let one grab all of a device's memory.
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",
        # GPU ids mean what nvidia-smi shows (CUDA's default order is fastest-first).
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }
    # A CPU worker must not initialise (and hold) a GPU, whatever the caller's environment
    # says: on a GPU machine a CPU plan (the tuning trial's, say) would otherwise load GPU 0.
    env["CUDA_VISIBLE_DEVICES"] = slot.gpu if slot.gpu is not None else ""
    if slot.gpu is None:
        # With no GPU visible, a CUDA-enabled jaxlib prints a traceback per worker while it
        # looks for one (seen on an H200 machine): JAX is told it runs on the CPU.
        env["JAX_PLATFORMS"] = "cpu"
    return env
