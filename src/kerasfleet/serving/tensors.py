"""What both protocols share: a served model's named tensors and the checks on incoming ones.

Every check runs before a request is queued, and says what was expected and what came:
a bad request never reaches a batch, so it cannot disturb other clients' requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..engines import Outputs
from ..engines.model_file import Signature

# KServe V2 / Triton datatype names <-> NumPy dtypes (BYTES, strings, is not a Keras input).
V2_DTYPES = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("uint8"),
    "UINT16": np.dtype("uint16"),
    "UINT32": np.dtype("uint32"),
    "UINT64": np.dtype("uint64"),
    "INT8": np.dtype("int8"),
    "INT16": np.dtype("int16"),
    "INT32": np.dtype("int32"),
    "INT64": np.dtype("int64"),
    "FP16": np.dtype("float16"),
    "FP32": np.dtype("float32"),
    "FP64": np.dtype("float64"),
}
_V2_NAMES = {dtype: name for name, dtype in V2_DTYPES.items()}


class BadRequest(Exception):
    """A request the server refuses; `status` is its HTTP status (400 unless said otherwise)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def v2_datatype(dtype: np.dtype[Any]) -> str:
    return _V2_NAMES.get(np.dtype(dtype).newbyteorder("="), "FP32")


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]  # per row
    dtype: np.dtype[Any]

    @property
    def datatype(self) -> str:
        return v2_datatype(self.dtype)

    def describe(self) -> str:
        return f"{self.name!r} of shape {[-1, *self.shape]} ({self.datatype})"


@dataclass(frozen=True)
class ModelView:
    """A served model as the protocols see it: named inputs and outputs, per-row shapes."""

    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    platform: str

    @classmethod
    def of(cls, name: str, signature: Signature, outputs: Outputs, platform: str) -> ModelView:
        ins = tuple(
            Tensor(spec.name, shape, np.dtype(dtype))
            for spec, (shape, dtype) in zip(signature.inputs or (), signature.row_specs())
        )
        outs = tuple(Tensor(o.name, tuple(o.shape), np.dtype(o.dtype)) for o in outputs.specs)
        return cls(name, ins, outs, platform)

    def input(self, name: Any) -> Tensor:
        for t in self.inputs:
            if t.name == name:
                return t
        raise BadRequest(f"Expected input names {[t.name for t in self.inputs]}. Received: an input named {name!r}.")

    def output_index(self, name: Any) -> int:
        for i, t in enumerate(self.outputs):
            if t.name == name:
                return i
        raise BadRequest(f"Expected output names {[t.name for t in self.outputs]}. Received: an output named {name!r}.")


def from_json(value: Any, tensor: Tensor, shape: tuple[int, ...] | None = None) -> np.ndarray[Any, Any]:
    """A JSON value (nested lists of numbers) -> an array of `tensor`'s dtype, checked.

    With `shape` (KServe V2), `value` may be flat or nested and is reshaped to it; without it
    (TF Serving), `value` is nested rows. Values the dtype cannot hold are refused, never
    wrapped or rounded: 300 for an INT8 input, 2.5 for an integer one, 1e39 for FP32,
    true/false for a number.
    """
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError) as exc:  # ragged nesting
        raise BadRequest(f"Expected input {tensor.describe()} as nested lists of equal lengths. Received: {exc}.") from None
    want = tensor.dtype
    if array.dtype.kind not in "biuf" or (array.size == 0 and shape is None):
        got = "no values" if array.size == 0 else f"values like {str(array.ravel()[:1].tolist())[:40]} ({array.dtype.name})"
        raise BadRequest(f"Expected numbers for input {tensor.describe()}. Received: {got}.")
    if (want.kind == "b") != (array.dtype.kind == "b"):
        got = "true/false values" if array.dtype.kind == "b" else f"{array.dtype.name} values"
        raise BadRequest(
            f"Expected {'true/false' if want.kind == 'b' else 'numeric'} values for input {tensor.describe()}. Received: {got}."
        )
    if want.kind in "iu":
        if array.dtype.kind == "f" and (not np.all(np.isfinite(array)) or not np.all(array == np.round(array))):
            raise BadRequest(f"Expected integers for input {tensor.describe()}. Received: fractional or non-finite values.")
        if array.size:
            info = np.iinfo(want)
            low, high = array.min(), array.max()
            if low < info.min or high > info.max:
                raise BadRequest(
                    f"Expected values in [{info.min}, {info.max}] for input {tensor.describe()}. Received: values in [{low}, {high}]."
                )
    if shape is not None:
        if array.size != math.prod(shape):
            raise BadRequest(
                f"Expected {math.prod(shape)} values for input {tensor.name!r} of shape {list(shape)}. Received: {array.size} values."
            )
        array = array.reshape(shape)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked just below
        converted = array.astype(want, copy=False)
    if want.kind == "f" and array.dtype.kind in "iuf" and array.size:
        if not np.all(np.isfinite(converted)) and np.all(np.isfinite(array.astype(np.float64))):
            raise BadRequest(
                f"Expected values that fit {tensor.datatype} for input {tensor.describe()}. Received: values beyond its range."
            )
    check_rows(converted, tensor)
    return converted


def check_rows(array: np.ndarray[Any, Any], tensor: Tensor) -> None:
    if array.ndim != len(tensor.shape) + 1 or tuple(array.shape[1:]) != tensor.shape or array.shape[0] < 1:
        raise BadRequest(
            f"Expected input {tensor.describe()} (one or more rows of shape {list(tensor.shape)}). "
            f"Received: shape {list(array.shape)}."
        )


def same_rows(arrays: list[np.ndarray[Any, Any]], inputs: tuple[Tensor, ...]) -> int:
    rows = {int(a.shape[0]) for a in arrays}
    if len(rows) != 1:
        got = ", ".join(f"{t.name!r}: {a.shape[0]}" for t, a in zip(inputs, arrays))
        raise BadRequest(f"Expected the same number of rows in every input. Received: {got}.")
    return rows.pop()
