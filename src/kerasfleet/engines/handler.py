"""The worker side of prediction: the runtime's task handler for engines.

    Attach(job, JobSpec)          map the job's input and output buffers
    Call(PredictRows(job, a, b))  rows [a, b) from the input buffers into the output buffers,
                                  then the job's RowsHook on those rows, if it has one
    Call(PredictInline(key, xs))  small requests: rows travel in the message, outputs return in it
    Call(Probe(key))              prepare (compile) a shape; answer what the model returns for it
    Call(PredictChunk(key, a, b, inputs, outputs))
                                  rows [a, b) of a job with no shared memory (a Ray cluster):
                                  inputs are the chunk's rows or files every node reads,
                                  outputs are returned or written to `out=` files
    Detach(job)                   unmap

The runtime imports this module inside the worker by name
("kerasfleet.engines.handler:engine_handler"), after the thread budget is in place.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..runtime.buffers import BufferSpec, OpenBuffer
from ..runtime.worker import load_factory
from .base import Engine, Key, Outputs
from .registry import EngineConfig, build_engine

HANDLER = "kerasfleet.engines.handler:engine_handler"
# Hooks built in one worker, kept for the next jobs with the same key (a warm fleet's
# repeated evaluations): the latest 2 only, since one may hold large state (a score
# function's closure) for as long as the worker lives.
_HOOKS_KEPT = 2


@dataclass(frozen=True)
class RowsHook:
    """Work on a job's rows in the worker that predicted them, right after it did.

    A higher layer's code (evaluate's per-row score functions) runs where the predictions
    already are: no other process, no copy of the predictions. `factory` ("module:function")
    builds the hook from `config` once per worker and `key` (kept for later jobs with the same
    key: keep `config` small, e.g. where to read large state, since it travels with every job);
    `payload` is the job's own (its buffers), given to the hook's `attach`.
    """

    factory: str
    key: str
    config: Any
    payload: Any


class AttachedHook(Protocol):
    def run(self, outputs: Outputs, arrays: list[np.ndarray[Any, Any]], start: int, stop: int) -> None:
        """Rows [start, stop) of the job, just predicted into `arrays` (packed by `outputs`)."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class JobSpec:
    key: Key
    inputs: tuple[BufferSpec, ...]
    outputs: tuple[BufferSpec, ...]
    after: RowsHook | None = None


@dataclass(frozen=True)
class PredictRows:
    context_id: int
    start: int
    stop: int


@dataclass(frozen=True)
class PredictInline:
    key: Key
    arrays: tuple[np.ndarray[Any, Any], ...]

    @property
    def rows(self) -> int:
        return int(self.arrays[0].shape[0])


@dataclass(frozen=True)
class PredictChunk:
    """Rows [start, stop) without a context: for workers that share no memory with the caller.

    Each input is either the chunk's own rows (an array, delivered through Ray's object store)
    or a file `BufferSpec` covering every row, which the worker maps (storage every node reads).
    `outputs` are `out=` file specs to write rows [start, stop) into, or None: the rows are
    returned.
    """

    key: Key
    start: int
    stop: int
    inputs: tuple[Any, ...]
    outputs: tuple[BufferSpec, ...] | None = None


@dataclass(frozen=True)
class Probe:
    key: Key


class _OpenJob:
    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.inputs = [OpenBuffer(b) for b in spec.inputs]
        self.outputs = [OpenBuffer(b) for b in spec.outputs]
        self.after: AttachedHook | None = None

    def close(self) -> None:
        if self.after is not None:
            self.after.close()
        for buf in self.inputs + self.outputs:
            buf.close()


class EngineHandler:
    def __init__(self, config: EngineConfig) -> None:
        self.engine: Engine = build_engine(config)
        warm = self.engine.outputs(config.warm_key) if config.warm_key is not None else None
        self.info: dict[str, Any] = {
            "backend": self.engine.backend,
            "engine": self.engine.name,
            "warm_key": config.warm_key,
            "warm_outputs": warm,
        }
        self._jobs: dict[int, _OpenJob] = {}
        self._files: dict[BufferSpec, OpenBuffer] = {}  # files of PredictChunk jobs, mapped once
        self._hooks: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def attach(self, context_id: int, payload: Any) -> None:
        job = _OpenJob(payload)
        try:
            if payload.after is not None:
                job.after = self._hook(payload.after).attach(payload.after.payload)
        except BaseException:
            job.close()  # the calls report the error (the runtime keeps it for this context)
            raise
        self._jobs[context_id] = job

    def _hook(self, hook: RowsHook) -> Any:
        key = (hook.factory, hook.key)
        built = self._hooks.pop(key, None)
        if built is None:
            built = load_factory(hook.factory)(hook.config)
        self._hooks[key] = built
        while len(self._hooks) > _HOOKS_KEPT:
            self._hooks.popitem(last=False)
        return built

    def detach(self, context_id: int) -> None:
        job = self._jobs.pop(context_id, None)
        if job is not None:
            job.close()

    def run(self, payload: Any) -> Any:
        if isinstance(payload, PredictRows):
            job = self._jobs[payload.context_id]
            arrays = [b.array for b in job.outputs]
            self.engine.predict_rows(job.spec.key, [b.array for b in job.inputs], arrays, payload.start, payload.stop)
            if job.after is not None:
                job.after.run(self.engine.outputs(job.spec.key), arrays, payload.start, payload.stop)
            return None
        if isinstance(payload, PredictInline):
            outputs: Outputs = self.engine.outputs(payload.key)
            arrays = outputs.empty(payload.rows)
            self.engine.predict_rows(payload.key, list(payload.arrays), arrays, 0, payload.rows)
            return arrays
        if isinstance(payload, PredictChunk):
            return self._chunk(payload)
        if isinstance(payload, Probe):
            return self.engine.outputs(payload.key)
        raise TypeError(f"Expected PredictRows, PredictInline, PredictChunk or Probe. Received: {type(payload).__name__}.")

    def _chunk(self, payload: PredictChunk) -> Any:
        a, b = payload.start, payload.stop
        inputs = [self._file(x).array[a:b] if isinstance(x, BufferSpec) else x for x in payload.inputs]
        if payload.outputs is None:
            arrays = self.engine.outputs(payload.key).empty(b - a)
        else:
            arrays = [self._file(o).array[a:b] for o in payload.outputs]
        self.engine.predict_rows(payload.key, inputs, arrays, 0, b - a)
        if payload.outputs is not None:
            for out in arrays:
                if isinstance(out, np.memmap):
                    out.flush()
            return None
        return arrays

    def _file(self, spec: BufferSpec) -> OpenBuffer:
        if spec not in self._files:
            if len(self._files) >= 16:  # a long-lived worker sees many jobs: keep the latest maps
                self._files.pop(next(iter(self._files))).close()
            self._files[spec] = OpenBuffer(spec)
        return self._files[spec]


def engine_handler(config: EngineConfig) -> EngineHandler:
    return EngineHandler(config)
