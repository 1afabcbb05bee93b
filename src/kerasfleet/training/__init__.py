"""Training: a multi-process input loader for `fit`, and data-parallel training per backend.

loader.py    Loader: a keras.utils.PyDataset whose batches are made in warm workers
loading.py   the loader workers' side: the dataset's copy, `dataset[i]` per task
batches.py   a batch as a tree plus arrays, written to and read from shared memory
parallel.py  data_parallel() and devices(): DataParallel on JAX, MirroredStrategy on TF
"""

from typing import TYPE_CHECKING, Any

__all__ = ["Loader", "data_parallel", "devices"]

if TYPE_CHECKING:
    from .loader import Loader
    from .parallel import data_parallel, devices


def __getattr__(name: str) -> Any:
    # Lazily: the loader's workers import this package and must not import Keras for it.
    if name == "Loader":
        from .loader import Loader

        return Loader
    if name in ("data_parallel", "devices"):
        from .parallel import data_parallel, devices

        return {"data_parallel": data_parallel, "devices": devices}[name]
    raise AttributeError(f"module 'kerasfleet.training' has no attribute {name!r}")
