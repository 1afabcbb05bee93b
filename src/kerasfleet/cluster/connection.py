"""`cluster=`: checked before any work, then Ray imported (only here) and connected."""

from __future__ import annotations

import logging
import re
import socket
from typing import TYPE_CHECKING, Any

from ..errors import FleetError, InputError

if TYPE_CHECKING:
    from .ray_backend import RayCluster

_ADDRESS = re.compile(r"^(auto|local|ray://[\w.\-\[\]:]+(:\d+)?|[\w.\-]+:\d+)$")
_CONNECT_TIMEOUT_S = 5.0
_HOW = "None (this machine), 'ray' (the running Ray cluster, or a local one) or a Ray address ('host:6379', 'ray://host:10001', 'auto')"


def check_cluster(cluster: Any) -> None:
    """Refuse a malformed `cluster=` before any work starts (without importing Ray)."""
    if cluster is None:
        return
    if not isinstance(cluster, str) or not (cluster == "ray" or _ADDRESS.match(cluster)):
        raise InputError(f"Expected cluster to be {_HOW}. Received: cluster={cluster!r}.")


def connect(cluster: Any) -> RayCluster:
    """The Ray cluster `cluster=` names; Ray is imported here and nowhere else.

    A Ray already initialised in this process (`ray.init(...)` by the caller) is used as it
    is. `"ray"` connects to the cluster of this machine (`ray start`, or `RAY_ADDRESS`) or,
    if there is none, starts a local one for this process; an address connects there.
    """
    check_cluster(cluster)
    try:
        import ray
    except ImportError as exc:
        raise InputError(
            f"Expected the `ray` extra to be installed for cluster={cluster!r}. Received: {exc}. "
            "Install it with pip install 'kerasfleet[ray]', or pass cluster=None to run on this machine."
        ) from None
    from .ray_backend import RayCluster

    if not ray.is_initialized():
        _check_reachable(cluster)
        try:
            if cluster == "ray":
                try:
                    ray.init(address="auto", logging_level=logging.WARNING)
                except ConnectionError:
                    ray.init(logging_level=logging.WARNING)  # no cluster running here: a local one
            else:
                ray.init(address=cluster, logging_level=logging.WARNING)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise FleetError(
                f"Expected a running Ray cluster at cluster={cluster!r}. Received: {type(exc).__name__}: {exc}. "
                "Start one with `ray start --head` (then pass 'auto' or its address), or pass cluster='ray'."
            ) from exc
    return RayCluster(ray)


def _check_reachable(cluster: str) -> None:
    """A TCP connect to a `host:port` address first: Ray itself retries an address where nothing
    listens for minutes before it gives up."""
    if cluster in ("ray", "auto", "local"):
        return
    host, _, port = cluster.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=_CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:
        raise FleetError(
            f"Expected a running Ray cluster at cluster={cluster!r}. Received: {type(exc).__name__}: {exc}. "
            "Check the address (`ray status` on the head node prints it), or start one with `ray start --head`."
        ) from exc
