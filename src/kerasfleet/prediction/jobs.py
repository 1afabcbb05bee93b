"""One call's worth of work: its buffers, its chunks, and the result in `model.predict`'s shape.

A job owns the shared-memory segments of its inputs and outputs (through one `SharedBuffers`),
splits its rows into chunks of whole batches, and builds the result once every chunk is done.
A job that fails half-built releases what it created: nothing is left in /dev/shm.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..engines import Key, Outputs
from ..engines.handler import JobSpec, RowsHook
from ..errors import InputError
from ..runtime import BufferSpec, SharedBuffers
from ..runtime.buffers import Segment
from .inputs import Source

# Rows per chunk = batch size x at most this many batches: a chunk is the unit that is requeued
# after a crash and the grain of load balancing, so it must stay small next to a worker's share,
# yet large enough that the two pipe messages it costs are noise.
MAX_BATCHES_PER_CHUNK = 8
CHUNKS_PER_WORKER = 4


def source_rows(sources: Sequence[Source]) -> tuple[tuple[tuple[int, ...], str], ...]:
    """((per-row shape, dtype str), ...): the rows part of an engine key."""
    return tuple((tuple(s.shape[1:]), s.dtype.str) for s in sources)


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


def out_paths(out: Any, outputs: Outputs) -> list[str]:
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


def open_out_files(out: Any, outputs: Outputs, rows: int) -> tuple[list[str], list[np.ndarray[Any, Any]]]:
    """Create the `out=` .npy files (memory-mapped) for `rows` rows of every output."""
    paths = out_paths(out, outputs)
    arrays: list[np.ndarray[Any, Any]] = [
        np.lib.format.open_memmap(p, mode="w+", dtype=np.dtype(o.dtype), shape=(rows, *o.shape))
        for p, o in zip(paths, outputs.specs)
    ]
    return paths, arrays


def load_sources(sources: Sequence[Source]) -> list[np.ndarray[Any, Any]]:
    """Arrays for every source, in this process: memory-mapped files stay mapped, not read."""
    from ..runtime import OpenBuffer

    arrays = []
    for s in sources:
        if s.array is not None:
            arrays.append(s.array)
        elif s.file is not None:
            arrays.append(OpenBuffer(s.file).array)
        else:
            assert s.npz_member is not None
            with np.load(s.npz_member[0]) as archive:
                arrays.append(archive[s.npz_member[1][:-4]])
    return arrays


def chunk_bounds(rows: int, batch: int, workers: int, max_batches: int = MAX_BATCHES_PER_CHUNK) -> list[tuple[int, int]]:
    """[lo, hi) of each chunk: whole batches, at most `max_batches`, about CHUNKS_PER_WORKER per worker."""
    per_chunk = batch * max(1, min(max_batches, -(-rows // (batch * workers * CHUNKS_PER_WORKER))))
    return [(lo, min(lo + per_chunk, rows)) for lo in range(0, rows, per_chunk)]


class Job:
    def __init__(
        self,
        key: Key,
        sources: Sequence[Source],
        workers: int,
        buffers: SharedBuffers,
        outputs: Outputs,
        out: Any,
        after: RowsHook | None = None,
    ) -> None:
        self.key = key
        self.rows = sources[0].rows
        self.outputs = outputs
        self.buffers = buffers
        self._segments: list[Segment] = []
        self._out_arrays: list[np.ndarray[Any, Any]] = []
        self._out_paths: list[str] | None = None
        self.done = 0  # chunks finished
        self.chunks = chunk_bounds(self.rows, key[0], workers)
        # In-memory inputs are copied into shared memory a chunk at a time, just before each
        # chunk is submitted, so warm workers start on the first chunk while the caller copies
        # the next ones.
        self._copies: list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = []
        try:
            inputs = tuple(self._input(s) for s in sources)
            self.spec = JobSpec(key, inputs, self._outputs(out), after)
        except BaseException:
            self.release()  # a half-built job must not leave segments behind
            raise

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

    def _outputs(self, out: Any) -> tuple[BufferSpec, ...]:
        specs: list[BufferSpec] = []
        if out is None:
            for o in self.outputs.specs:
                array, spec = self._create((self.rows, *o.shape), o.dtype)
                self._out_arrays.append(array)
                specs.append(spec)
        else:
            self._out_paths, arrays = open_out_files(out, self.outputs, self.rows)
            for path, array in zip(self._out_paths, arrays):
                specs.append(BufferSpec("file", path, int(array.offset), array.dtype.str, tuple(array.shape), True))  # type: ignore[attr-defined]
            del arrays  # the parent never touches the rows: results larger than RAM stay on disk
        return tuple(specs)

    def _create(self, shape: tuple[int, ...], dtype: Any) -> tuple[np.ndarray[Any, Any], BufferSpec]:
        array, spec, segment = self.buffers.create(shape, dtype)
        self._segments.append(segment)
        return array, spec

    def copy(self, chunk: int) -> None:
        """Copy the chunk's input rows into shared memory (converting dtype on the way)."""
        lo, hi = self.chunks[chunk]
        for dst, src in self._copies:
            # Slice by slice, so converting a large float64 input never holds a second full copy.
            np.copyto(dst[lo:hi], src[lo:hi], casting="unsafe")
        if chunk == len(self.chunks) - 1:
            self._copies = []  # drop the references to the caller's arrays and our views

    @property
    def finished(self) -> bool:
        return self.done == len(self.chunks)

    def result(self) -> Any:
        """The outputs shaped as `model.predict` returns them; releases the shared memory."""
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
        if not segments:
            return
        if self.finished:
            self.buffers.recycle(segments)
        else:
            self.buffers.discard(segments)  # a worker may still be writing into them


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
