"""engine="auto": a short measured trial over engines, splits and batch sizes, remembered.

The trial measures real configurations on synthetic rows of the model's own signature:

- ONNX Runtime in the caller's process on every core (no workers at all);
- fleets of ONNX workers (cores x 1 thread, 1 x cores) at two batch sizes;
- OpenVINO on the same export (when installed and its parity check passes), in the caller's
  process and as a fleet of cores x 1 thread;
- a fleet of compiled-Keras workers (cores x 1 thread).

A configuration's steady rate (rows/s) and its start-up time are recorded; the fastest fleet
wins, and the best in-process rate (ONNX Runtime or OpenVINO) lets a one-shot call skip
starting workers when that is faster for its row count. ONNX takes part only if its export passed the parity check (else the
reason is kept in the plan and a warning says it). The plan is JSON in the user cache
(`$KERASFLEET_CACHE_DIR` or `~/.cache/kerasfleet/plans`), keyed by the model file's hash and
the machine (usable cores, CPU model, backend, library versions), and reused from then on.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..cache import cache_dir, locked, model_hash, write_atomic
from ..engines import default_batch_size, row_bytes
from ..engines import export as exporting  # looked up at call time: tests replace it
from ..engines.model_file import ModelFile, Signature
from ..engines.onnx_engine import OnnxEngine
from ..engines.runner import Runner
from ..errors import FleetError, InputError
from ..runtime import make_plan, usable_cpus


class FleetLike(Protocol):
    """What the trial needs of a fleet; `prediction.Fleet` is passed in by the layer above."""

    def wait_ready(self, timeout: float | None = None) -> None: ...

    def predict(self, x: Any, *, batch_size: int | None = None, progress: bool | None = None) -> Any: ...

    def close(self) -> None: ...


FleetFactory = Callable[..., FleetLike]

DEFAULT_TRIAL_S = 8.0
_PLAN_FORMAT = 2
_TIMED_RUN_S = 0.3  # each measurement times about this long, after a warm-up call
_MAX_TRIAL_BYTES = 64 << 20


@dataclass
class TunedPlan:
    engine: str
    workers: int
    threads_per_worker: int
    batch_size: int
    rows_per_s: float
    start_s: float
    in_process_rows_per_s: float | None = None
    in_process_batch: int | None = None
    note: str = ""
    table: list[dict[str, Any]] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    in_process_engine: str = "onnx"

    def use_in_process(self, rows: int) -> bool:
        """True when ONNX Runtime in the caller finishes `rows` before a fleet would."""
        if not self.in_process_rows_per_s:
            return False
        return rows / self.in_process_rows_per_s <= self.start_s + rows / self.rows_per_s

    def describe(self) -> str:
        text = f"engine {self.engine}, {self.workers} worker(s) x {self.threads_per_worker} thread(s), batch {self.batch_size}, {self.rows_per_s:,.0f} rows/s"
        if self.in_process_rows_per_s:
            text += f"; in-process {self.in_process_engine} {self.in_process_rows_per_s:,.0f} rows/s, used by one-shot calls "
            if self.in_process_rows_per_s < self.rows_per_s:
                crossover = self.start_s / (1 / self.in_process_rows_per_s - 1 / self.rows_per_s)
                text += f"below {crossover:,.0f} rows"
            else:
                text += "of any size (it is faster than workers here)"
        return text + (f" ({self.note})" if self.note else "")


@functools.lru_cache(maxsize=8)
def _machine_facts(backend: str) -> str:
    return json.dumps(machine_facts(backend), sort_keys=True)


def machine_facts(backend: str) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for package in ("keras", "jax", "tensorflow", "tensorflow-cpu", "onnxruntime", "openvino", "numpy", "kerasfleet"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {
        "cores": len(usable_cpus()),
        "cpu": cpu,
        "backend": backend,
        "python": platform.python_version(),
        "versions": versions,
    }


def machine_key(backend: str) -> str:
    """A short hash of this machine's facts (cores, CPU, backend, library versions)."""
    # Read once per process: package metadata lookups cost milliseconds on every call otherwise.
    return hashlib.sha256(_machine_facts(backend).encode()).hexdigest()[:16]


def plan_path(model: ModelFile, backend: str) -> Path:
    return cache_dir() / "plans" / f"{model_hash(model.path)}-{machine_key(backend)}-v{_PLAN_FORMAT}.json"


