"""What `serve` takes: the models (`name=path`) and the server's options, checked before any work.

| option | default | meaning |
| --- | --- | --- |
| `host` | `127.0.0.1` | interface to bind; `0.0.0.0` (all interfaces) warns |
| `port` | `8000` | TCP port; `0` picks a free one (see `Server.url`) |
| `max_batch_size` | `64` | rows per merged batch; buckets 1, 2, 4, ... up to it are warmed before ready |
| `max_delay_ms` | `2.0` | longest a request waits for others to join its batch |
| `max_queue` | `256` | requests waiting per model; past it, 503 with `Retry-After` at once |
| `timeout_s` | `30.0` | per request, from its start; past it, 504 and its rows leave the batch if not yet run |
| `max_body_mb` | `64.0` | request bodies larger than this (also once gzip/deflate-decoded) get 413, before they are read when Content-Length says so |
| `token` | `None` | when set, every route but the health checks needs `Authorization: Bearer <token>` |
| `grace_s` | `30.0` | on SIGTERM/SIGINT or `stop()`: how long in-flight requests may take to finish |
| `engine` | `"auto"` | `auto`, `keras`, `onnx` or `openvino`, as for `predict` |
| `precision` | `"fp32"` | `int8`, `bf16`, `fp16`: used only if the accuracy gate passes on `calibration` rows (cached per model and machine); else the model does not load |
| `calibration` | `None` | rows for the first reduced-precision use: an array, or a `.npy`/`.npz` path |
| `max_top1_disagreement`, `atol` | `0.005`, `None` | the accuracy gate's thresholds |
| `execution` | `"auto"` | `in-process` (one engine in the server), `fleet` (worker processes) or `auto`: measured at start, remembered per model and machine |
| `workers`, `threads_per_worker` | `None` | the fleet's plan, or the in-process engine's threads |
| `backend`, `custom_objects`, `safe_mode` | | as for `predict` |
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
EXECUTIONS = ("auto", "in-process", "fleet")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 64
    max_delay_ms: float = 2.0
    max_queue: int = 256
    timeout_s: float = 30.0
    max_body_mb: float = 64.0
    token: str | None = None
    grace_s: float = 30.0
    engine: str = "auto"
    precision: str = "fp32"
    calibration: Any = None
    max_top1_disagreement: float = 0.005
    atol: float | None = None
    execution: str = "auto"
    workers: int | None = None
    threads_per_worker: int | None = None
    backend: str | None = None
    custom_objects: dict[str, Any] | None = None
    safe_mode: bool = True
    log_level: str = "warning"

    def __post_init__(self) -> None:
        _positive_int("port", self.port, minimum=0)
        if self.port > 65535:
            raise InputError(f"Expected port in [0, 65535]. Received: port={self.port!r}.")
        _positive_int("max_batch_size", self.max_batch_size)
        _positive_int("max_queue", self.max_queue)
        _positive_number("max_delay_ms", self.max_delay_ms, allow_zero=True)
        _positive_number("timeout_s", self.timeout_s)
        _positive_number("max_body_mb", self.max_body_mb)
        _positive_number("grace_s", self.grace_s, allow_zero=True)
        if self.workers is not None:
            _positive_int("workers", self.workers)
        if self.threads_per_worker is not None:
            _positive_int("threads_per_worker", self.threads_per_worker)
        from ..tune import Gate, check_precision

        check_precision(self.precision, self.engine)
        Gate(self.max_top1_disagreement, self.atol)
        if self.execution not in EXECUTIONS:
            raise InputError(f"Expected execution to be one of {list(EXECUTIONS)}. Received: execution={self.execution!r}.")
        if self.token is not None and (not isinstance(self.token, str) or not self.token):
            raise InputError("Expected token to be a non-empty string (or None for no token). Received: an empty token.")
        if not isinstance(self.host, str) or not self.host:
            raise InputError(f"Expected host to be an interface address like '127.0.0.1'. Received: host={self.host!r}.")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a non-negative int" if minimum == 0 else "a positive int"
        raise InputError(f"Expected {name} to be {kind}. Received: {name}={value!r}.")


def _positive_number(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        kind = "a number >= 0" if allow_zero else "a number > 0"
        raise InputError(f"Expected {name} to be {kind}. Received: {name}={value!r}.")


def parse_models(models: Any) -> list[ModelSpec]:
    """`"model.keras"`, `"name=path"`, a list of those, or a dict {name: path} -> ModelSpecs.

    A name defaults to the file's stem; it must be unique and URL-safe (letters, digits, `_.-`).
    """
    if isinstance(models, (str, Path)):
        items: list[tuple[str | None, Any]] = [_split(models)]
    elif isinstance(models, dict):
        items = list(models.items())
    elif isinstance(models, (list, tuple)) and models:
        items = [_split(m) for m in models]
    else:
        raise InputError(
            f"Expected models as a path, 'name=path', a list of those, or a dict {{name: path}}. Received: {models!r}."
        )
    specs: list[ModelSpec] = []
    for name, path in items:
        if not isinstance(path, (str, Path)):
            raise InputError(f"Expected a model file path for {name!r}. Received: {path!r}.")
        path = Path(path).expanduser()
        name = name or path.stem
        if not _NAME.match(name):
            raise InputError(
                f"Expected a model name of letters, digits, '_', '.' or '-' (it is part of the URL). Received: {name!r}. "
                "Name it explicitly: name=path."
            )
        if any(s.name == name for s in specs):
            raise InputError(f"Expected one model per name. Received: {name!r} twice. Name them apart: a={path}, b=...")
        if not path.is_file():
            raise InputError(f"Expected an existing model file for {name!r}. Received: {str(path)!r} (no such file).")
        specs.append(ModelSpec(name, path))
    return specs


def _split(item: Any) -> tuple[str | None, Any]:
    if isinstance(item, str) and "=" in item:
        name, path = item.split("=", 1)
        return name, path
    return None, item
