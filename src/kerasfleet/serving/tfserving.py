"""TF Serving's REST API: `POST /v1/models/{name}:predict`, `GET /v1/models/{name}`.

    {"instances": [row, row, ...]}      row format: a row is a value, or {input name: value}
    {"inputs": value | {name: value}}   columnar format: whole tensors

answered as {"predictions": [...]} (rows; a row is {output name: value} for several outputs)
or {"outputs": value | {name: value}}, and errors as {"error": "..."}, as TF Serving does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from .kserve import parse_json
from .tensors import BadRequest, ModelView, from_json, same_rows

SIGNATURES = (None, "serving_default")


def parse_predict(body: bytes, model: ModelView) -> tuple[list[np.ndarray[Any, Any]], str]:
    """The input arrays in the model's order, and "row" or "columnar" for the answer."""
    request = parse_json(body)
    if not isinstance(request, dict):
        raise BadRequest('Expected a JSON object with "instances" or "inputs". Received: ' + type(request).__name__ + ".")
    if request.get("signature_name") not in SIGNATURES:
        raise BadRequest(f"Expected signature_name 'serving_default' (or none). Received: {request.get('signature_name')!r}.")
    if ("instances" in request) == ("inputs" in request):
        raise BadRequest(
            'Expected exactly one of "instances" (row format) or "inputs" (columnar format). Received: '
            + ("both." if "inputs" in request else f"keys {sorted(request)}.")
        )
    if "instances" in request:
        arrays = _rows(request["instances"], model)
        fmt = "row"
    else:
        arrays = _columns(request["inputs"], model)
        fmt = "columnar"
    same_rows(arrays, model.inputs)
    return arrays, fmt


def _rows(instances: Any, model: ModelView) -> list[np.ndarray[Any, Any]]:
    if not isinstance(instances, list) or not instances:
        raise BadRequest(f'Expected "instances" as a non-empty list of rows. Received: {_short(instances)}.')
    named = all(isinstance(row, dict) for row in instances)
    if len(model.inputs) > 1 and not named:
        raise BadRequest(
            f"Expected each instance as an object {{input name: value}} for inputs {[t.name for t in model.inputs]}. "
            "Received: instances that are not all objects."
        )
    if not named:
        return [from_json(instances, model.inputs[0])]
    arrays = []
    for tensor in model.inputs:
        try:
            column = [row[tensor.name] for row in instances]
        except KeyError:
            raise BadRequest(
                f"Expected every instance to have input {tensor.name!r}. Received: an instance without it."
            ) from None
        arrays.append(from_json(column, tensor))
    _no_unknown({k for row in instances for k in row}, model)
    return arrays


def _columns(inputs: Any, model: ModelView) -> list[np.ndarray[Any, Any]]:
    if isinstance(inputs, dict):
        _no_unknown(set(inputs), model)
        missing = [t.name for t in model.inputs if t.name not in inputs]
        if missing:
            raise BadRequest(f"Expected inputs {[t.name for t in model.inputs]}. Received: no {missing}.")
        return [from_json(inputs[t.name], t) for t in model.inputs]
    if len(model.inputs) > 1:
        raise BadRequest(
            f'Expected "inputs" as an object {{name: tensor}} for inputs {[t.name for t in model.inputs]}. '
            f"Received: {_short(inputs)}."
        )
    return [from_json(inputs, model.inputs[0])]


def _no_unknown(names: set[str], model: ModelView) -> None:
    unknown = sorted(names - {t.name for t in model.inputs})
    if unknown:
        raise BadRequest(f"Expected input names {[t.name for t in model.inputs]}. Received: unknown {unknown}.")


def encode_predict(model: ModelView, outputs: list[np.ndarray[Any, Any]], fmt: str) -> bytes:
    arrays = [np.ascontiguousarray(a) for a in outputs]
    if fmt == "columnar":
        answer: Any = {"outputs": arrays[0] if len(arrays) == 1 else {t.name: a for t, a in zip(model.outputs, arrays)}}
    elif len(arrays) == 1:
        answer = {"predictions": arrays[0]}
    else:
        rows = arrays[0].shape[0]
        answer = {"predictions": [{t.name: a[i] for t, a in zip(model.outputs, arrays)} for i in range(rows)]}
    return orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)


def model_status(ready: bool) -> dict[str, Any]:
    state = "AVAILABLE" if ready else "LOADING"
    return {"model_version_status": [{"version": "1", "state": state, "status": {"error_code": "OK", "error_message": ""}}]}


def _short(value: Any) -> str:
    text = (
        orjson.dumps(value).decode() if isinstance(value, (list, dict, str, int, float, bool)) or value is None else repr(value)
    )
    return text if len(text) <= 60 else text[:57] + "..."
