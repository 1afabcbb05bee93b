"""Arrays shared between the caller and the workers, described by small picklable specs.

Only a `BufferSpec` (a name or path, an offset, dtype and shape) ever crosses a pipe; the rows
themselves sit in a POSIX shared-memory segment or in a file both sides memory-map.
`SharedBuffers` is the one owner of the segments the caller creates: it unlinks every one of
them in `release()`, which callers run in `finally` so nothing is left in /dev/shm.

/dev/shm is a tmpfs that may be small (Docker's default is 64 MB) or full, and a write to a
shared-memory page the tmpfs cannot back kills the writer with SIGBUS. So a segment is only
made where the free space allows it with a margin, and its pages are reserved when it is
created; otherwise the buffer is a file in a temporary folder, mapped the same way (the page
cache makes it nearly as fast, and the disk backs it).
"""

from __future__ import annotations

import itertools
import mmap
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import resource_tracker
from typing import Any

import numpy as np

SHM_PREFIX = "kerasfleet"
SHM_DIR = "/dev/shm"
# Room left free in /dev/shm for everyone else: a segment that would leave less goes to a file.
SHM_MARGIN = 32 << 20
# Bytes of finished calls' segments a warm fleet keeps for reuse: enough for the calls of a
# typical stream, never gigabytes of RAM held by one past call.
KEEP_BYTES = 512 << 20
_counter = itertools.count()


@dataclass(frozen=True)
class BufferSpec:
    kind: str  # "shm" (a segment under /dev/shm) or "file"
    location: str  # segment name or file path
    offset: int
    dtype: str
    shape: tuple[int, ...]
    writable: bool

    @property
    def rows(self) -> int:
        return self.shape[0]


class OpenBuffer:
    """A worker's (or the caller's) view of a `BufferSpec`.

    Segments are mapped through their /dev/shm path rather than `SharedMemory(name=...)`,
    which would register them with a resource tracker that unlinks them when the worker exits.
    """

    def __init__(self, spec: BufferSpec) -> None:
        self.spec = spec
        path = os.path.join(SHM_DIR, spec.location) if spec.kind == "shm" else spec.location
        dtype = np.dtype(spec.dtype)
        if int(np.prod(spec.shape, dtype=np.int64)) == 0:
            self.array: np.ndarray[Any, Any] = np.empty(spec.shape, dtype)
        else:
            self.array = np.memmap(path, dtype=dtype, mode="r+" if spec.writable else "r", offset=spec.offset, shape=spec.shape)

    def close(self) -> None:
        self.array = np.empty(0)


class Segment:
    """One block of memory the caller owns: a shared-memory segment or a temporary file.

    Created with `os.open` under /dev/shm and its pages reserved at once with
    `posix_fallocate`: a tmpfs allocates lazily, so a free-space check alone cannot keep a
    later write from hitting SIGBUS when /dev/shm fills (several calls at once, inputs and
    outputs of one job). If the reservation fails, the block is a file in a temporary folder.
    The segment is registered with multiprocessing's resource tracker, which unlinks it should
    the caller die without cleaning up; no descriptor stays open after creation.
    """

    def __init__(self, size: int, shm_free: Callable[[], int], tmpdir: Callable[[], str]) -> None:
        self.size = size
        self._name: str | None = None
        self._path: str | None = None
        if shm_free() >= size + SHM_MARGIN:
            name = f"{SHM_PREFIX}_{os.getpid()}_{next(_counter)}"
            path = os.path.join(SHM_DIR, name)
            try:
                self.buf: Any = _map_new(path, size, reserve=True)
            except OSError:
                pass  # no room after all (ENOSPC), or no /dev/shm: use a file
            else:
                self._name, self.kind, self.location = name, "shm", name
                resource_tracker.register(f"/{name}", "shared_memory")
                return
        fd, self._path = tempfile.mkstemp(prefix=f"{SHM_PREFIX}_", suffix=".buf", dir=tmpdir())
        os.close(fd)
        self.kind, self.location = "file", self._path
        self.buf = _map_new(self._path, size, reserve=False)

    def unlink(self) -> None:
        if self._name is not None:
            try:
                os.unlink(os.path.join(SHM_DIR, self._name))
            except FileNotFoundError:
                pass
            resource_tracker.unregister(f"/{self._name}", "shared_memory")
            self._name = None
        if self._path is not None:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
            self._path = None
        if self.buf is not None:
            try:
                self.buf.close()
            except BufferError:
                pass  # views are alive: the mapping goes when they are collected
            self.buf = None