def cached_plan(model: ModelFile, backend: str) -> TunedPlan | None:
    path = plan_path(model, backend)
    try:
        return TunedPlan(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def get_plan(model: ModelFile, **kwargs: Any) -> TunedPlan:
    """The cached plan for this model and machine, or a fresh trial's (one process at a time)."""
    plan = cached_plan(model, kwargs["backend"])
    if plan is not None:
        return plan
    with locked(plan_path(model, kwargs["backend"])):
        return cached_plan(model, kwargs["backend"]) or tune(model, **kwargs)


def synthetic_inputs(signature: Signature, rows: int, seed: int = 0) -> Any:
    if signature.inputs is None or not signature.fixed:
        raise InputError(
            "Expected fixed per-row input shapes to tune on synthetic rows. Received: undeclared or variable shapes; use engine='keras'."
        )
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in signature.inputs:
        shape = (rows, *[int(d) for d in spec.shape if d is not None])
        arrays[spec.name] = (
            np.zeros(shape, spec.dtype) if np.dtype(spec.dtype).kind in "iub" else rng.normal(size=shape).astype(spec.dtype)
        )
    if signature.structure == "dict":
        return arrays
    return list(arrays.values()) if signature.structure == "list" else next(iter(arrays.values()))


def trial_rows(bytes_per_row: int, batches: list[int], workers: int) -> int:
    """Most rows the trial copies per timed call: about 64 MB of input, but never so few that
    a large fleet idles - every worker gets at least four chunks of the largest batch."""
    return max(batches) * 2 + _MAX_TRIAL_BYTES // max(1, bytes_per_row) + 4 * workers * max(batches)


def _timed_rates(run: Any, signature: Signature, batches: list[int], workers: int = 1) -> dict[int, float]:
    """Rows/s of `run(x, batch)` per batch size on synthetic rows, each timed about _TIMED_RUN_S.

    Every batch size is warmed first, then timed in alternating rounds and the best round kept:
    a neighbour's burst on a shared machine only ever slows a run, and alternating keeps the
    first-measured candidate from paying for the machine settling down.
    """
    cap = trial_rows(row_bytes(signature.row_specs()), batches, workers)
    rows = min(cap, max(8, 4 * workers) * max(batches))
    x = synthetic_inputs(signature, rows)
    for batch in batches:
        run(x, batch)
    started = time.perf_counter()
    run(x, batches[0])
    elapsed = time.perf_counter() - started
    if elapsed < _TIMED_RUN_S and rows < cap:
        rows = int(min(cap, rows * _TIMED_RUN_S / max(elapsed, 1e-4)))
        x = synthetic_inputs(signature, rows)
    best = dict.fromkeys(batches, float("inf"))
    for _ in range(2):
        for batch in batches:
            started = time.perf_counter()
            run(x, batch)
            best[batch] = min(best[batch], time.perf_counter() - started)
    return {batch: rows / seconds for batch, seconds in best.items()}


def _openvino_checked(onnx: Any) -> str:
    """ "" when OpenVINO is installed and matches Keras on the export's sample, else why not."""
    from ..engines.export import ATOL, RTOL
    from ..engines.openvino_engine import check_parity, openvino_version

    if openvino_version() is None:
        return "OpenVINO not measured: not installed (pip install 'kerasfleet[openvino]')"
    try:
        check_parity(onnx.path, onnx.meta, onnx.sample, rtol=RTOL, atol=ATOL)
    except FleetError as exc:
        return f"OpenVINO not used: {exc}"
    return ""


def tune(
    model: ModelFile,
    *,
    backend: str,
    custom_objects: dict[str, Any] | None = None,
    safe_mode: bool = True,
    seconds: float = DEFAULT_TRIAL_S,
    verbose: bool = False,
    fleet_factory: FleetFactory,
) -> TunedPlan:
    """Run the trial, store the plan, return it. Takes `seconds` plus the slowest start-up.

    It always measures CPU workers (`devices="cpu"`), also on a GPU machine.
    """
    signature = model.signature
    synthetic_inputs(signature, 1)  # refuses what cannot be tuned, before anything starts
    cores = len(usable_cpus())
    # The default split respects the memory cap: as many 1-thread workers as fit.
    wide = make_plan(devices="cpu").workers
    one_row = row_bytes(signature.row_specs())
    began = time.perf_counter()
    table: list[dict[str, Any]] = []
    note = ""

    def record(where: str, engine: str, workers: int, threads: int, batch: int, rate: float, start_s: float) -> None:
        row = {
            "where": where,
            "engine": engine,
            "workers": workers,
            "threads": threads,
            "batch_size": batch,
            "rows_per_s": round(rate, 1),
            "start_s": round(start_s, 3),
        }
        table.append(row)
        if verbose:
            print(
                f"  {where:<10} {engine:<6} {workers} x {threads}  batch {batch:<5} {rate:>14,.0f} rows/s  start {start_s:.2f} s",
                flush=True,
            )

    def fleet_candidate(engine: str, workers: int, threads: int, batches: list[int]) -> None:
        started = time.perf_counter()
        fleet = fleet_factory(
            model.path,
            engine=engine,
            workers=workers,
            threads_per_worker=threads,
            devices="cpu",
            backend=backend,
            custom_objects=custom_objects,
            safe_mode=safe_mode,
        )
        try:
            fleet.wait_ready()
            start_s = time.perf_counter() - started
            rates = _timed_rates(lambda x, b: fleet.predict(x, batch_size=b, progress=False), signature, batches, workers)
        finally:
            fleet.close()
        for batch, rate in rates.items():
            record("workers", engine, workers, threads, batch, rate, start_s)

    onnx = None
    try:
        onnx = exporting.export(model, custom_objects=custom_objects, safe_mode=safe_mode)
    except (FleetError, ImportError) as exc:
        note = f"ONNX not used: {exc}"
        warnings.warn(f"kerasfleet: {note}", RuntimeWarning, stacklevel=2)
    if onnx is not None:
        b_onnx = default_batch_size(one_row, "cpu", "onnx")
        runner = Runner(OnnxEngine(str(onnx.path), onnx.meta, threads=cores, gpu=False))
        rows_key = signature.row_specs()

        def in_process(x: Any, batch: int) -> None:
            arrays = [x] if not isinstance(x, (dict, list)) else list(x.values()) if isinstance(x, dict) else x
            runner.predict((batch, rows_key), arrays)

        for batch, rate in _timed_rates(in_process, signature, sorted({b_onnx, min(4096, b_onnx * 4)})).items():
            record("in-process", "onnx", 1, cores, batch, rate, 0.0)
        del runner
        fleet_candidate("onnx", wide, 1, sorted({b_onnx, min(4096, b_onnx * 4)}))
        if cores > 1 and time.perf_counter() - began < seconds:
            fleet_candidate("onnx", 1, cores, [b_onnx])
        ov_note = _openvino_checked(onnx)
        if ov_note:
            note = "; ".join(n for n in (note, ov_note) if n)
        else:
            from ..engines.openvino_engine import OpenVinoEngine

            ov_runner = Runner(OpenVinoEngine(str(onnx.path), onnx.meta, threads=cores))

            def ov_in_process(x: Any, batch: int) -> None:
                arrays = [x] if not isinstance(x, (dict, list)) else list(x.values()) if isinstance(x, dict) else x
                ov_runner.predict((batch, rows_key), arrays)

            for batch, rate in _timed_rates(ov_in_process, signature, sorted({b_onnx, min(4096, b_onnx * 4)})).items():
                record("in-process", "openvino", 1, cores, batch, rate, 0.0)
            del ov_runner
            fleet_candidate("openvino", wide, 1, [b_onnx])
    fleet_candidate("keras", wide, 1, [default_batch_size(one_row, "cpu", "keras")])

    fleets = [r for r in table if r["where"] == "workers"]
    best = max(fleets, key=lambda r: r["rows_per_s"])
    inproc = max((r for r in table if r["where"] == "in-process"), key=lambda r: r["rows_per_s"], default=None)
    plan = TunedPlan(
        engine=best["engine"],
        workers=best["workers"],
        threads_per_worker=best["threads"],
        batch_size=best["batch_size"],
        rows_per_s=best["rows_per_s"],
        start_s=best["start_s"],
        in_process_rows_per_s=inproc["rows_per_s"] if inproc else None,
        in_process_batch=inproc["batch_size"] if inproc else None,
        note=note,
        table=table,
        machine=machine_facts(backend),
        in_process_engine=inproc["engine"] if inproc else "onnx",
    )
    write_atomic(plan_path(model, backend), json.dumps(asdict(plan), indent=1))
    return plan
