"""The user cache: where exports and tuned plans live, how they are keyed, written and locked.

    <cache>/onnx/<key>.onnx + .json     checked exports (and .refused.json for refusals)
    <cache>/plans/<key>.json            tuned plans per model and machine

`<cache>` is `$KERASFLEET_CACHE_DIR`, else `$XDG_CACHE_HOME/kerasfleet`, else
`~/.cache/kerasfleet`. Files are written to a temporary name and renamed (a reader sees a whole
file or none), and work that fills an entry runs under an exclusive lock on a `.lock` file, so
two processes never export or tune the same model at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("KERASFLEET_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "kerasfleet"
    )
    return Path(root)


def model_hash(path: Path) -> str:
    """The model's identity: for a .keras zip its config and weights, not the save date.

    `metadata.json` records when the file was saved, so an in-memory model saved again for each
    call would otherwise never find its exported file or tuned plan. Both the plan and the
    export look the hash up in one call, so it is remembered per file version.
    """
    stat = os.stat(path)
    return _hash_file(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _hash_file(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for name in sorted(zf.namelist()):
                if name != "metadata.json":
                    digest.update(name.encode())
                    with zf.open(name) as f:
                        for block in iter(lambda: f.read(1 << 20), b""):
                            digest.update(block)
    else:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


def short_hash(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `path` whole or not at all: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` + ".lock", held across processes (flock) until the block ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
