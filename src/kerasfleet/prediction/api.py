"""`kerasfleet.predict`: one call, the result `model.predict` gives.

With engine="auto" the resolver's plan decides: a fleet for the call's duration, or, when
starting workers would cost more than they save for this many rows, ONNX Runtime in this
process (the shared in-process runner).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..cluster import check_cluster
from ..engines import row_bytes
from ..engines.model_file import resolve_model
from ..engines.onnx_engine import OnnxEngine
from ..engines.registry import EngineConfig, build_engine
from ..engines.runner import Runner
from ..runtime import make_plan
from ..tune import Resolution, check_engine, check_precision, resolve
from ..tune.precision import MAX_TOP1_DISAGREEMENT, Gate
from .calibration import InputRows
from .fleet import Fleet, check_backend, check_batch_size, fleet_options
from .inputs import Source, normalize_inputs
from .jobs import check_out, load_sources, open_out_files, source_rows
from .kept import kept_actors
from .progress import progress_bar
from .shards import check_shard_out, is_shard_folder, shard_files

# Beyond this much input, workers map the data instead: a caller reading a huge memmap would
# hold its pages in its own resident set.
IN_PROCESS_MAX_BYTES = 256 << 20


def predict(
    model: Any,
    x: Any,
    *,
    batch_size: int | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    out: Any = None,
    progress: bool | None = None,
    custom_objects: dict[str, Any] | None = None,
    devices: Any = "auto",
    backend: str | None = None,
    safe_mode: bool = True,
    engine: str = "auto",
    precision: str = "fp32",
    calibration: Any = None,
    max_top1_disagreement: float = MAX_TOP1_DISAGREEMENT,
    atol: float | None = None,
    cluster: Any = None,
) -> Any:
    """Predict `x` with `model` on every core (or GPU); returns what `model.predict(x)` returns.

    `model` is a `.keras`/`.h5` path or a `keras.Model`; `x` an array, a list or dict of arrays,
    an `np.memmap` or a `.npy`/`.npz` path (memory-mapped, never read whole). With `out=` (a
    `.npy` path, or a list/dict of them) results go to disk and come back as memmaps.
    `engine`: "auto" (measured once per model and machine, then cached), "keras", "onnx" or
    "openvino". `precision`: "fp32" (default), or "int8" / "bf16" / "fp16" when the accuracy
    gate passes (top-1 disagreement <= `max_top1_disagreement`, max abs diff <= `atol` if set)
    on held-out rows of `calibration` (default: the first rows of `x`); else `PrecisionRefused`
    with the numbers. The verdict is cached per model and machine.
    `cluster`: None (this machine), "ray" or a Ray address: the workers are Ray actors over the
    cluster's nodes, with the same engines and results (see `kerasfleet.cluster`); inside
    `kerasfleet.keep_actors()` they are kept for the next calls of the block.
    Bad input is refused before any worker starts. For repeated calls keep a `Fleet`.
    """
    check_batch_size(batch_size)
    shards = is_shard_folder(x)  # a folder of .npy shards in, a folder out: always a fleet
    if not shards:
        check_out(out)
    check_engine(engine)
    check_precision(precision, engine)
    Gate(max_top1_disagreement, atol)
    check_backend(backend)
    check_cluster(cluster)
    if cluster is None:
        make_plan(workers, threads_per_worker, devices=devices)  # refuses a bad plan before any work
    model_file = resolve_model(model, custom_objects)
    try:
        if shards:
            check_shard_out(x, out)
            shard_files(x)
            sources = normalize_inputs(str(shard_files(x)[0]), model_file.signature)
        else:
            sources = normalize_inputs(x, model_file.signature)  # refused here, before any process starts
        options = fleet_options(
            engine=engine,
            workers=workers,
            threads_per_worker=threads_per_worker,
            devices=devices,
            batch_size=batch_size,
            backend=backend,
            custom_objects=custom_objects,
            safe_mode=safe_mode,
        )
        if precision != "fp32":
            options.update(
                precision=precision,
                calibration=calibration if calibration is not None else InputRows(sources),
                max_top1_disagreement=max_top1_disagreement,
                atol=atol,
            )
        elif cluster is None and not shards:
            local = in_process_for(model_file, options, sources[0].rows, sources[0].rows * row_bytes(source_rows(sources)))
            if local is not None:
                return local.predict(sources, out, progress)
        kept = kept_actors() if cluster is not None else None
        if kept is not None:  # inside keep_actors(): the previous call's actors, or kept for the next
            return kept.fleet(model_file, cluster, options).predict(x, batch_size=batch_size, out=out, progress=progress)
        with Fleet(model_file, cluster=cluster, **options) as fleet:
            return fleet.predict(x, batch_size=batch_size, out=out, progress=progress)
    finally:
        model_file.cleanup()


def in_process_for(model_file: Any, options: dict[str, Any], rows: int, nbytes: int) -> InProcess | None:
    """The plan's in-process engine when it wins for this many rows, else None (use a fleet).

    Only for `engine="auto"` with no worker counts given, on a CPU plan, and at most
    IN_PROCESS_MAX_BYTES of input: the resolver's tuned plan says whether running here beats
    starting workers (their start against the two rates)."""
    if options["engine"] != "auto" or options["workers"] is not None or options["threads_per_worker"] is not None:
        return None
    res = resolve(model_file, fleet_factory=Fleet, **options)
    if res.plan.device == "cpu" and nbytes <= IN_PROCESS_MAX_BYTES and res.in_process_wins(rows):
        return InProcess(model_file, res, options["batch_size"], options["custom_objects"], options["safe_mode"])
    return None


class InProcess:
    """The plan's in-process engine (ONNX Runtime or OpenVINO) on every core of this process:
    no worker to start, the same result as a fleet's."""

    def __init__(self, model_file: Any, res: Resolution, batch_size: int | None, custom_objects: Any, safe_mode: bool) -> None:
        from ..tune.resolver import export_for

        assert res.tuned is not None
        engine = res.tuned.in_process_engine
        onnx = export_for(engine, model_file, custom_objects, safe_mode)
        assert onnx is not None
        # ONNX Runtime built directly: the caller's CUDA_VISIBLE_DEVICES must not move a CPU plan to a GPU.
        threads = len(res.plan.usable_cpus)
        config = EngineConfig(
            name=engine,
            model_path=str(model_file.path),
            input_structure=model_file.signature.structure,
            input_names=None,
            custom_objects=None,
            modules=(),
            safe_mode=safe_mode,
            threads=threads,
            onnx_path=str(onnx.path),
            onnx_meta=onnx.meta,
        )
        self.signature = model_file.signature
        self.batch_size = batch_size or res.tuned.in_process_batch or res.tuned.batch_size
        self.runner = Runner(
            OnnxEngine(str(onnx.path), onnx.meta, threads=threads, gpu=False) if engine == "onnx" else build_engine(config)
        )

    def predict(self, x: Any, out: Any = None, progress: bool | None = None) -> Any:
        """What `model.predict(x)` returns; `x` as `predict` takes it (or already normalized sources)."""
        sources = x if _is_sources(x) else normalize_inputs(x, self.signature)
        key = (self.batch_size, source_rows(sources))
        outputs = self.runner.outputs(key)
        rows = sources[0].rows
        paths, arrays = open_out_files(out, outputs, rows) if out is not None else (None, None)
        bar = progress_bar(rows, progress)
        try:
            result = self.runner.predict(key, load_sources(sources), arrays, bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        if paths is not None:
            for a in result:
                if isinstance(a, np.memmap):  # zero rows give plain (empty) arrays
                    a.flush()
            result = [np.load(p, mmap_mode="r") for p in paths]
        return outputs.pack(result)


def _is_sources(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(s, Source) for s in x)
