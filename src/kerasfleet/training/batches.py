"""A batch (`x`, `(x, y)`, `(x, y, w)`; arrays, dicts, lists) as a small tree plus flat arrays.

A worker writes the arrays of the batch it made into a shared-memory slot the caller owns and
returns only the tree and where each array lies (`Packed`); the caller copies them out and
rebuilds the batch. A batch too big for its slot (or made of objects, not numbers) travels
pickled inside `Packed` instead, so nothing is ever refused for its size.

The copy out is deliberate: Keras may keep a batch alive after the next one is asked for
(JAX's `device_put` on the CPU can alias NumPy memory), so a slot is reused only once its
bytes were copied, never while a view of it is in use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Arrays start at multiples of this many bytes: aligned for every dtype and for SIMD loads.
ALIGN = 64

Tree = tuple[Any, ...]


@dataclass(frozen=True)
class Packed:
    """A batch as it comes back from a worker."""

    tree: Tree
    # Per array: (dtype, shape, offset in the slot); empty when the arrays are `inline`.
    layout: tuple[tuple[str, tuple[int, ...], int], ...]
    inline: tuple[np.ndarray[Any, Any], ...] | None  # the arrays themselves, pickled

    @property
    def in_slot(self) -> bool:
        return self.inline is None


def flatten(batch: Any) -> tuple[Tree, list[np.ndarray[Any, Any]]]:
    """The batch's structure (arrays replaced by their index in the list) and its arrays."""
    arrays: list[np.ndarray[Any, Any]] = []

    def walk(obj: Any) -> Tree:
        if isinstance(obj, np.ndarray):
            arrays.append(obj)
            return ("a", len(arrays) - 1)
        if isinstance(obj, dict):
            return ("d", tuple(obj.keys()), tuple(walk(v) for v in obj.values()))
        if isinstance(obj, tuple):
            return ("t", tuple(walk(v) for v in obj))
        if isinstance(obj, list):
            return ("l", tuple(walk(v) for v in obj))
        if obj is None:
            return ("n",)
        if hasattr(obj, "__array__") and not isinstance(obj, (str, bytes)):
            # A TensorFlow, JAX or torch (CPU) tensor made by the dataset: NumPy is what
            # crosses processes, and what Keras converts from on every backend.
            if hasattr(obj, "detach"):
                obj = obj.detach().cpu()
            arrays.append(np.asarray(obj))
            return ("a", len(arrays) - 1)
        return ("o", obj)  # a Python scalar or anything else: carried in the tree as is

    return walk(batch), arrays


def unflatten(tree: Tree, arrays: list[np.ndarray[Any, Any]]) -> Any:
    kind = tree[0]
    if kind == "a":
        return arrays[tree[1]]
    if kind == "d":
        return {k: unflatten(t, arrays) for k, t in zip(tree[1], tree[2])}
    if kind == "t":
        return tuple(unflatten(t, arrays) for t in tree[1])
    if kind == "l":
        return [unflatten(t, arrays) for t in tree[1]]
    if kind == "n":
        return None
    return tree[1]


def slot_bytes(arrays: list[np.ndarray[Any, Any]]) -> int:
    """Bytes a slot needs for these arrays (each one aligned)."""
    total = 0
    for a in arrays:
        total = _aligned(total) + a.nbytes
    return total


def pack(batch: Any, slot: np.ndarray[Any, Any] | None) -> Packed:
    """Write the batch's arrays into `slot` (uint8) if they fit and are numbers; else inline."""
    tree, arrays = flatten(batch)
    numeric = all(a.dtype.kind in "biufc" for a in arrays)
    if slot is None or not numeric or slot_bytes(arrays) > slot.nbytes:
        return Packed(tree, (), tuple(arrays))
    layout = []
    offset = 0
    for a in arrays:
        offset = _aligned(offset)
        target = slot[offset : offset + a.nbytes].view(a.dtype).reshape(a.shape)
        np.copyto(target, a, casting="no")
        layout.append((a.dtype.str, tuple(a.shape), offset))
        offset += a.nbytes
    return Packed(tree, tuple(layout), None)


def unpack(packed: Packed, slot: np.ndarray[Any, Any] | None) -> Any:
    """The batch, with arrays copied out of `slot` (the slot is free to reuse afterwards)."""
    if packed.inline is not None:
        return unflatten(packed.tree, list(packed.inline))
    assert slot is not None
    arrays = []
    for dtype, shape, offset in packed.layout:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        arrays.append(slot[offset : offset + count * dt.itemsize].view(dt).reshape(shape).copy())
    return unflatten(packed.tree, arrays)


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN
