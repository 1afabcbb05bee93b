"""The Open Inference Protocol (KServe V2) over REST, with Triton's binary tensor extension.

    POST /v2/models/{name}/infer
      JSON:    {"inputs": [{"name", "shape", "datatype", "data"}], "outputs": [{"name", "parameters"}]}
      binary:  header `Inference-Header-Content-Length: L`; the first L bytes are that JSON, where
               an input's "parameters": {"binary_data_size": n} says its n bytes follow, in order

Outputs come back as JSON "data" (flat, row-major) unless asked for in binary: per output
("parameters": {"binary_data": true}) or for all ("parameters": {"binary_data_output": true},
what `tritonclient.http` sends when no outputs are named); then the answer carries
`Inference-Header-Content-Length` and the raw little-endian bytes after its JSON header.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from .tensors import BadRequest, ModelView, check_rows, from_json, same_rows

HEADER_LENGTH = "inference-header-content-length"


@dataclass
class InferRequest:
    arrays: list[np.ndarray[Any, Any]]
    outputs: list[tuple[int, bool]]  # (output index, binary)
    request_id: str | None


def parse_json(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"Expected a JSON body. Received: invalid JSON ({exc}).") from None


def parse_infer(body: bytes, header_length: str | None, model: ModelView) -> InferRequest:
    if header_length is not None:
        try:
            split = int(header_length)
        except ValueError:
            split = -1
        if not 0 <= split <= len(body):
            raise BadRequest(
                f"Expected Inference-Header-Content-Length between 0 and the body's {len(body)} bytes. "
                f"Received: {header_length!r}."
            )
        request, binary = parse_json(body[:split]), memoryview(body)[split:]
    else:
        request, binary = parse_json(body), memoryview(b"")
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise BadRequest('Expected a JSON object with an "inputs" list. Received: ' + _kind(request) + ".")
    named: dict[str, np.ndarray[Any, Any]] = {}
    offset = 0
    for item in request["inputs"]:
        if not isinstance(item, dict):
            raise BadRequest(f'Expected each of "inputs" to be an object with name, shape, datatype. Received: {_kind(item)}.')
        tensor = model.input(item.get("name"))
        if tensor.name in named:
            raise BadRequest(f"Expected each input once. Received: {tensor.name!r} twice.")
        shape = item.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise BadRequest(f'Expected "shape" of input {tensor.name!r} as a list of non-negative ints. Received: {shape!r}.')
        datatype = item.get("datatype")
        if datatype != tensor.datatype:
            raise BadRequest(f"Expected datatype {tensor.datatype} for input {tensor.name!r}. Received: {datatype!r}.")
        params = item.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            array = _from_binary(binary, offset, size, tensor.dtype, shape, tensor.name)
            offset += size
            check_rows(array, tensor)
        else:
            if "data" not in item:
                raise BadRequest(f'Expected "data" (or binary_data_size) for input {tensor.name!r}. Received: neither.')
            array = from_json(item["data"], tensor, tuple(shape))
        named[tensor.name] = array
    if offset != len(binary):
        raise BadRequest(
            f"Expected the binary inputs' binary_data_size to add up to the {len(binary)} bytes after the JSON header. "
            f"Received: sizes adding up to {offset}."
        )
    missing = [t.name for t in model.inputs if t.name not in named]
    if missing:
        raise BadRequest(f"Expected inputs {[t.name for t in model.inputs]}. Received: no {missing}.")
    arrays = [named[t.name] for t in model.inputs]
    same_rows(arrays, model.inputs)
    return InferRequest(arrays, _requested_outputs(request, model), _request_id(request))


def _from_binary(
    binary: memoryview, offset: int, size: Any, dtype: np.dtype[Any], shape: list[int], name: str
) -> np.ndarray[Any, Any]:
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BadRequest(f"Expected binary_data_size of input {name!r} as a non-negative int. Received: {size!r}.")
    want = math.prod(shape) * dtype.itemsize
    if size != want:
        raise BadRequest(
            f"Expected binary_data_size {want} for input {name!r} (shape {shape}, {dtype.itemsize} bytes each). Received: {size}."
        )
    if offset + size > len(binary):
        raise BadRequest(
            f"Expected {size} bytes of binary data for input {name!r}. Received: {max(0, len(binary) - offset)} bytes left in the body."
        )
    return np.frombuffer(binary[offset : offset + size], dtype=dtype.newbyteorder("<")).reshape(shape)


def _requested_outputs(request: dict[str, Any], model: ModelView) -> list[tuple[int, bool]]:
    params = request.get("parameters")
    all_binary = params.get("binary_data_output") is True if isinstance(params, dict) else False
    asked = request.get("outputs")
    if asked is None:
        return [(i, all_binary) for i in range(len(model.outputs))]
    if not isinstance(asked, list):
        raise BadRequest(f'Expected "outputs" as a list of objects with a name. Received: {_kind(asked)}.')
    chosen = []
    for item in asked:
        if not isinstance(item, dict):
            raise BadRequest(f'Expected each of "outputs" to be an object with a name. Received: {_kind(item)}.')
        index = model.output_index(item.get("name"))
        p = item.get("parameters") or {}
        if not isinstance(p, dict) or set(p) - {"binary_data"} or not isinstance(p.get("binary_data", False), bool):
            raise BadRequest(
                f'Expected output parameters {{"binary_data": true|false}} only (no classification). Received: {_kind(p)} '
                f"for output {model.outputs[index].name!r}."
            )
        chosen.append((index, p.get("binary_data", all_binary)))
    return chosen


def _request_id(request: dict[str, Any]) -> str | None:
    rid = request.get("id")
    return rid if isinstance(rid, str) else None


def encode_infer(model: ModelView, request: InferRequest, outputs: list[np.ndarray[Any, Any]]) -> tuple[bytes, dict[str, str]]:
    """The answer's body and headers."""
    described: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for index, binary in request.outputs:
        tensor = model.outputs[index]
        array = np.ascontiguousarray(outputs[index], dtype=tensor.dtype)
        item: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(array.shape)}
        if binary:
            blob = array.astype(tensor.dtype.newbyteorder("<"), copy=False).tobytes()
            item["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            item["data"] = array.ravel()
        described.append(item)
    answer: dict[str, Any] = {"model_name": model.name, "model_version": "1", "outputs": described}
    if request.request_id is not None:
        answer["id"] = request.request_id
    header = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {"content-type": "application/json"}
    return b"".join([header, *blobs]), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }


def model_metadata(model: ModelView) -> dict[str, Any]:
    def describe(tensors: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": [-1, *t.shape]} for t in tensors]

    return {
        "name": model.name,
        "versions": ["1"],
        "platform": model.platform,
        "inputs": describe(model.inputs),
        "outputs": describe(model.outputs),
    }


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return f"an object with keys {sorted(value)[:8]}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return f"{type(value).__name__} {str(value)[:40]!r}"
