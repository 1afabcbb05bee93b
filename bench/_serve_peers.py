"""The peers of bench/serve.py: what Keras users put behind HTTP today, each run as its own server process.

- `plain_app` (a uvicorn factory): the blog-post Starlette app. It loads the model with
  `keras.saving.load_model` at startup and answers `POST /v1/models/mlp:predict`
  (`{"instances": [...]}` -> `{"predictions": [...]}`) with one `model.predict(x, verbose=0)`
  call per request, or `model.predict_on_batch(x)` when `BENCH_SERVE_METHOD=predict_on_batch`.
  The endpoint is `async def` and calls Keras directly, as the posts do: one request at a time.

      BENCH_SERVE_MODEL=m.keras python -m uvicorn _serve_peers:plain_app --factory --app-dir bench --port 8000

- `python bench/_serve_peers.py ray --model m.keras --port 8000 [--max-batch-size 64] [--max-delay-ms 2]`:
  Ray Serve on a local `ray.init(num_cpus=2)`, one replica holding the Keras model behind
  `@serve.batch`, which merges concurrent requests up to `max_batch_size` rows (Ray's
  `batch_size_fn` counts rows, as kerasfleet's batcher does) or `max_delay_ms`, then calls
  `model.predict_on_batch` once. `max_ongoing_requests` is twice the batch size, as Ray's
  batching guide advises (the default of 5 would cap every batch at 5 requests). It prints
  `ready` once `serve.run` returns and shuts Serve and Ray down on SIGTERM.

Access logs are off in both (uvicorn's `--no-access-log`, Serve's `enable_access_log=False`):
a per-request log line costs the peers CPU that kerasfleet does not spend.
"""

from __future__ import annotations

import argparse
import inspect
import os
import signal
import sys
import threading
from typing import Any

import numpy as np

ROUTE = "/v1/models/mlp:predict"


def plain_app() -> Any:
    """The Starlette app of the blog posts (a factory: uvicorn calls it once, before it listens)."""
    import keras
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    model = keras.saving.load_model(os.environ["BENCH_SERVE_MODEL"])
    method = os.environ.get("BENCH_SERVE_METHOD", "predict")
    if method not in ("predict", "predict_on_batch"):
        raise ValueError(f"Expected BENCH_SERVE_METHOD predict or predict_on_batch. Received: {method!r}")

    async def predict(request: Request) -> JSONResponse:
        body = await request.json()
        x = np.asarray(body["instances"], dtype="float32")
        y = model.predict(x, verbose=0) if method == "predict" else model.predict_on_batch(x)
        return JSONResponse({"predictions": np.asarray(y).tolist()})

    return Starlette(routes=[Route(ROUTE, predict, methods=["POST"])])


def ray_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="_serve_peers.py ray")
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-delay-ms", type=float, default=2.0)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--temp-dir", default=None, help="Ray's session folder (short: it holds unix sockets)")
    args = parser.parse_args(argv)

    import ray
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    # Until ray.init returns, Ray's own SIGTERM handler (sys.exit) and its atexit hook shut down
    # what it started; from then on, ours: Serve first, then Ray.
    ray.init(
        num_cpus=args.num_cpus,
        include_dashboard=False,
        object_store_memory=100 * 2**20,  # requests never go through the object store
        _temp_dir=args.temp_dir,
        log_to_driver=False,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # batch_size_fn (recent Rays) makes max_batch_size count rows, as kerasfleet's does; an older
    # Ray counts requests, which at 32 rows per request allows batches 32 times larger.
    counts_rows = "batch_size_fn" in inspect.signature(serve.batch).parameters
    rows_option = {"batch_size_fn": lambda xs: sum(len(x) for x in xs)} if counts_rows else {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})

        @serve.deployment(
            max_ongoing_requests=2 * args.max_batch_size,
            ray_actor_options={"num_cpus": args.num_cpus},  # the replica gets the machine, as kerasfleet's workers do
            logging_config={"enable_access_log": False},
        )
        class KerasModel:
            def __init__(self, path: str) -> None:
                import keras

                self.model = keras.saving.load_model(path)

            @serve.batch(max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.max_delay_ms / 1e3, **rows_option)
            async def predict(self, xs: list[np.ndarray]) -> list[np.ndarray]:
                y = np.asarray(self.model.predict_on_batch(np.concatenate(xs)))
                return np.split(y, np.cumsum([len(x) for x in xs])[:-1])

            async def __call__(self, request: Request) -> JSONResponse:
                if request.url.path != ROUTE or request.method != "POST":
                    return JSONResponse({"error": f"no route {request.method} {request.url.path}"}, status_code=404)
                body = await request.json()
                y = await self.predict(np.asarray(body["instances"], dtype="float32"))
                return JSONResponse({"predictions": y.tolist()})

        serve.run(KerasModel.bind(args.model), name="mlp", route_prefix="/")
        unit = "rows" if counts_rows else "requests (this Ray has no batch_size_fn)"
        print(f"ready on http://127.0.0.1:{args.port}{ROUTE}; batches of up to {args.max_batch_size} {unit}", flush=True)
        while not stop.wait(0.5):
            pass
        print("SIGTERM: shutting down Serve and Ray", flush=True)
        serve.shutdown()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "ray":
        sys.exit("usage: python bench/_serve_peers.py ray --model PATH --port PORT [--max-batch-size N] [--max-delay-ms MS]")
    ray_main(sys.argv[2:])