def _map_new(path: str, size: int, reserve: bool) -> mmap.mmap:
    flags = os.O_RDWR | os.O_CREAT | (os.O_EXCL if reserve else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if reserve:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError:
                os.unlink(path)
                raise
        else:
            os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def shm_free_bytes() -> int:
    """Free bytes in /dev/shm (0 where there is none)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


class SharedBuffers:
    """Creates shared arrays; the one owner of their segments until `release()`. Thread-safe.

    A warm fleet predicts many times: segments of finished calls are kept (at most `keep`) and
    reused by later calls of a similar size, which spares creating, faulting in and zeroing
    fresh pages on every call. Only segments no worker can still write to come back here.
    """

    def __init__(self, keep: int = 0, shm_free: Callable[[], int] | None = None, keep_bytes: int = KEEP_BYTES) -> None:
        self._segments: list[Segment] = []
        self._free: list[Segment] = []
        self._keep = keep
        self._keep_bytes = keep_bytes
        # Looked up at each segment: /dev/shm fills and empties while a fleet lives.
        self._shm_free = shm_free or (lambda: shm_free_bytes())
        self._tmpdir: str | None = None
        self._lock = threading.Lock()

    def _temp_folder(self) -> str:
        if self._tmpdir is None:
            self._tmpdir = tempfile.mkdtemp(prefix="kerasfleet-buffers-")
        return self._tmpdir

    def create(self, shape: tuple[int, ...], dtype: Any) -> tuple[np.ndarray[Any, Any], BufferSpec, Segment]:
        dtype = np.dtype(dtype)
        nbytes = max(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, 1)
        with self._lock:
            seg = next((s for s in self._free if nbytes <= s.size <= 2 * nbytes + 4096), None)
            if seg is not None:
                self._free.remove(seg)
            else:
                seg = Segment(nbytes, self._shm_free, self._temp_folder)
            self._segments.append(seg)
        array: np.ndarray[Any, Any] = np.ndarray(shape, dtype=dtype, buffer=seg.buf)
        return array, BufferSpec(seg.kind, seg.location, 0, dtype.str, tuple(shape), writable=True), seg

    def recycle(self, segments: list[Segment]) -> None:
        """Keep finished segments for reuse (the newest `keep`); unlink the rest."""
        with self._lock:
            # A segment already released (the fleet closed under a running call) is not kept.
            segments = [seg for seg in segments if seg in self._segments]
            for seg in segments:
                self._segments.remove(seg)
                self._free.append(seg)
            drop = self._free[: max(0, len(self._free) - self._keep)]
            del self._free[: len(drop)]
            while self._free and sum(seg.size for seg in self._free) > self._keep_bytes:
                drop.append(self._free.pop(0))  # the oldest first
        for seg in drop:
            seg.unlink()

    def discard(self, segments: list[Segment]) -> None:
        """Unlink segments a worker might still write to (a failed or cancelled call)."""
        with self._lock:
            for seg in segments:
                if seg in self._segments:
                    self._segments.remove(seg)
        for seg in segments:
            seg.unlink()  # unlinking twice is harmless

    def release(self) -> None:
        """Unlink every segment. Arrays handed out must not be used afterwards."""
        with self._lock:
            segments, self._segments, self._free = self._segments + self._free, [], []
            tmpdir, self._tmpdir = self._tmpdir, None
        for seg in segments:
            seg.unlink()
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
