"""The machine's facts, read without importing any framework.

- usable cores: the CPU affinity mask, further limited by a cgroup CPU quota (v2 `cpu.max`,
  v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`): a container limited to 2 CPUs on a 64-core
  host gets 2, not 64;
- visible GPUs: `CUDA_VISIBLE_DEVICES` if set, else `nvidia-smi -L`;
- available memory: `MemAvailable`, limited by a cgroup memory limit;
- the Keras backend the caller uses.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

CGROUP_ROOT = "/sys/fs/cgroup"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_dirs(root: Path, proc_cgroup: str | None) -> list[tuple[str, Path]]:
    """(version, folder) of this process's cgroups that may hold a CPU or memory limit."""
    found: list[tuple[str, Path]] = []
    for line in (proc_cgroup or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if controllers == "":  # v2 unified hierarchy
            found.append(("v2", root / rel))
            found.append(("v2", root))
        elif "cpu" in controllers.split(",") or "memory" in controllers.split(","):
            # Joint hierarchies are mounted under their full name ("cpu,cpuacct"); the
            # per-controller names beside it are symlinks that not every system creates.
            names = [controllers, *controllers.split(",")] if "," in controllers else [controllers]
            for name in names:
                found.append(("v1", root / name / rel))
                found.append(("v1", root / name))
    if not found:
        found = [("v2", root), ("v1", root / "cpu"), ("v1", root / "cpu,cpuacct"), ("v1", root / "memory")]
    return found


def cgroup_cpu_limit(root: str | Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> float | None:
    """CPUs the cgroup quota allows (e.g. 2.0), or None when there is no quota.

    `proc_cgroup` is the text of /proc/self/cgroup (read when None); `root` the cgroup mount.
    """
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup"))
    limits = []
    for version, folder in _cgroup_dirs(Path(root), proc_cgroup):
        if version == "v2":
            text = _read(folder / "cpu.max")
            if text:
                quota, _, period = text.partition(" ")
                if quota != "max" and period:
                    limits.append(int(quota) / int(period))
        else:
            quota_text, period_text = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
            if quota_text and period_text and int(quota_text) > 0 and int(period_text) > 0:
                limits.append(int(quota_text) / int(period_text))
    return min(limits) if limits else None


def usable_cpus(root: str | Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> tuple[int, ...]:
    """The cores this process may run on: its affinity mask, cut to the cgroup CPU quota."""
    try:
        cpus = tuple(sorted(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        cpus = tuple(range(os.cpu_count() or 1))
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is not None:
        cpus = cpus[: max(1, math.ceil(limit - 1e-9))]
    return cpus


def visible_gpus() -> tuple[str, ...]:
    """GPU ids the workers may use, without importing any framework."""
    declared = os.environ.get("CUDA_VISIBLE_DEVICES")
    if declared is not None:
        ids = [d.strip() for d in declared.split(",") if d.strip()]
        return tuple(d for d in ids if d != "-1" and not d.startswith("-"))
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(str(i) for i, line in enumerate(line for line in out.splitlines() if line.startswith("GPU ")))


def cgroup_memory_limit(root: str | Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> int | None:
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup"))
    limits = []
    for version, folder in _cgroup_dirs(Path(root), proc_cgroup):
        text = _read(folder / ("memory.max" if version == "v2" else "memory.limit_in_bytes"))
        if text and text != "max" and text.isdigit() and int(text) < (1 << 60):
            limits.append(int(text))
    return min(limits) if limits else None


def available_memory() -> int | None:
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    limit = cgroup_memory_limit()
    if limit is not None:
        available = limit if available is None else min(available, limit)
    return available


def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags from /proc/cpuinfo (empty where it cannot be read).

    Reduced precisions need them: bf16 runs fast with AVX512_BF16 or AMX-BF16, fp16 with
    AVX512_FP16 or AMX-FP16; elsewhere they would be emulated, slower than fp32.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def default_backend() -> str:
    """The backend the caller uses: the imported Keras's, else KERAS_BACKEND, else keras.json."""
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "backend"):
        return str(keras.backend.backend())
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    config = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "keras.json"
    try:
        return str(json.loads(config.read_text()).get("backend", "tensorflow"))
    except (OSError, ValueError):
        return "tensorflow"
