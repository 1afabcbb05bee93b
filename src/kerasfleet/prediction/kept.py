"""`keep_actors()`: one-shot `predict(..., cluster=)` calls that reuse the previous call's actors.

    with kerasfleet.keep_actors():
        for part in parts:
            y = kerasfleet.predict("model.keras", part, cluster="ray")   # actors started once

A one-shot call on a cluster starts its actors and stops them when it returns; most of its
fixed cost is Ray starting their processes (see docs/benchmarks.md). Inside the block, a
call's fleet is kept, and the next call with the same model contents, `cluster=` and options
uses it; leaving the outermost block closes it (nothing outlives the block). One fleet is
kept at a time: a call with another model or options closes the kept one before it starts
its own, whose actors would otherwise wait for the cores the kept ones hold. Opt-in only:
outside a block, nothing is kept. A `Fleet(cluster=...)` held by the caller does the same
for one model. The kept fleets (`keep_actors() as scope`, `scope.fleets()`) are for
predictions: for an in-memory model their `model_path` is the temporary copy the first call
removed once its files were shipped.

No Ray import here: the fleets import it when they connect.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..cache import model_hash

if TYPE_CHECKING:
    from ..engines.model_file import ModelFile
    from .fleet import Fleet


class KeptActors:
    """The fleet kept by the open `keep_actors()` block, by model contents, cluster and options."""

    def __init__(self) -> None:
        self._fleets: dict[tuple[str, str, str], Fleet] = {}
        self._lock = threading.Lock()

    def fleet(self, model_file: ModelFile, cluster: Any, options: dict[str, Any]) -> Fleet:
        """The kept fleet for this call, started on first use (or again, if it broke)."""
        from .fleet import Fleet

        key = (model_hash(model_file.path), repr(cluster), repr(sorted(options.items())))
        with self._lock:
            fleet = self._fleets.get(key)
            if fleet is None or not fleet.usable:
                check_fleet_options(cluster, options)  # bad input refused before the kept fleet is closed
                for other in self._fleets.values():  # their actors hold the cores the new ones need
                    other.close()
                self._fleets.clear()
                # A cluster fleet reads its model's files once, while it starts (they are
                # shipped through the object store), so the caller may delete a temporary copy.
                fleet = self._fleets[key] = Fleet(model_file, cluster=cluster, **options)
            return fleet

    def fleets(self) -> list[Fleet]:
        with self._lock:
            return list(self._fleets.values())

    def close(self) -> None:
        with self._lock:
            fleets, self._fleets = list(self._fleets.values()), {}
        for fleet in fleets:
            fleet.close()


def check_fleet_options(cluster: Any, options: dict[str, Any]) -> None:
    """What `Fleet(cluster=...)` refuses before it starts anything: checked without starting."""
    from ..cluster import connect
    from .fleet import check_fleet_options

    check_fleet_options(options)
    connect(cluster).plan(options["workers"], options["threads_per_worker"], options["devices"])


_scope: KeptActors | None = None
_depth = 0
_scope_lock = threading.Lock()


def kept_actors() -> KeptActors | None:
    """The open block's fleets, or None outside any `keep_actors()` block."""
    return _scope


@contextlib.contextmanager
def keep_actors() -> Iterator[KeptActors]:
    """Keep each one-shot `predict(..., cluster=)` call's actors for the next calls of the block.

    Process-wide (calls from any thread use it); nested blocks share the outermost one's
    fleet, closed when it ends. Calls from several threads at once should use one model and
    options: a call with others closes the fleet the running ones use.
    """
    global _scope, _depth
    with _scope_lock:
        if _scope is None:
            _scope = KeptActors()
        _depth += 1
        scope = _scope
    try:
        yield scope
    finally:
        with _scope_lock:
            _depth -= 1
            done = _scope if _depth == 0 else None
            if done is not None:
                _scope = None
        if done is not None:
            done.close()
