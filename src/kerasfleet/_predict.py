"""`kerasfleet.predict`: one call, the result `model.predict` gives.

With engine="auto" the tuned plan decides: a fleet for the call's duration, or, when starting
workers would cost more than they save for this many rows, ONNX Runtime in this process.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._fleet import Fleet, _check_batch_size
from ._inputs import Source, normalize_inputs
from ._jobs import _out_paths, check_out, job_key
from ._progress import progress_bar
from ._tune import TunedPlan

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
) -> Any:
    """Predict `x` with `model` on every core (or GPU); returns what `model.predict(x)` returns.

    `model` is a `.keras`/`.h5` path or a `keras.Model`; `x` an array, a list or dict of arrays,
    an `np.memmap` or a `.npy`/`.npz` path (memory-mapped, never read whole). With `out=` (a
    `.npy` path, or a list/dict of them) results go to disk and come back as memmaps.
    `engine`: "auto" (measured once per model and machine, then cached), "keras" or "onnx".
    Bad input is refused before any worker starts. For repeated calls keep a `Fleet`.
    """
    _check_batch_size(batch_size)
    check_out(out)
    fleet = Fleet(
        model,
        workers=workers,
        threads_per_worker=threads_per_worker,
        devices=devices,
        batch_size=batch_size,
        backend=backend,
        custom_objects=custom_objects,
        safe_mode=safe_mode,
        engine=engine,
        _start=False,
    )
    try:
        sources = normalize_inputs(x, fleet.signature)  # refused here, before any process starts
        if engine == "auto" and workers is None and threads_per_worker is None and fleet.plan.device == "cpu":
            fleet._apply_tuned_plan()
            tuned = fleet.tuned
            nbytes = sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in sources)
            if tuned is not None and nbytes <= IN_PROCESS_MAX_BYTES and tuned.use_in_process(sources[0].rows):
                return _in_process(fleet, tuned, sources, batch_size, out, progress)
        fleet._start()
        return fleet._predict(sources, batch_size, out, progress)
    finally:
        fleet.close()


def _in_process(fleet: Fleet, tuned: TunedPlan, sources: list[Source], batch_size: int | None, out: Any, progress: bool | None) -> Any:
    """ONNX Runtime on every core of this process: no worker to start, same result."""
    from ._buffers import OpenBuffer
    from ._engine import OnnxEngine
    from ._onnx import export

    onnx = export(fleet._model, custom_objects=fleet._custom_objects, safe_mode=fleet._safe_mode)
    engine = OnnxEngine(str(onnx.path), onnx.meta, threads=len(fleet.plan.usable_cpus), gpu=False)
    key = job_key(sources, batch_size or tuned.in_process_batch or tuned.batch_size)
    outputs = engine.outputs(key)
    inputs = []
    for s in sources:
        if s.array is not None:
            inputs.append(s.array)
        elif s.file is not None:
            inputs.append(OpenBuffer(s.file).array)
        else:
            assert s.npz_member is not None
            with np.load(s.npz_member[0]) as archive:
                inputs.append(archive[s.npz_member[1][:-4]])
    rows = sources[0].rows
    if out is None:
        arrays = [np.empty((rows, *o.shape), np.dtype(o.dtype)) for o in outputs.specs]
    else:
        paths = _out_paths(out, outputs)
        arrays = [np.lib.format.open_memmap(p, mode="w+", dtype=np.dtype(o.dtype), shape=(rows, *o.shape)) for p, o in zip(paths, outputs.specs)]
    bar = progress_bar(rows, progress)
    step = key[0] * 64
    try:
        for lo in range(0, rows, step):
            hi = min(rows, lo + step)
            engine.predict_rows(key, inputs, arrays, lo, hi)
            if bar is not None:
                bar.update(hi - lo)
    finally:
        if bar is not None:
            bar.close()
    if out is not None:
        for a in arrays:
            a.flush()  # type: ignore[attr-defined]
        arrays = [np.load(p, mmap_mode="r") for p in _out_paths(out, outputs)]
    return outputs.pack(arrays)
