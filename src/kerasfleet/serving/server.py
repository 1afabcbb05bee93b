"""`Server` and `serve`: the models, their batchers and the HTTP server, started and stopped.

    Server(models, **options).start()   binds, serves /v2/health/live at once, loads and warms
                                         every model (in a thread), then /v2/health/ready says 200
    Server.stop() / SIGTERM / SIGINT     stop accepting, answer the requests in flight (grace_s),
                                         stop the batchers, then the engines and fleet workers

`serve()` runs a server in the calling thread until SIGTERM/SIGINT and returns when everything
is stopped (the process then exits 0); `Server` runs one in a background thread, for notebooks
and tests, as a context manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import signal
import socket
import sys
import threading
import warnings
from collections.abc import Callable, Generator
from typing import Any

import uvicorn

from ..errors import InputError
from .app import Served, State, build_app
from .batcher import Batcher, Executor
from .execution import build_executor
from .metrics import Metrics
from .options import ServeOptions, parse_models
from .tensors import ModelView

_STOP_MARGIN_S = 60.0  # past the grace period: closing engines and fleets


class Server:
    """An HTTP inference server for Keras models: KServe V2 and TF Serving REST on one port.

    ```python
    with kerasfleet.Server({"mlp": "mlp.keras"}, port=0) as server:
        requests.post(f"{server.url}/v1/models/mlp:predict", json={"instances": rows})
    ```

    `models` is a path, `"name=path"`, a list of those or a dict {name: path}; the options are
    `ServeOptions`' (host, port, max_batch_size, max_delay_ms, max_queue, timeout_s,
    max_body_mb, token, grace_s, engine, precision, calibration, max_top1_disagreement, atol, execution, workers, threads_per_worker, backend,
    custom_objects, safe_mode). `start()` returns once every model is ready, or raises why one
    could not load.
    """

    def __init__(self, models: Any, *, log: Callable[[str], None] | None = None, **options: Any) -> None:
        known = {f.name for f in dataclasses.fields(ServeOptions)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InputError(f"Expected options among {sorted(known)}. Received: {unknown}.")
        self.options = ServeOptions(**options)
        self.specs = parse_models(models)
        self._log = log or _stderr
        if self.options.host in ("0.0.0.0", "::", ""):
            message = (
                f"kerasfleet serve: binding {self.options.host!r} exposes the models to every network this machine is on; "
                "use host='127.0.0.1' (the default) unless that is meant" + ("" if self.options.token else ", and set a token")
            )
            warnings.warn(message, UserWarning, stacklevel=2)
        self._thread: threading.Thread | None = None
        self._uvicorn: _Uvicorn | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._port = 0
        self.state: State | None = None
        self._loader = _Loader(None, self._log, self._loaded)

    @property
    def url(self) -> str:
        if self.state is None:
            raise InputError("Expected a started server. Received: Server.url before start().")
        host = self.options.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
        return f"http://[{host}]:{self._port}" if ":" in host else f"http://{host}:{self._port}"

    def start(self, timeout: float | None = None) -> Server:
        """Serve in a background thread; return once every model is ready (or raise why not)."""
        if self._thread is not None:
            raise InputError("Expected a server not started yet. Received: start() called twice.")
        sock = self._prepare()
        self._thread = threading.Thread(target=self._run, args=(sock,), name="kerasfleet-serve", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"Expected the models to load within {timeout} s. Received: still loading; server stopped.")
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until SIGTERM/SIGINT (or `stop()` from another thread)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # no loop running in this thread: as it should be
        else:
            raise InputError(
                "Expected to serve from a thread without a running event loop. Received: a running loop "
                "(a notebook, or async code). Use server = kerasfleet.Server(models, ...).start() there; "
                "it serves in a background thread until server.stop()."
            )
        sock = self._prepare()
        self._run(sock)
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish (grace_s), stop every engine and worker."""
        if self.state is not None:
            self.state.draining = True
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.options.grace_s + _STOP_MARGIN_S)
            if self._thread.is_alive() and self._uvicorn is not None:
                self._uvicorn.force_exit = True
                self._thread.join(_STOP_MARGIN_S)

    def __enter__(self) -> Server:
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self.state is not None else "not started"
        return f"<kerasfleet.Server {where} models={[s.name for s in self.specs]}>"

    # -- inside ------------------------------------------------------------------------------
    def _prepare(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.options.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.options.host, self.options.port))
        except OSError as exc:
            sock.close()
            raise InputError(
                f"Expected a free port to listen on. Received: {self.options.host}:{self.options.port} ({exc.strerror}). "
                "Pick another with port=... (0 picks a free one)."
            ) from None
        sock.set_inheritable(False)
        self._port = sock.getsockname()[1]
        metrics = Metrics()
        self.state = State(
            self.options,
            {s.name: Served(s, metrics.model(s.name)) for s in self.specs},
            metrics,
        )
        loader = _Loader(self.state, self._log, self._loaded)
        self._loader = loader
        self.state.on_startup = loader.start
        self.state.on_shutdown = loader.stop
        config = uvicorn.Config(
            build_app(self.state),
            loop=_best("uvloop", "asyncio"),
            http=_best("httptools", "h11"),
            lifespan="on",
            log_level=self.options.log_level,
            access_log=False,
            timeout_graceful_shutdown=math.ceil(self.options.grace_s),
            backlog=4096,
        )
        self._uvicorn = _Uvicorn(config, self.state)
        self._log(f"listening on {self.url} (models loading: {', '.join(s.name for s in self.specs)})")
        return sock

    def _run(self, sock: socket.socket) -> None:
        assert self._uvicorn is not None
        try:
            self._uvicorn.run(sockets=[sock])
        except BaseException as exc:  # noqa: BLE001 - reported to start()'s caller
            self._error = self._error or exc
        finally:
            sock.close()
            # uvicorn skips the app's shutdown on a forced exit (a second Ctrl-C, or stop()
            # past its grace): the engines and workers are closed here then.
            self._loader.close_now()
            self._ready.set()
            self._log("stopped")

    def _loaded(self, error: BaseException | None) -> None:
        if error is not None:
            self._error = error
            if self._uvicorn is not None:
                self._uvicorn.should_exit = True
        else:
            self._log(f"ready on {self.url}")
        self._ready.set()


