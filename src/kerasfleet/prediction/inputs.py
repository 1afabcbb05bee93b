"""Check `x` against the model's signature and describe where each input's rows live.

One `Source` per model input, in the model's input order. A source is either an array in the
caller's memory (copied once into shared memory) or a file the workers memory-map themselves
(an `np.memmap`, a `.npy`, an uncompressed `.npz` member), so a file larger than RAM is never
read whole. Everything here runs before any worker starts: bad input fails fast and says what
was expected, what was received and how to fix it.
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..engines.model_file import Signature, TensorSpec
from ..errors import InputError
from ..runtime import BufferSpec

_ALLOWED_KINDS = "biuf"


@dataclass
class Source:
    name: str
    dtype: np.dtype[Any]  # what the model takes
    array: np.ndarray[Any, Any] | None  # rows in the caller's memory (or a read-only memmap)
    file: BufferSpec | None = None  # when set, workers map this file instead of shared memory
    npz_member: tuple[str, str] | None = None  # a compressed .npz member: (zip path, member)
    shape: tuple[int, ...] = ()

    @property
    def rows(self) -> int:
        return self.shape[0]


def normalize_inputs(x: Any, signature: Signature) -> list[Source]:
    """Validate `x` and return one `Source` per model input."""
    if isinstance(x, (str, os.PathLike)):
        named = _from_path(Path(x))
        arrays = _match_file_arrays(named, signature, str(x))
    else:
        arrays = _match_structure(x, signature)
    specs = signature.inputs
    sources = []
    for i, (name, src) in enumerate(arrays):
        spec = specs[i] if specs is not None else None
        sources.append(_check_one(name, src, spec))
    rows = {s.rows for s in sources}
    if len(rows) > 1:
        got = ", ".join(f"{s.name!r}: {s.rows}" for s in sources)
        raise InputError(f"Expected every input to have the same number of rows. Received: {got}.")
    return sources


def _match_structure(x: Any, signature: Signature) -> list[tuple[str, Any]]:
    specs = signature.inputs
    names = [s.name for s in specs] if specs is not None else None
    if isinstance(x, Mapping):
        if names is None:
            return [(str(k), v) for k, v in x.items()]
        missing = [n for n in names if n not in x]
        extra = [k for k in x if k not in names]
        if missing or extra:
            raise InputError(
                f"Expected a dict with keys {names} (the model's input names). Received: keys {list(x)}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unknown {extra}" if extra else "")
                + "."
            )
        return [(n, x[n]) for n in names]
    if isinstance(x, (list, tuple)):
        if names is not None and len(x) != len(names):
            raise InputError(
                f"Expected {len(names)} input array(s), one per model input {names}. Received: a {type(x).__name__} of {len(x)}."
            )
        labels = names or [f"input_{i}" for i in range(len(x))]
        return list(zip(labels, x))
    if names is not None and len(names) > 1:
        raise InputError(
            f"Expected a list or dict of {len(names)} arrays for the model's inputs {names}. Received: a single "
            f"{type(x).__name__}. Pass {{{', '.join(repr(n) + ': ...' for n in names)}}}."
        )
    return [(names[0] if names else "input", x)]


def _match_file_arrays(named: dict[str, Any], signature: Signature, where: str) -> list[tuple[str, Any]]:
    specs = signature.inputs
    if specs is None or len(specs) == 1:
        if len(named) != 1 and specs is not None:
            raise InputError(f"Expected one array in {where!r} for the model's single input. Received: {list(named)}.")
        if specs is None:
            return list(named.items())
        return [(specs[0].name, next(iter(named.values())))]
    names = [s.name for s in specs]
    if set(named) == set(names):
        return [(n, named[n]) for n in names]
    positional = [f"arr_{i}" for i in range(len(names))]
    if list(named) == positional:
        return list(zip(names, named.values()))
    raise InputError(
        f"Expected {where!r} to hold arrays named {names} (the model's input names, e.g. np.savez(path, "
        f"{names[0]}=...)). Received: arrays {list(named)}."
    )


def _check_one(name: str, src: Any, spec: TensorSpec | None) -> Source:
    if isinstance(src, Source):
        shape, dtype = src.shape, np.dtype(src.dtype)
    else:
        if not isinstance(src, np.ndarray):
            if hasattr(src, "numpy"):  # a framework tensor
                src = src.numpy()
            elif isinstance(src, (list, tuple)):
                try:
                    src = np.asarray(src)
                except ValueError:
                    src = np.asarray(src, dtype=object)
            else:
                raise InputError(
                    f"Expected input {name!r} to be a NumPy array (or np.memmap, or a .npy/.npz path). "
                    f"Received: {type(src).__name__}."
                )
        shape, dtype = src.shape, src.dtype
    if dtype.kind == "O" or dtype.kind not in _ALLOWED_KINDS:
        hint = " (ragged rows? pad them to one length)" if dtype.kind == "O" else ""
        raise InputError(f"Expected input {name!r} to hold numbers (bool, int, uint or float). Received: dtype {dtype}{hint}.")
    if len(shape) == 0:
        raise InputError(
            f"Expected input {name!r} to have a batch axis (rows first). Received: a scalar of shape (). Pass np.array([value])."
        )
    target = _target_dtype(name, dtype, spec)
    if spec is not None:
        shape = _check_shape(name, tuple(shape), spec)
    if isinstance(src, Source):
        src.name, src.dtype, src.shape = name, target, shape
        if src.file is not None and src.file.shape != shape:
            src.file = BufferSpec(src.file.kind, src.file.location, src.file.offset, src.file.dtype, shape, False)
        return src
    array = src.reshape(shape)
    return Source(name=name, dtype=target, array=array, file=memmap_spec(array), shape=shape)


def _target_dtype(name: str, dtype: np.dtype[Any], spec: TensorSpec | None) -> np.dtype[Any]:
    if spec is None:
        return np.dtype("float32") if dtype.kind == "f" else dtype
    try:
        target = np.dtype(spec.dtype)
    except TypeError:
        return np.dtype("float32")
    if target.kind in "iub" and dtype.kind == "f":
        raise InputError(
            f"Expected integer values for input {name!r} (the model declares {spec.dtype}). Received: dtype {dtype}. "
            f"Cast with x.astype({spec.dtype!r}) if the values are whole numbers."
        )
    return target


def _check_shape(name: str, shape: tuple[int, ...], spec: TensorSpec) -> tuple[int, ...]:
    want = spec.shape
    if len(shape) == len(want) and want == (1,):
        pass
    elif len(shape) == 1 and want == (1,):
        return (shape[0], 1)  # as Keras does: a vector feeds an input of shape (1,)
    ok = len(shape) == len(want) + 1 and all(w is None or w == s for w, s in zip(want, shape[1:]))
    if not ok:
        expected = "(rows, " + ", ".join("?" if d is None else str(d) for d in want) + ")"
        raise InputError(
            f"Expected input {name!r} of shape {expected} (rank {len(want) + 1}). Received: shape {shape}."
            + (" Add the batch axis: x[None]." if shape == tuple(d for d in want) else "")
        )
    return shape


def memmap_spec(array: np.ndarray[Any, Any]) -> BufferSpec | None:
    """The file behind `array` if it is a whole, C-ordered `np.memmap` view the workers can reopen."""
    if not isinstance(array, np.memmap) or array.filename is None or not array.flags.c_contiguous:
        return None
    mm = getattr(array, "_mmap", None)
    if mm is None:
        return None
    # np.memmap maps from an aligned start; a slice keeps filename and offset but not its start.
    base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    if array.ctypes.data - base != array.offset % mmap_granularity():
        return None
    return BufferSpec("file", str(array.filename), int(array.offset), array.dtype.str, tuple(array.shape), False)


def mmap_granularity() -> int:
    import mmap

    return mmap.ALLOCATIONGRANULARITY


def _from_path(path: Path) -> dict[str, Any]:
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise InputError(f"Expected a .npy or .npz file as input. Received: {str(path)!r}.")
    if not path.is_file():
        raise InputError(f"Expected an existing input file. Received: {str(path)!r} (no such file).")
    if suffix == ".npy":
        with open(path, "rb") as f:
            return {"arr_0": _npy_source(f, str(path), str(path))}
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise InputError(f"Expected a .npz file written by np.savez. Received: {str(path)!r}, not a zip file.") from exc
    out: dict[str, Any] = {}
    with zf, open(path, "rb") as raw:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[:-4]
            if info.compress_type == zipfile.ZIP_STORED:
                raw.seek(info.header_offset)
                header = raw.read(30)
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                start = info.header_offset + 30 + name_len + extra_len
                raw.seek(start)
                out[key] = _npy_source(raw, str(path), f"{path}[{key}]")
            else:
                with zf.open(info) as member:
                    src = _npy_source(member, str(path), f"{path}[{key}]")
                src.file, src.npz_member = None, (str(path), info.filename)
                out[key] = src
    if not out:
        raise InputError(f"Expected at least one array in {str(path)!r}. Received: an empty archive.")
    return out


def _npy_source(f: Any, path: str, label: str) -> Source:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except ValueError as exc:
        raise InputError(f"Expected a .npy array in {label!r}. Received: an unreadable header ({exc}).") from exc
    if dtype.hasobject:
        raise InputError(
            f"Expected numbers in {label!r}. Received: dtype {dtype} (object arrays need pickle, which is never loaded)."
        )
    if fortran and len(shape) > 1:
        raise InputError(f"Expected a C-ordered array in {label!r}. Received: Fortran order. Re-save with np.ascontiguousarray.")
    offset = f.tell()  # absolute: the .npy file itself, or the raw .npz positioned at the member
    spec = BufferSpec("file", path, int(offset), dtype.str, tuple(shape), False)
    return Source(name=label, dtype=dtype, array=None, file=spec, shape=tuple(shape))
