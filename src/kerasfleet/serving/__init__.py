"""Serving: Keras models behind HTTP, with dynamic batching (`kerasfleet serve`).

    options.py    the models (name=path) and the server's options, checked first
    tensors.py    a served model's named tensors; the checks on incoming ones
    kserve.py     the Open Inference Protocol (KServe V2) REST, JSON and binary tensors
    tfserving.py  TF Serving's REST predict and status
    batcher.py    requests merged into batches, run, split back; when a batch closes
    execution.py  where batches run: in-process Predictor or a Fleet, measured
    metrics.py    Prometheus metrics, Triton's names
    app.py        the routes (Starlette)
    server.py     Server (background thread) and serve() (this thread): start, drain, stop

A feature on top of `prediction` (Predictor, Fleet) and `tune`. Needs the `serve` extra
(uvicorn, starlette, orjson, prometheus-client); `import kerasfleet` never imports them.
"""

import importlib.util

_MISSING = [m for m in ("uvicorn", "starlette", "orjson", "prometheus_client") if importlib.util.find_spec(m) is None]
if _MISSING:
    raise ImportError(
        f"Expected the serve extra to be installed for kerasfleet's server. Received: no {', '.join(_MISSING)}. "
        "Install it with: pip install 'kerasfleet[serve]'"
    )

from .server import Server, serve  # noqa: E402

__all__ = ["Server", "serve"]
