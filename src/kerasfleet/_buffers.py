"""Arrays shared between the caller and the workers, described by small picklable specs.

Only a `BufferSpec` (a name or path, an offset, dtype and shape) ever crosses a pipe; the rows
themselves sit in a POSIX shared-memory segment or in a file both sides memory-map.
`SharedBuffers` is the one owner of the segments the caller creates: it unlinks every one of
them in `release()`, which callers run in `finally` so nothing is left in /dev/shm.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np

SHM_PREFIX = "kerasfleet"
_counter = itertools.count()


@dataclass(frozen=True)
class BufferSpec:
    kind: str  # "shm" or "file"
    location: str  # segment name or file path
    offset: int
    dtype: str
    shape: tuple[int, ...]
    writable: bool

    @property
    def rows(self) -> int:
        return self.shape[0]


class OpenBuffer:
    """A worker's (or the caller's) view of a `BufferSpec`."""

    def __init__(self, spec: BufferSpec) -> None:
        self.spec = spec
        self._shm: shared_memory.SharedMemory | None = None
        if spec.kind == "shm":
            self._shm = shared_memory.SharedMemory(name=spec.location)
            self.array: np.ndarray[Any, Any] = np.ndarray(spec.shape, dtype=np.dtype(spec.dtype), buffer=self._shm.buf)
        else:
            self.array = np.memmap(
                spec.location, dtype=np.dtype(spec.dtype), mode="r+" if spec.writable else "r", offset=spec.offset, shape=spec.shape
            )

    def close(self) -> None:
        self.array = np.empty(0)
        if self._shm is not None:
            try:
                self._shm.close()
            except BufferError:
                # A framework still aliases the memory; the mapping goes with the process.
                pass
            self._shm = None


class SharedBuffers:
    """Creates shared-memory arrays; the one owner of their segments until `release()`.

    A warm fleet predicts many times: segments of finished calls are kept (at most `keep`) and
    reused by later calls of a similar size, which spares creating, faulting in and zeroing
    fresh pages on every call. Only segments no worker can still write to come back here.
    """

    def __init__(self, keep: int = 0) -> None:
        self._segments: list[shared_memory.SharedMemory] = []
        self._free: list[shared_memory.SharedMemory] = []
        self._keep = keep

    def create(self, shape: tuple[int, ...], dtype: Any) -> tuple[np.ndarray[Any, Any], BufferSpec, shared_memory.SharedMemory]:
        dtype = np.dtype(dtype)
        nbytes = max(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, 1)
        shm = next((s for s in self._free if nbytes <= s.size <= 2 * nbytes + 4096), None)
        if shm is not None:
            self._free.remove(shm)
        else:
            name = f"{SHM_PREFIX}_{os.getpid()}_{next(_counter)}"
            shm = shared_memory.SharedMemory(name=name, create=True, size=nbytes)
        self._segments.append(shm)
        array: np.ndarray[Any, Any] = np.ndarray(shape, dtype=dtype, buffer=shm.buf)
        return array, BufferSpec("shm", shm.name, 0, dtype.str, tuple(shape), writable=True), shm

    def recycle(self, segments: list[shared_memory.SharedMemory]) -> None:
        """Keep finished segments for reuse (the newest `keep`); unlink the rest."""
        for shm in segments:
            self._segments.remove(shm)
            self._free.append(shm)
        while len(self._free) > self._keep:
            _unlink(self._free.pop(0))

    def discard(self, segments: list[shared_memory.SharedMemory]) -> None:
        """Unlink segments a worker might still write to (a failed or cancelled call)."""
        for shm in segments:
            self._segments.remove(shm)
            _unlink(shm)

    def release(self) -> None:
        """Unlink every segment. Arrays handed out must not be used afterwards."""
        segments, self._segments, self._free = self._segments + self._free, [], []
        for shm in segments:
            _unlink(shm)


def _unlink(shm: shared_memory.SharedMemory) -> None:
    try:
        shm.unlink()
    except FileNotFoundError:
        pass
    try:
        shm.close()
    except BufferError:
        # Views are still alive; the unlinked memory is freed once they are collected.
        pass
