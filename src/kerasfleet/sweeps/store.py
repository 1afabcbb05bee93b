"""The sweep's store: one SQLite file, written only by the caller's process, one commit per trial.

    sweep() (the one writer)                       runs.sqlite (WAL)           readers
    ────────────────────────                       ─────────────────           ───────
    open: lock runs.sqlite.lock, check the         meta: format, version, fn   kerasfleet results
          function, read finished keys ────────►   trials: key (primary),      (any time, also
    each trial that ends ─► record(row) ─► COMMIT    config, seed, status,      while a sweep
                                                     metrics, started, ended,   writes: WAL)
                                                     duration, worker_pid,
                                                     error, attempts

- A trial's key is a hash of (function name, config, seed) (spec.trial_key), so running the same
  sweep again finds what is finished and skips it. Statuses: done, failed (an exception, or a
  result that is not a dict of numbers), timeout (killed at its deadline), crashed (its worker
  died). A re-run skips done trials, and the others unless `retry_failed`; a trial run again
  replaces its row (`attempts` counts the runs).
- Each row is committed as the trial ends. WAL with synchronous=NORMAL makes a commit survive
  the death of the process (SIGKILL, the OOM killer) - it is in the WAL file the moment COMMIT
  returns; only a power cut may lose the last commits.
- One function per store: a store written for another function is refused (its trials would
  mean something else). Two sweeps on one store at once are refused (an flock on
  `<store>.lock`, released by the kernel even when the process is killed).
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterable
from typing import Any

from ..errors import InputError

FORMAT = "kerasfleet-sweep"
VERSION = "1"
STATUSES = ("done", "failed", "timeout", "crashed")
COLUMNS = ("key", "config", "seed", "status", "metrics", "started", "ended", "duration", "worker_pid", "error", "attempts")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    key TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('done', 'failed', 'timeout', 'crashed')),
    metrics TEXT,
    started REAL,
    ended REAL,
    duration REAL,
    worker_pid INTEGER,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 1
);
"""


