"""The HTTP routes (a Starlette app): KServe V2, TF Serving REST, health, metrics.

    GET  /v2/health/live                  200 while the process serves
    GET  /v2/health/ready                 200 once every model is loaded and warm (503 before, and while draining)
    GET  /v2                              server metadata
    GET  /v2/models/{name}[/versions/1]   model metadata (names, datatypes, shapes with -1 rows)
    GET  /v2/models/{name}/ready          200 when that model is ready
    POST /v2/models/{name}[/versions/1]/infer
    GET  /v1/models/{name}[/versions/1]   TF Serving model status
    POST /v1/models/{name}[/versions/1]:predict
    GET  /metrics                         Prometheus text

Every route but the two health checks needs the bearer token when the server has one. Errors
are JSON {"error": "..."} with 400 (bad input), 401 (token), 404 (unknown model), 413 (body over
the limit, also once decompressed: gzip and deflate bodies are accepted), 415 (another encoding), 503 (loading, draining or a full queue, with Retry-After), 504 (past timeout_s) or
500 (the model failed on the batch: every request of that batch gets it).
"""

from __future__ import annotations

import asyncio
import hmac
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import __version__
from . import kserve, tfserving
from .batcher import Batcher, Clients, Overloaded, ShuttingDown
from .metrics import CONTENT_TYPE, Metrics, ModelMetrics
from .options import ModelSpec, ServeOptions
from .tensors import BadRequest, ModelView

_RETRY_AFTER_S = "1"
_PARSE_INLINE_BYTES = 256 << 10  # larger bodies are parsed in a thread
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}  # what tritonclient may send


@dataclass
class Served:
    """One model on the server: loading until `batcher` is set."""

    spec: ModelSpec
    metrics: ModelMetrics
    view: ModelView | None = None
    batcher: Batcher | None = None
    description: str = ""


@dataclass
class State:
    options: ServeOptions
    models: dict[str, Served]
    metrics: Metrics
    clients: Clients = field(default_factory=Clients)
    draining: bool = False
    on_startup: Callable[[], Awaitable[None]] | None = None
    on_shutdown: Callable[[], Awaitable[None]] | None = None

    @property
    def ready(self) -> bool:
        return not self.draining and all(m.batcher is not None and m.batcher.broken is None for m in self.models.values())


