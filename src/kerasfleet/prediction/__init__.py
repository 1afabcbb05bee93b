"""Prediction: what users call - `predict`, `Fleet`, `Predictor`.

    inputs.py     x checked against the model's signature; one Source per input
    jobs.py       one call's buffers and chunks; the result in model.predict's structure
    fleet.py      Fleet: warm workers through the runtime's supervisor, any number of callers
    api.py        kerasfleet.predict: in-process or a fleet, as the resolver decides
    kept.py       keep_actors(): one-shot predict(cluster=) calls that reuse the previous call's actors
    predictor.py  Predictor: in-process, warmed buckets, latency and retrace stats
    progress.py   the tqdm bar

Imports `tune`, `engines` and `runtime` below it.
"""

from .api import predict
from .fleet import Fleet
from .predictor import Predictor

__all__ = ["Fleet", "Predictor", "predict"]
