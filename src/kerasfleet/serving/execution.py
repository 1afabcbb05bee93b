"""Where a served model's batches run: in the server's process or on a fleet of workers.

| execution | what runs a batch | lanes (batches at once) |
| --- | --- | --- |
| `in-process` | a `Predictor`: the resolver's in-process engine (ONNX Runtime when its export passed parity, else compiled Keras) on every usable core but one (the HTTP loop's) | 1 |
| `fleet` | a `Fleet`: the resolver's fleet engine and plan (measured once per model and machine) | 2 per worker |
| `auto` | both are built and timed on full batches at start; the fleet is kept only when it runs at least `_FLEET_MARGIN` x the in-process rows/s (it adds a hop per batch); the choice is remembered per model, machine and options | |

Every batch bucket (1, 2, 4, ... `max_batch_size` rows) is run once before the model is ready,
on every worker of a fleet, so no request pays for a compile.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..cache import cache_dir, locked, model_hash, write_atomic
from ..engines import Outputs, buckets
from ..engines.model_file import Signature
from ..prediction import Fleet, Predictor
from ..runtime import default_backend, usable_cpus
from ..tune import machine_key
from .batcher import Executor
from .options import ModelSpec, ServeOptions

_FLEET_MARGIN = 1.2
_MEASURE_S = 0.5
# A batch this quick runs on the event loop: handing it to a thread and back costs 50-100 us
# of latency, more than the batch (a 1-row MLP takes 15-30 us in ONNX Runtime).
_INLINE_S = 100e-6


def in_process_threads() -> int:
    """Threads of an in-process engine: every usable core but one, left to the HTTP event loop.

    The loop parses, checks and answers every request on one core; an engine that also takes
    that core makes both wait (on 2 cores: 2 ONNX threads served 1-row requests with the
    loop at 163% CPU where 1 thread needs about 100%).
    """
    return max(1, len(usable_cpus()) - 1)


class InProcess:
    """Batches run by a `Predictor` in the server's process; one at a time."""

    lanes = 1

    def __init__(self, spec: ModelSpec, options: ServeOptions) -> None:
        self.predictor = Predictor(
            spec.path,
            engine=options.engine,
            precision=options.precision,
            calibration=options.calibration,
            max_top1_disagreement=options.max_top1_disagreement,
            atol=options.atol,
            max_batch_size=options.max_batch_size,
            threads=options.threads_per_worker or in_process_threads(),
            custom_objects=options.custom_objects,
            safe_mode=options.safe_mode,
        )  # warms every bucket
        self.signature: Signature = self.predictor.signature
        self.outputs: Outputs = self.predictor.outputs
        self.engine = self.predictor.engine_name
        self.inline_rows = _quick_rows(self, options.max_batch_size)
        if self.predictor.precision is not None:
            self.engine = f"{self.engine}_{self.predictor.precision.precision}"
        self.description = f"in-process {self.engine}" + (
            f" (batches up to {self.inline_rows} rows on the event loop)" if self.inline_rows else ""
        )
        if self.predictor.precision is not None:
            self.description += f"; {self.predictor.precision.describe()}"

    def run(self, arrays: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        return self.predictor.predict_arrays(arrays)

    def close(self) -> None:
        # The engine (an ONNX Runtime session and its threads, or compiled functions) is freed
        # with the last reference; a call after close fails clearly.
        self.predictor = None  # type: ignore[assignment]


def _quick_rows(executor: InProcess, max_batch_size: int) -> int:
    """The largest bucket whose median run takes under `_INLINE_S` (0 if none does)."""
    quick = 0
    for size in buckets(max_batch_size):
        arrays = _zeros(executor.signature, size)
        times = []
        for _ in range(7):
            started = time.perf_counter()
            executor.run(arrays)
            times.append(time.perf_counter() - started)
        if float(np.median(times)) >= _INLINE_S:
            break
        quick = size
    return quick


class OnFleet:
    """Batches run by a `Fleet` of worker processes; two per worker at once."""

    inline_rows = 0

    def __init__(self, spec: ModelSpec, options: ServeOptions) -> None:
        self.fleet = Fleet(
            spec.path,
            workers=options.workers,
            threads_per_worker=options.threads_per_worker,
            devices="auto",
            batch_size=options.max_batch_size,
            backend=options.backend,
            custom_objects=options.custom_objects,
            safe_mode=options.safe_mode,
            engine=options.engine,
            precision=options.precision,
            calibration=options.calibration,
            max_top1_disagreement=options.max_top1_disagreement,
            atol=options.atol,
        )
        try:
            self.signature = self.fleet.signature
            self.engine = self.fleet.engine
            self.lanes = 2 * self.fleet.plan.workers
            if self.fleet.precision is not None:
                self.engine = f"{self.engine}_{self.fleet.precision.precision}"
            self.description = f"fleet of {self.fleet.plan.describe()}, engine {self.engine}"
            if self.fleet.precision is not None:
                self.description += f"; {self.fleet.precision.describe()}"
            self.fleet.wait_ready()
            self.outputs = self.fleet.outputs(options.max_batch_size, options.max_batch_size)
            self._structure = self.signature.structure
            self._names = [s.name for s in self.signature.inputs or ()]
            self._batch_size = options.max_batch_size
            self._warm(options.max_batch_size)
        except BaseException:
            self.fleet.close()
            raise

    def _warm(self, max_batch_size: int) -> None:
        """Every bucket once on every worker (round-robin dispatch spreads concurrent calls)."""
        workers = self.fleet.plan.workers
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for size in buckets(max_batch_size):
                arrays = _zeros(self.signature, size)
                list(pool.map(self.run, [arrays] * workers))

    def run(self, arrays: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        if self._structure == "dict":
            x: Any = dict(zip(self._names, arrays))
        elif self._structure == "list":
            x = list(arrays)
        else:
            x = arrays[0]
        y = self.fleet.predict(x, batch_size=self._batch_size, progress=False)
        if self.outputs.structure == "dict":
            return [y[o.name] for o in self.outputs.specs]
        return list(y) if self.outputs.structure == "list" else [y]

    def close(self) -> None:
        self.fleet.close()


@dataclass
class Choice:
    executor: Executor
    signature: Signature
    engine: str
    note: str  # why this execution: what was measured, or that it was given


def build_executor(spec: ModelSpec, options: ServeOptions, log: Callable[[str], None]) -> Choice:
    """The executor for one model, as `options.execution` says (measuring for "auto")."""
    if options.execution == "in-process":
        ex: InProcess | OnFleet = InProcess(spec, options)
        return Choice(ex, ex.signature, ex.engine, "execution=in-process given")
    if options.execution == "fleet":
        ex = OnFleet(spec, options)
        return Choice(ex, ex.signature, ex.engine, "execution=fleet given")
    path = _choice_path(spec, options)
    try:
        remembered = json.loads(path.read_text())
        execution, why = remembered["execution"], remembered["note"]
    except (OSError, ValueError, KeyError, TypeError):
        execution = None  # none yet, or unreadable: measured again
    if execution in ("fleet", "in-process"):
        ex = OnFleet(spec, options) if execution == "fleet" else InProcess(spec, options)
        return Choice(ex, ex.signature, ex.engine, f"{why}; remembered from {path}")
    with locked(path):
        log(
            f"{spec.name}: measuring in-process and fleet execution on {options.max_batch_size}-row batches (once per model and machine)"
        )
        inproc = InProcess(spec, options)
        in_rate = _rows_per_s(inproc, options.max_batch_size)
        try:
            fleet = OnFleet(spec, options)
        except Exception as exc:  # noqa: BLE001 - the in-process engine still serves
            note = f"in-process chosen: a fleet did not start ({type(exc).__name__}: {exc})"
            return Choice(inproc, inproc.signature, inproc.engine, note)
        try:
            fleet_rate = _rows_per_s(fleet, options.max_batch_size)
        except BaseException:
            fleet.close()
            raise
        use_fleet = fleet_rate >= _FLEET_MARGIN * in_rate
        note = (
            f"measured on {options.max_batch_size}-row batches: in-process {inproc.engine} {in_rate:,.0f} rows/s, "
            f"{fleet.description} {fleet_rate:,.0f} rows/s"
        )
        (inproc if use_fleet else fleet).close()
        chosen: InProcess | OnFleet = fleet if use_fleet else inproc
        try:
            write_atomic(path, json.dumps({"execution": "fleet" if use_fleet else "in-process", "note": note}).encode())
        except OSError as exc:  # a read-only cache: measured again at the next start
            log(f"{spec.name}: the choice is not remembered ({exc})")
        return Choice(chosen, chosen.signature, chosen.engine, note)


def _rows_per_s(executor: InProcess | OnFleet, rows: int) -> float:
    """Steady rows/s on full batches with every lane busy."""
    arrays = _zeros(executor.signature, rows)
    done = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + _MEASURE_S

    def lane() -> None:
        executor.run(arrays)  # warm
        while time.perf_counter() < stop:
            executor.run(arrays)
            with lock:
                done[0] += rows

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=executor.lanes) as pool:
        list(pool.map(lambda _: lane(), range(executor.lanes)))
    return done[0] / max(time.perf_counter() - started, 1e-9)


def _choice_path(spec: ModelSpec, options: ServeOptions) -> Any:
    backend = options.backend or default_backend()
    parts = [options.engine, options.max_batch_size, options.workers, options.threads_per_worker]
    if options.precision != "fp32":  # fp32 keeps the names it always had: remembered choices stay valid
        parts += [options.precision, options.max_top1_disagreement, options.atol]
    name = f"{model_hash(spec.path)}-{machine_key(backend)}-" + "-".join(str(p) for p in parts)
    return cache_dir() / "serve" / f"{name}.json"


def _zeros(signature: Signature, rows: int) -> list[np.ndarray[Any, Any]]:
    """`rows` rows of zeros per input, in the signature's order: warm-up and timing batches."""
    return [np.zeros((rows, *shape), np.dtype(dtype)) for shape, dtype in signature.row_specs()]