class _Loader:
    """Loads and warms the models in a thread while the event loop already answers health checks."""

    def __init__(self, state: State | None, log: Callable[[str], None], done: Callable[[BaseException | None], None]) -> None:
        self.state = state
        self.log = log
        self.done = done
        self.executors: list[Executor] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._load_all, args=(loop,), name="kerasfleet-serve-loader", daemon=True)
        self._thread.start()

    def _load_all(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.state is not None
        options = self.state.options
        try:
            for served in self.state.models.values():
                if self._stopping.is_set():
                    return
                choice = build_executor(served.spec, options, self.log)
                self.executors.append(choice.executor)
                if self._stopping.is_set():
                    return
                view = ModelView.of(served.spec.name, choice.signature, choice.executor.outputs, f"kerasfleet_{choice.engine}")
                asyncio.run_coroutine_threadsafe(self._activate(served, choice.executor, view), loop).result()
                self.log(
                    f"{served.spec.name}: {choice.executor.description}; {choice.note}; batches of up to "
                    f"{options.max_batch_size} rows, waiting at most {options.max_delay_ms:g} ms"
                )
        except BaseException as exc:  # noqa: BLE001 - the server stops and start() raises it
            self.done(exc)
            return
        self.done(None)

    async def _activate(self, served: Served, executor: Executor, view: ModelView) -> None:
        assert self.state is not None
        options = self.state.options
        m = served.metrics
        batcher = Batcher(
            executor,
            max_batch_size=options.max_batch_size,
            max_delay_ms=options.max_delay_ms,
            max_queue=options.max_queue,
            clients=self.state.clients,
            on_batch=m.on_batch(),
            on_queued=m.on_queued(),
        )
        m.pending.set_function(lambda: batcher.depth)
        served.view = view
        served.batcher = batcher
        served.description = executor.description

    async def stop(self) -> None:
        """After the drain: no more loading, batchers stopped, engines and workers closed."""
        assert self.state is not None
        self.state.draining = True
        self._stopping.set()
        loop = asyncio.get_running_loop()
        if self._thread is not None:
            await loop.run_in_executor(None, self._thread.join)  # a model mid-build finishes first
        for served in self.state.models.values():
            if served.batcher is not None:
                await served.batcher.close()
        await loop.run_in_executor(None, self.close_now)

    def close_now(self) -> None:
        """Close every engine and fleet built so far (once; later calls do nothing)."""
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        while self.executors:
            executor = self.executors.pop()
            try:
                executor.close()
            except Exception as exc:  # noqa: BLE001 - the others are closed all the same
                self.log(f"closing {executor.description} failed: {type(exc).__name__}: {exc}")


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, but a SIGTERM/SIGINT that drained cleanly ends with exit status 0.

    uvicorn re-raises the signal after its graceful shutdown (so the process dies of it); a
    server that stopped as asked has nothing to report. From the signal on, the server is
    draining: `/v2/health/ready` and new requests on open connections answer 503.
    """

    def __init__(self, config: uvicorn.Config, state: State) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.state.draining = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def serve(models: Any, **options: Any) -> None:
    """Serve `models` in this thread until SIGTERM or SIGINT; see `Server` for the options."""
    Server(models, **options).serve_forever()


def _best(preferred: str, fallback: str) -> str:
    try:
        __import__(preferred)
    except ImportError:
        return fallback
    return preferred


def _stderr(line: str) -> None:
    print(f"kerasfleet serve: {line}", file=sys.stderr, flush=True)
