"""A folder of `.npy` shards in, a folder of `.npy` shards out: datasets larger than one machine.

    kerasfleet.predict("model.keras", "shards/", out="preds/")        # or Fleet.predict(...)

Every `*.npy` in the input folder (sorted by name: the order of the results) is one piece of a
single-input model's rows. Each is predicted on the same warm fleet - its rows memory-mapped,
never read whole, chunks spread over every worker (or, with `cluster=`, every actor, which map
the shard by path: the folders must be on storage every node reads) - and written to the output
folder under the same name, through a memory map. A multi-output model writes one subfolder per
output (`preds/<output name>/<shard>.npy`). Nothing is held in memory but the chunks in flight,
so neither the inputs nor the results need to fit anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError


def is_shard_folder(x: Any) -> bool:
    return isinstance(x, (str, Path)) and Path(x).expanduser().is_dir()


def shard_files(folder: Any) -> list[Path]:
    files = sorted(p for p in Path(folder).expanduser().iterdir() if p.suffix.lower() == ".npy" and p.is_file())
    if not files:
        raise InputError(f"Expected a folder of .npy shards. Received: {str(folder)!r}, which holds no .npy file.")
    return files


def check_shard_out(folder: Any, out: Any) -> Path:
    """The output folder (created), refused before any work when it cannot be one."""
    if out is None or not isinstance(out, (str, Path)):
        raise InputError(
            f"Expected out= a folder for the results of a folder of shards ({str(folder)!r}). Received: out={out!r}. "
            "Each input shard gets a result shard of the same name there."
        )
    target = Path(out).expanduser()
    if target.suffix.lower() == ".npy" or (target.exists() and not target.is_dir()):
        raise InputError(f"Expected out= a folder (existing or not) for a folder of shards. Received: out={str(out)!r}.")
    if target.resolve() == Path(folder).expanduser().resolve():
        raise InputError(f"Expected out= a folder other than the input folder. Received: out={str(out)!r} for both.")
    target.mkdir(parents=True, exist_ok=True)
    return target


def predict_shards(fleet: Any, folder: Any, out: Any, batch_size: int | None, progress: bool | None) -> list[Any]:
    """Predict every shard on `fleet` (a `Fleet`); returns, per shard in order, the paths written."""
    files = shard_files(folder)
    target = check_shard_out(folder, out)
    for f in files:  # every shard's header is checked before the first one runs
        _check_header(f, fleet)
    written: list[Any] = []
    for f in files:
        # A model whose outputs cannot be known ahead (no fixed input shapes) is taken as
        # single-output: a multi-output one is then refused by out='s own check, clearly.
        outputs = fleet.outputs(int(np.load(f, mmap_mode="r").shape[0]) or None, batch_size) if fleet.signature.fixed else None
        names = [o.name for o in outputs.specs] if outputs is not None else ["output_0"]
        if len(names) == 1:
            dest: Any = str(target / f.name)
        else:
            for name in names:
                (target / name).mkdir(exist_ok=True)
            paths = [str(target / name / f.name) for name in names]
            dest = dict(zip(names, paths)) if outputs is not None and outputs.structure == "dict" else paths
        fleet.predict(str(f), out=dest, batch_size=batch_size, progress=progress)
        written.append(dest)
    return written


def _check_header(path: Path, fleet: Any) -> None:
    specs = fleet.signature.inputs
    if specs is not None and len(specs) != 1:
        raise InputError(
            f"Expected a single-input model for a folder of shards. Received: a model with {len(specs)} inputs; "
            "predict each shard's .npz (one member per input) instead."
        )
    try:
        shape = np.load(path, mmap_mode="r").shape
    except (ValueError, OSError) as exc:
        raise InputError(f"Expected every shard to be a readable .npy array. Received: {str(path)!r} ({exc}).") from exc
    if specs is not None:
        want, rows = tuple(specs[0].shape), tuple(shape[1:])
        if len(shape) < 1 or len(rows) != len(want) or any(d is not None and d != s for d, s in zip(want, rows)):
            raise InputError(
                f"Expected every shard's rows to have shape {want}. Received: {str(path)!r} with rows of shape {tuple(shape[1:])}."
            )
