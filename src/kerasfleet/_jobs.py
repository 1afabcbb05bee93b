"""One call's worth of work: its buffers, its chunks, what is done and what failed.

A job owns the shared-memory segments of its inputs and outputs (through one
`SharedBuffers`), splits its rows into chunks of whole batches, and builds the result in the
shape `model.predict` returns once every chunk is done.
"""

from __future__ import annotations

import zipfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np

from ._buffers import BufferSpec, SharedBuffers
from ._engine import Key, Outputs
from ._errors import InputError
from ._inputs import Source
from ._worker import JobSpec

# Rows per chunk = batch size x at most this many batches: a chunk is the unit that is requeued
# after a crash and the grain of load balancing, so it must stay small next to a worker's share,
# yet large enough that the two pipe messages it costs are noise.
MAX_BATCHES_PER_CHUNK = 8
CHUNKS_PER_WORKER = 4


def default_batch_size(row_bytes: int, device: str = "cpu", engine: str = "keras") -> int:
    """A batch of about 4 MB of input on CPU (16 MB on GPU), a power of two in [16, 1024 or 4096].

    ONNX Runtime on CPU runs as fast at 16 rows as at 1024 and loses cache locality beyond
    (measured on the small CNN: 11.6k rows/s per thread at 16-64 rows, 9.5k at 1024), so its
    target is 512 KB.
    """
    target, cap = (16 << 20, 4096) if device == "gpu" else (4 << 20, 1024)
    if engine == "onnx" and device == "cpu":
        target = 512 << 10
    rows = max(16, min(cap, target // max(row_bytes, 1)))
    return 1 << (rows.bit_length() - 1)


def source_rows(sources: Sequence[Source]) -> tuple[tuple[tuple[int, ...], str], ...]:
    """((per-row shape, dtype str), ...): the rows part of an engine key."""
    return tuple((tuple(s.shape[1:]), s.dtype.str) for s in sources)


def job_key(sources: Sequence[Source], batch_size: int) -> Key:
    return (batch_size, source_rows(sources))


def check_out(out: Any) -> None:
    """Refuse a bad `out=` before any work starts (its arity is checked once outputs are known)."""
    if out is None:
        return
    paths = list(out.values()) if isinstance(out, Mapping) else list(out) if isinstance(out, (list, tuple)) else [out]
    for p in paths:
        if not isinstance(p, (str, Path)) or Path(p).suffix.lower() != ".npy":
            raise InputError(
                f"Expected out to be a .npy path (or a list/dict of them for a multi-output model). Received: out={out!r}."
            )
        if not Path(p).expanduser().resolve().parent.is_dir():
            raise InputError(f"Expected out's folder to exist. Received: out={str(p)!r}.")


class Job:
    def __init__(self, job_id: int, key: Key, sources: Sequence[Source], workers: int, buffers: SharedBuffers) -> None:
        self.id = job_id
        self.key = key
        self.rows = sources[0].rows
        self.buffers = buffers
        self._segments: list[shared_memory.SharedMemory] = []
        self.error: BaseException | None = None
        self.failures: Counter[int] = Counter()
        self.on_progress: Callable[[int], None] | None = None
        self.outputs: Outputs | None = None
        self._out_arrays: list[np.ndarray[Any, Any]] = []
        self._out_paths: list[str] | None = None
        self.spec: JobSpec | None = None
        batch = key[0]
        per_chunk = batch * max(1, min(MAX_BATCHES_PER_CHUNK, -(-self.rows // (batch * workers * CHUNKS_PER_WORKER))))
        self.chunks = [(lo, min(lo + per_chunk, self.rows)) for lo in range(0, self.rows, per_chunk)]
        self.remaining = set(range(len(self.chunks)))
        # In-memory inputs are copied into shared memory a chunk at a time, ahead of dispatch,
        # so warm workers start on the first chunk while the caller copies the next ones.
        self._copies: list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = []
        self._copied = 0  # chunks whose rows are in shared memory
        self._input_specs = tuple(self._input(s) for s in sources)
        if not self._copies:
            self._copied = len(self.chunks)

    def _input(self, source: Source) -> BufferSpec:
        if source.file is not None:
            return source.file  # the workers map the caller's file; nothing is copied
        array, spec = self._create(source.shape, source.dtype)
        if source.npz_member is not None:
            _stream_npz_member(source.npz_member, array)
        else:
            assert source.array is not None
            self._copies.append((array, source.array))
        return spec

    def _create(self, shape: tuple[int, ...], dtype: Any) -> tuple[np.ndarray[Any, Any], BufferSpec]:
        array, spec, segment = self.buffers.create(shape, dtype)
        self._segments.append(segment)
        return array, spec

    def copy_ahead(self) -> bool:
        """Copy the next chunk's input rows into shared memory; False when all are there."""
        if self._copied >= len(self.chunks):
            return False
        lo, hi = self.chunks[self._copied]
        for dst, src in self._copies:
            # Slice by slice, so converting a large float64 input never holds a second full copy.
            np.copyto(dst[lo:hi], src[lo:hi], casting="unsafe")
        self._copied += 1
        if self._copied == len(self.chunks):
            self._copies = []  # drop the references to the caller's arrays and our views
        return True

    def ready_to_send(self, chunk: int) -> None:
        while self._copied <= chunk:
            self.copy_ahead()

    def attach_outputs(self, outputs: Outputs, out: Any) -> None:
        self.outputs = outputs
        specs: list[BufferSpec] = []
        if out is None:
            for o in outputs.specs:
                array, spec = self._create((self.rows, *o.shape), o.dtype)
                self._out_arrays.append(array)
                specs.append(spec)
        else:
            self._out_paths = _out_paths(out, outputs)
            for path, o in zip(self._out_paths, outputs.specs):
                array = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(o.dtype), shape=(self.rows, *o.shape))
                specs.append(BufferSpec("file", path, int(array.offset), array.dtype.str, tuple(array.shape), True))
                del array  # the parent never touches the rows: results larger than RAM stay on disk
        self.spec = JobSpec(self.key, self._input_specs, tuple(specs))

    @property
    def finished(self) -> bool:
        return self.error is not None or not self.remaining

    def chunk_done(self, chunk: int) -> None:
        if chunk in self.remaining:
            self.remaining.discard(chunk)
            if self.on_progress is not None:
                lo, hi = self.chunks[chunk]
                self.on_progress(hi - lo)

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error

    def result(self) -> Any:
        """The outputs shaped as `model.predict` returns them; releases the shared memory."""
        assert self.outputs is not None
        try:
            if self._out_paths is not None:
                arrays = [np.load(p, mmap_mode="r") for p in self._out_paths]
            else:
                arrays = [np.array(a) for a in self._out_arrays]  # copied out before the unlink
        finally:
            self.release()
        return self.outputs.pack(arrays)

    def release(self) -> None:
        """Give the shared memory back: reused if every chunk is done, else unlinked."""
        self._out_arrays = []
        self._copies = []
        segments, self._segments = self._segments, []
        if self.remaining:
            self.buffers.discard(segments)  # a worker may still be writing into them
        else:
            self.buffers.recycle(segments)


def _out_paths(out: Any, outputs: Outputs) -> list[str]:
    names = [o.name for o in outputs.specs]
    if isinstance(out, Mapping):
        if set(out) != set(names):
            raise InputError(f"Expected out to have keys {names} (the model's outputs). Received: keys {list(out)}.")
        return [str(Path(out[n]).expanduser()) for n in names]
    if isinstance(out, (list, tuple)):
        if len(out) != len(names):
            raise InputError(f"Expected {len(names)} paths in out, one per output {names}. Received: {len(out)}.")
        return [str(Path(p).expanduser()) for p in out]
    if len(names) != 1:
        raise InputError(
            f"Expected a list or dict of .npy paths for the model's {len(names)} outputs {names}. Received: out={out!r}."
        )
    return [str(Path(out).expanduser())]


def _stream_npz_member(member: tuple[str, str], array: np.ndarray[Any, Any]) -> None:
    """Decompress a .npz member straight into `array`, a piece at a time."""
    flat = array.reshape(-1).view(np.uint8)
    with zipfile.ZipFile(member[0]) as zf, zf.open(member[1]) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(f)
        else:
            np.lib.format.read_array_header_2_0(f)
        pos = 0
        while pos < flat.size:
            n = f.readinto(flat[pos : pos + (16 << 20)].data)  # type: ignore[attr-defined]
            if not n:
                raise InputError(f"Expected {flat.size} bytes in {member[0]}[{member[1]}]. Received: {pos} (truncated).")
            pos += n