class Store:
    """The trials of one function; `path=None` keeps them in memory (no resume)."""

    def __init__(self, path: str | os.PathLike[str] | None, fn_name: str) -> None:
        self.path = None if path is None else os.fspath(path)
        self.fn_name = fn_name
        self._lock_fd: int | None = None
        if self.path is not None:
            folder = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(folder):
                raise InputError(f"Expected store to be a path in an existing folder. Received: store={self.path!r}.")
            self._lock()
        try:
            self._db = _connect(self.path if self.path is not None else ":memory:", create=True)
            _check_format(self._db, self.path)
            with self._db:
                self._db.executescript(_SCHEMA)
                meta = dict(self._db.execute("SELECT name, value FROM meta").fetchall())
                if not meta:
                    self._db.executemany(
                        "INSERT INTO meta VALUES (?, ?)",
                        [("format", FORMAT), ("version", VERSION), ("fn", fn_name), ("created", str(time.time()))],
                    )
                elif meta.get("fn") != fn_name:
                    raise InputError(
                        f"Expected store {self.path!r} to hold trials of {fn_name} (one function per store). "
                        f"Received: a store written for {meta.get('fn')}. Pass another store= path, or delete the file to start over."
                    )
        except BaseException:
            self.close()
            raise

    def get(self, key: str) -> dict[str, Any] | None:
        found = self.rows([key])
        return found[0] if found else None

    def record(self, row: dict[str, Any]) -> None:
        """Write one ended trial and commit (a re-run replaces the row and counts the attempt)."""
        if row["status"] not in STATUSES:
            raise ValueError(f"Expected a status among {STATUSES}. Received: {row['status']!r}.")
        values = (
            row["key"],
            json.dumps(row["config"], sort_keys=True, separators=(",", ":")),
            row["seed"],
            row["status"],
            None if row.get("metrics") is None else json.dumps(row["metrics"]),
            row.get("started"),
            row.get("ended"),
            row.get("duration"),
            row.get("worker_pid"),
            row.get("error"),
        )
        with self._db:  # one transaction, committed on exit
            self._db.execute(
                "INSERT INTO trials (key, config, seed, status, metrics, started, ended, duration, worker_pid, error) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                "config = excluded.config, seed = excluded.seed, status = excluded.status, metrics = excluded.metrics, "
                "started = excluded.started, ended = excluded.ended, duration = excluded.duration, "
                "worker_pid = excluded.worker_pid, error = excluded.error, attempts = trials.attempts + 1",
                values,
            )

    def rows(self, keys: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Rows as dicts, in the order of `keys` (missing keys are left out), or all by end time."""
        return _rows(self._db, keys)

    def close(self) -> None:
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()
            self._db = None  # type: ignore[assignment]
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _lock(self) -> None:
        assert self.path is not None
        lock_path = f"{self.path}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(
                f"Expected no other sweep to be writing store {self.path!r}. Received: another running process holds its "
                f"lock ({lock_path}). Wait for that sweep to end, or pass another store= path."
            ) from None
        self._lock_fd = fd


def read_store(path: str | os.PathLike[str]) -> tuple[str, list[dict[str, Any]]]:
    """(function name, every row) of a store, for `kerasfleet results`; works while a sweep writes it."""
    text = os.fspath(path)
    if not os.path.isfile(text):
        raise InputError(f"Expected a sweep store (a .sqlite file written by kerasfleet.sweep). Received: no file {text!r}.")
    db = _connect(text, create=False)
    try:
        _check_format(db, text)
        try:
            meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
        except sqlite3.OperationalError:
            meta = {}
        if meta.get("format") != FORMAT:
            raise InputError(f"Expected a sweep store written by kerasfleet.sweep. Received: {text!r} has no sweep tables.")
        return meta.get("fn", "?"), _rows(db, None)
    finally:
        db.close()


def _connect(path: str, *, create: bool) -> sqlite3.Connection:
    try:
        if create or path == ":memory:":
            db = sqlite3.connect(path, timeout=30.0)
        else:
            db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=30.0)
        # WAL: readers (kerasfleet results) never block the writer; NORMAL: a commit is in the
        # WAL file when it returns (it survives the process being killed) without an fsync per
        # trial. Both only matter for a file; ":memory:" ignores them.
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.Error as exc:
        raise InputError(f"Expected store to be a SQLite file kerasfleet can open. Received: {path!r}: {exc}.") from None
    return db


def _check_format(db: sqlite3.Connection, path: str | None) -> None:
    """A file that holds other tables is somebody else's database: never write into it."""
    try:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        meta = dict(db.execute("SELECT name, value FROM meta").fetchall()) if "meta" in tables else {}
    except sqlite3.DatabaseError as exc:
        raise InputError(f"Expected store to be a SQLite file kerasfleet can open. Received: {path!r}: {exc}.") from None
    if tables and meta.get("format") != FORMAT:
        raise InputError(
            f"Expected a sweep store written by kerasfleet.sweep. Received: {path!r} holds other tables ({sorted(tables)}); "
            "pass another store= path."
        )


def _rows(db: sqlite3.Connection, keys: Iterable[str] | None) -> list[dict[str, Any]]:
    select = f"SELECT {', '.join(COLUMNS)} FROM trials"
    if keys is None:
        found = db.execute(select + " ORDER BY ended, key").fetchall()
        return [_row(values) for values in found]
    wanted = list(keys)
    by_key: dict[str, dict[str, Any]] = {}
    # SQLite caps the number of parameters per statement: ask in slices.
    for i in range(0, len(wanted), 500):
        part = wanted[i : i + 500]
        query = select + f" WHERE key IN ({', '.join('?' * len(part))})"
        by_key.update((values[0], _row(values)) for values in db.execute(query, part).fetchall())
    return [by_key[k] for k in wanted if k in by_key]


def _row(values: tuple[Any, ...]) -> dict[str, Any]:
    row = dict(zip(COLUMNS, values))
    row["config"] = json.loads(row["config"])
    row["metrics"] = None if row["metrics"] is None else json.loads(row["metrics"])
    return row
