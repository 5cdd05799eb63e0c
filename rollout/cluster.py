"""Starting or joining a Ray cluster with safe defaults (dashboard off, loopback only, no auth token files)."""

from __future__ import annotations

import os


def init_ray(address: str | None = None, num_cpus: int | None = None, timeout_s: float = 30.0, **kwargs):
    """Join ``address`` (or ``RAY_ADDRESS``) if given, else start a local cluster.

    The dashboard is off and a local head binds to 127.0.0.1; an address that does not answer raises
    ``ConnectionError`` naming it instead of hanging.
    """
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    common = dict(include_dashboard=False, log_to_driver=True, ignore_reinit_error=True, logging_level="WARNING")
    common.update(kwargs)
    if address and address != "local":
        _check_reachable(address, timeout_s)
        ray.init(address=address, **common)
    else:
        os.environ.pop("RAY_ADDRESS", None)
        _loopback_only(ray)
        # "local" always starts a new cluster: without it ray.init joins whatever cluster another process recorded
        # in <ray temp dir>/ray_current_cluster (`ray start`, ray.cluster_utils), or fails when that one is gone
        ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", **common)
    return ray


def _loopback_only(ray) -> None:
    """Make a local cluster's servers (GCS, raylet, workers, agents) listen on 127.0.0.1 only.

    Ray turns ``_node_ip_address="127.0.0.1"`` into the machine's routable address and then binds its gRPC servers
    on every interface, unless its cluster mode is off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, what Ray does on
    laptops). The variable is read when ray is imported: set it for the processes Ray starts, and in this process
    too when ray was imported before it was set.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = ray._private.ray_constants
    if constants.ENABLE_RAY_CLUSTER:
        constants.ENABLE_RAY_CLUSTER = False


def _check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast with a clear message when a ``host:port`` Ray address does not answer."""
    import socket

    target = address.split("://", 1)[-1]
    if target == "auto" or ":" not in target:
        return
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=min(timeout_s, 5.0)):
            pass
    except (OSError, ValueError) as e:
        raise ConnectionError(f"Ray address {address!r} does not answer ({e})") from e


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
