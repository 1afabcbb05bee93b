"""JAX's persistent compilation cache, shared by a fleet's worker processes.

Keras on JAX compiles a new model's train and test steps with XLA every time it is built, even
when an earlier model had the same architecture: `jax.jit`'s in-memory caches are keyed by the
function object, and each model makes new ones. A sweep's trials are exactly that - the same
architecture again and again - and on a small model compiling costs more than training (0.6 of
0.9 s a trial, bench/sweep.py's MLP). JAX's persistent cache is keyed by the compiled program
(HLO, compile options, flags, jaxlib version), so a program compiled by one trial, in any
worker, is read back by every later trial of that architecture: the same executable, so the
same numbers. By default JAX only stores programs that took over a second to compile; here
every one is, as a small model's few 0.1-0.3 s compiles are the point.

The cache is bounded (JAX evicts the least recently used entries); eviction is what makes JAX
take a file lock around reads and writes (it needs the `filelock` package), so workers writing
the same entry at once never read a half-written file. Without `filelock` no cache is set up.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from ..cache import cache_dir
from ..errors import InputError

# Bound on the folder: small models' executables are 0.1-5 MB each.
MAX_BYTES = 1 << 30


def compile_cache_env(setting: Any) -> dict[str, str]:
    """Environment for workers: `True` (the kerasfleet cache folder, unless the caller's
    environment already names a JAX cache), a folder, or `False` (no persistent cache)."""
    if setting is False:
        return {"JAX_ENABLE_COMPILATION_CACHE": "false"}
    if setting is True:
        if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
            return {}  # the user's own cache, with their own settings
        folder = (cache_dir() / "jax-compile").expanduser().resolve()  # workers may start in another folder
    else:
        folder = Path(setting).expanduser().resolve()
    if importlib.util.find_spec("filelock") is None:
        return {}  # JAX's bounded cache needs it (the jax and sweep extras install it)
    if setting is True and not _writable(folder):
        # JAX would warn about it in every worker (and fail a compile under
        # PYTHONWARNINGS=error): the default cache is a speed-up, not worth either. A folder
        # the user named was checked by check_compile_cache, before any work.
        return {}
    settings = {
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "JAX_COMPILATION_CACHE_MAX_SIZE": str(MAX_BYTES),
    }
    # Bounds and thresholds the user set in the environment win over these.
    return {"JAX_COMPILATION_CACHE_DIR": str(folder), **{k: v for k, v in settings.items() if k not in os.environ}}


def check_compile_cache(setting: Any) -> Any:
    """`compile_cache=` as given, or an InputError saying what it takes."""
    if isinstance(setting, bool):
        return setting
    if isinstance(setting, (str, os.PathLike)) and os.fspath(setting):
        folder = Path(setting).expanduser()
        if folder.exists() and not folder.is_dir():
            raise InputError(f"Expected compile_cache to be a folder. Received: {os.fspath(setting)!r}, a file.")
        if not _writable(folder):
            raise InputError(f"Expected compile_cache to be a folder kerasfleet can write to. Received: {os.fspath(setting)!r}.")
        return setting
    raise InputError(
        "Expected compile_cache to be True (kerasfleet's cache folder), False, or a folder path. "
        f"Received: compile_cache={setting!r}."
    )


def _writable(folder: Path) -> bool:
    """The folder exists (made if need be) and this process may write in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.access(folder, os.W_OK | os.X_OK)
    except OSError:
        return False