def build_app(state: State) -> Starlette:
    options = state.options
    token = options.token.encode() if options.token else None

    def error(status: int, message: str, **headers: str) -> Response:
        return Response(orjson.dumps({"error": message}), status, headers=headers or None, media_type="application/json")

    def authorized(request: Request) -> bool:
        if token is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)

    def denied() -> Response:
        return error(
            401,
            "Expected an 'Authorization: Bearer <token>' header with the server's token. Received: none, or another token.",
            **{"WWW-Authenticate": "Bearer"},
        )

    def json(value: Any, status: int = 200) -> Response:
        return Response(orjson.dumps(value), status, media_type="application/json")

    def find(request: Request) -> Served | Response:
        name = request.path_params["name"]
        served = state.models.get(name)
        if served is None:
            return error(404, f"Expected one of the served models {sorted(state.models)}. Received: model {name!r}.")
        version = request.path_params.get("version")
        if version not in (None, "1"):
            return error(404, f"Expected model version 1 (the only one served). Received: version {version!r}.")
        return served

    async def read_body(request: Request) -> bytes:
        limit = options.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BadRequest(
                f"Expected a body of at most {options.max_body_mb:g} MB (max_body_mb). Received: {declared} bytes.", 413
            )
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(f"Expected a body of at most {options.max_body_mb:g} MB (max_body_mb). Received: more.", 413)
            chunks.append(chunk)
        body = b"".join(chunks)
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("identity", ""):
            return body
        if encoding not in _DECODERS:
            raise BadRequest(f"Expected Content-Encoding gzip, deflate or none. Received: {encoding!r}.", 415)
        # Bounded: a small compressed body must not expand past the limit (a zip bomb).
        decoder = zlib.decompressobj(_DECODERS[encoding])
        try:
            plain = decoder.decompress(body, limit + 1)
        except zlib.error as exc:
            raise BadRequest(f"Expected a valid {encoding} body. Received: {exc}.") from None
        if len(plain) > limit or decoder.unconsumed_tail:
            raise BadRequest(
                f"Expected a body of at most {options.max_body_mb:g} MB (max_body_mb) once decompressed. Received: more.", 413
            )
        if not decoder.eof or decoder.unused_data:
            raise BadRequest(f"Expected one whole {encoding} stream as the body. Received: a truncated stream or bytes after it.")
        return plain

    async def parsed_body(request: Request, parse: Callable[[bytes, ModelView], Any], view: ModelView) -> Any:
        body = await read_body(request)
        if len(body) <= _PARSE_INLINE_BYTES:
            return parse(body, view)
        # Parsing megabytes of JSON takes the loop for a quarter second or more: in a thread,
        # other clients' requests go on meanwhile.
        return await asyncio.get_running_loop().run_in_executor(None, parse, body, view)

    async def predict(
        request: Request,
        parse: Callable[[bytes, ModelView], Any],
        arrays_of: Callable[[Any], list[np.ndarray[Any, Any]]],
        encode: Callable[[ModelView, Any, list[np.ndarray[Any, Any]]], tuple[bytes, dict[str, str]]],
    ) -> Response:
        """The one path of an inference request, for both protocols."""
        started = time.perf_counter()
        if not authorized(request):
            return denied()
        served = find(request)
        if isinstance(served, Response):
            return served
        m = served.metrics
        batcher, view = served.batcher, served.view
        if batcher is None or view is None or state.draining or batcher.broken is not None:
            m.failed("unavailable")
            if batcher is not None and batcher.broken is not None:
                what = f"model {served.spec.name!r} is broken ({batcher.broken})"
            else:
                what = "the server is shutting down" if state.draining else f"model {served.spec.name!r} is loading"
            return error(503, f"Expected a ready model. Received: a request while {what}.", **{"Retry-After": _RETRY_AFTER_S})
        if batcher.depth >= options.max_queue:  # before reading the body: refused at once
            m.failed("overloaded")
            return overloaded(served)
        m.in_flight.inc()
        # The deadline covers reading, parsing, waiting and running: a timer cancels this
        # task (cheaper than wait_for's extra task); a cancelled request's future tells the
        # batcher to leave its rows out.
        task = asyncio.current_task()
        assert task is not None
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            task.cancel()

        timer = asyncio.get_running_loop().call_later(options.timeout_s, expire)
        try:
            parsed = await parsed_body(request, parse, view)
            outputs = await batcher.submit(arrays_of(parsed), request.scope.get("client"))
            timer.cancel()
            body, headers = encode(view, parsed, outputs)
            m.success.inc()
            return Response(body, 200, headers=headers)
        except asyncio.CancelledError:
            if not expired:
                raise  # the server is stopping this task, not the timeout
            if hasattr(task, "uncancel"):  # Python 3.11+: the task goes on, not cancelled
                task.uncancel()
            m.failed("timeout")
            return error(
                504,
                f"Expected an answer within timeout_s={options.timeout_s:g} s. Received: none in time; the request was dropped.",
            )
        except BadRequest as exc:
            m.failed("bad_request")
            return error(exc.status, str(exc))
        except Overloaded:
            m.failed("overloaded")
            return overloaded(served)
        except ShuttingDown:
            m.failed("unavailable")
            return error(
                503,
                "Expected a running server. Received: a request queued while it shut down.",
                **{"Retry-After": _RETRY_AFTER_S},
            )
        except Exception as exc:  # noqa: BLE001 - the model failed on this batch: say so, keep serving
            m.failed("error")
            return error(500, f"The model failed on this request's batch: {type(exc).__name__}: {exc}")
        finally:
            timer.cancel()
            m.in_flight.dec()
            m.request_us.inc((time.perf_counter() - started) * 1e6)

    def overloaded(served: Served) -> Response:
        return error(
            503,
            f"Expected at most max_queue={options.max_queue} requests waiting for model {served.spec.name!r}. "
            "Received: one more; retry later.",
            **{"Retry-After": _RETRY_AFTER_S},
        )

    async def v2_infer(request: Request) -> Response:
        header_length = request.headers.get(kserve.HEADER_LENGTH)
        return await predict(
            request,
            lambda body, view: kserve.parse_infer(body, header_length, view),
            lambda parsed: parsed.arrays,
            kserve.encode_infer,
        )

    async def v1_predict(request: Request) -> Response:
        return await predict(
            request,
            tfserving.parse_predict,
            lambda parsed: parsed[0],
            lambda view, parsed, outputs: (
                tfserving.encode_predict(view, outputs, parsed[1]),
                {"content-type": "application/json"},
            ),
        )

    async def live(request: Request) -> Response:
        return json({"live": True})

    async def ready(request: Request) -> Response:
        return json({"ready": state.ready}, 200 if state.ready else 503)

    async def server_metadata(request: Request) -> Response:
        if not authorized(request):
            return denied()
        return json({"name": "kerasfleet", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def model_metadata(request: Request) -> Response:
        if not authorized(request):
            return denied()
        served = find(request)
        if isinstance(served, Response):
            return served
        if served.view is None:
            return error(
                503, f"Expected a loaded model. Received: {served.spec.name!r} is loading.", **{"Retry-After": _RETRY_AFTER_S}
            )
        return json(kserve.model_metadata(served.view))

    async def model_ready(request: Request) -> Response:
        if not authorized(request):
            return denied()
        served = find(request)
        if isinstance(served, Response):
            return served
        is_ready = served.batcher is not None and served.batcher.broken is None and not state.draining
        return json({"name": served.spec.name, "ready": is_ready}, 200 if is_ready else 503)

    async def v1_status(request: Request) -> Response:
        if not authorized(request):
            return denied()
        served = find(request)
        if isinstance(served, Response):
            return served
        return json(tfserving.model_status(served.batcher is not None))

    async def metrics(request: Request) -> Response:
        if not authorized(request):
            return denied()
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if state.on_startup is not None:
            await state.on_startup()
        try:
            yield
        finally:
            if state.on_shutdown is not None:
                await state.on_shutdown()

    routes = [
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2", server_metadata),
        Route("/v2/models/{name}", model_metadata),
        Route("/v2/models/{name}/versions/{version}", model_metadata),
        Route("/v2/models/{name}/ready", model_ready),
        Route("/v2/models/{name}/versions/{version}/ready", model_ready),
        Route("/v2/models/{name}/infer", v2_infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", v2_infer, methods=["POST"]),
        Route("/v1/models/{name}", v1_status),
        Route("/v1/models/{name}/versions/{version}", v1_status),
        Route("/v1/models/{name}:predict", v1_predict, methods=["POST"]),
        Route("/v1/models/{name}/versions/{version}:predict", v1_predict, methods=["POST"]),
        Route("/metrics", metrics),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        if status == 405:
            return error(405, f"Expected another method for {request.url.path}. Received: {request.method}.")
        return error(
            status, f"Expected a route of the KServe V2 or TF Serving REST API (see GET /v2). Received: {request.url.path}."
        )

    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: http_error, 405: http_error})
