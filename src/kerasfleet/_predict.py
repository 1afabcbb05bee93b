"""`kerasfleet.predict`: one call, a fleet for its duration, the result `model.predict` gives."""

from __future__ import annotations

from typing import Any

from ._fleet import Fleet, _check_batch_size
from ._inputs import normalize_inputs
from ._jobs import check_out


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
    engine: str = "keras",
) -> Any:
    """Predict `x` with `model` on every core (or GPU); returns what `model.predict(x)` returns.

    `model` is a `.keras`/`.h5` path or a `keras.Model`; `x` an array, a list or dict of arrays,
    an `np.memmap` or a `.npy`/`.npz` path (memory-mapped, never read whole). With `out=` (a
    `.npy` path, or a list/dict of them) results go to disk and come back as memmaps.
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
        fleet._start()
        return fleet._predict(sources, batch_size, out, progress)
    finally:
        fleet.close()
