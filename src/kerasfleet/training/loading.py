"""The loader's worker side: the dataset, unpickled once per state; `dataset[i]` per task.

    caller (Loader)                                  loader workers (runtime workers)
    ---------------                                  --------------------------------
    Attach(dataset state, cloudpickled) --------->  unpickle once (or call the factory)
    LoadBatch(index, seed, slot) ---------------->  seed NumPy and `random` (if a seed was given)
                                                    batch = dataset[index]
                                                    arrays -> the slot (shared memory)
    <- Done(Packed: tree + where each array is)

Nothing here imports Keras: unpickling a `keras.utils.PyDataset` does, with the backend the
caller runs (the worker's `KERAS_BACKEND`), so the dataset computes what it computes there.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..runtime import BufferSpec, OpenBuffer
from ..runtime.worker import load_factory
from .batches import Packed, pack

HANDLER = "kerasfleet.training.loading:load_handler"
# Slots a worker keeps mapped (a mapping costs address space, not memory): more than a ring
# holds for any plan (2 per worker + 2, at most a few generations).
_MAPPED_SLOTS = 1024


@dataclass(frozen=True)
class DatasetState:
    """How a worker gets the dataset: cloudpickled bytes, or an importable factory to call."""

    blob: bytes | None
    factory: str | None
    replay: tuple[str, ...] = ()  # epoch hooks a factory-built copy runs after it is built


@dataclass(frozen=True)
class LoadBatch:
    context_id: int
    index: int  # the dataset's own batch index
    seed: int | None  # seeds NumPy's and Python's global generators before `dataset[index]`
    slot: BufferSpec | None  # where the arrays go; None: they come back pickled


class LoadHandler:
    info: dict[str, Any] = {}

    def __init__(self) -> None:
        self._datasets: dict[int, Any] = {}
        self._slots: OrderedDict[str, OpenBuffer] = OrderedDict()

    def attach(self, context_id: int, payload: Any) -> None:
        if not isinstance(payload, DatasetState):
            raise TypeError(f"Expected a DatasetState. Received: {type(payload).__name__}.")
        if payload.blob is not None:
            import cloudpickle

            self._datasets[context_id] = cloudpickle.loads(payload.blob)
        else:
            assert payload.factory is not None
            dataset = load_factory(payload.factory)()
            for hook in payload.replay:
                getattr(dataset, hook)()
            self._datasets[context_id] = dataset

    def detach(self, context_id: int) -> None:
        self._datasets.pop(context_id, None)

    def run(self, payload: Any) -> Packed:
        if not isinstance(payload, LoadBatch):
            raise TypeError(f"Expected LoadBatch. Received: {type(payload).__name__}.")
        dataset = self._datasets[payload.context_id]
        if payload.seed is not None:
            # Augmentations drawn from the global generators become a function of
            # (seed, pass, index): the same on whichever worker runs the batch, and after a
            # worker is replaced.
            np.random.seed(payload.seed)
            random.seed(payload.seed)
        batch = dataset[payload.index]
        return pack(batch, self._slot(payload.slot))

    def _slot(self, spec: BufferSpec | None) -> np.ndarray[Any, Any] | None:
        if spec is None:
            return None
        opened = self._slots.get(spec.location)
        if opened is None:
            opened = OpenBuffer(spec)
            self._slots[spec.location] = opened
            while len(self._slots) > _MAPPED_SLOTS:
                self._slots.popitem(last=False)[1].close()
        return opened.array


def load_handler(config: Any) -> LoadHandler:
    return LoadHandler()
