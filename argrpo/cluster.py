"""Starting or joining a Ray cluster with safe defaults (dashboard off, loopback only, no auth token files), and
where actors go in it (custom resources, pack or spread).

Multi-node: start Ray on each machine (``ray start --head`` on one, ``ray start --address HEAD:6379`` on the others,
``--resources '{"rollout": 4}'`` to label nodes), then pass ``--ray-address HEAD:6379`` (or set ``RAY_ADDRESS``)
to ``argrpo grpo | pipeline | sweep``. Rollout and reward actors are then placed on the cluster's nodes by the
resources they ask for (``num_cpus``, ``num_gpus``, ``custom_resources``) and their ``placement``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import field
from typing import Literal

PLACEMENTS = ("pack", "spread")
Placement = Literal["pack", "spread"]
# Ray refuses these in ``resources=`` (they have their own actor options)
_BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}


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


def validate_custom_resources(resources: Mapping, where: str) -> dict[str, float]:
    """Check a ``{name: amount}`` map of Ray custom resources (config time, no Ray needed); returns it as floats."""
    if not isinstance(resources, Mapping):
        raise ValueError(f"{where}: expected a mapping of resource name -> amount, got {type(resources).__name__}")
    out = {}
    for name, amount in resources.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: resource names must be non-empty strings, got {name!r}")
        if name in _BUILTIN_RESOURCES:
            raise ValueError(f"{where}: {name!r} is not a custom resource; use the num_cpus / num_gpus settings")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
            raise ValueError(f"{where}: {name!r} must be a positive number, got {amount!r}")
        out[name] = float(amount)
    return out


def custom_resources_field(actor: str, example: str):
    """A config field: the Ray custom resources each ``actor`` reserves (``example`` names a node label)."""
    return field(
        default_factory=dict,
        metadata={"help": f"Ray custom resources each {actor} reserves, e.g. {{{example}: 1}} to run only on nodes "
                          f"started with `ray start --resources '{{\"{example}\": N}}'` (N such actors fit on a node)"})


def placement_field(actors: str):
    """A config field: how ``actors`` spread over the nodes of a Ray cluster."""
    return field(
        default="pack",
        metadata={"help": "pack: Ray's default scheduler (the driver's node first, others once it is about half "
                          f"used); spread: Ray's SPREAD strategy, {actors} round the nodes that have room"})


def validate_placement(placement: str, where: str) -> str:
    if placement not in PLACEMENTS:
        raise ValueError(f"{where}: unknown placement {placement!r}; valid: {list(PLACEMENTS)}")
    return placement


def scheduling_options(custom_resources: Mapping[str, float] | None, placement: str = "pack") -> dict:
    """Ray actor options that place an actor: its custom resources and scheduling strategy.

    pack: Ray's default (hybrid) strategy: the local node first, other nodes once it is about half used;
    spread: Ray's SPREAD strategy: actors go round the nodes that have room, best effort.
    """
    validate_placement(placement, "placement")
    opts: dict = {"scheduling_strategy": "SPREAD" if placement == "spread" else "DEFAULT"}
    if custom_resources:
        opts["resources"] = dict(custom_resources)
    return opts


def check_cluster_offers(resources: Mapping[str, float], where: str) -> None:
    """Fail fast, naming the resource, when no live node of the cluster offers a custom resource in the amount one
    actor asks for (Ray would otherwise keep the actor pending forever)."""
    import ray

    if not resources:
        return
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for name, amount in resources.items():
        if not any(node.get(name, 0.0) >= amount for node in nodes):
            offered = sorted({k for node in nodes for k in node
                              if k not in _BUILTIN_RESOURCES and not k.startswith("node:")})
            raise ValueError(f"{where}: custom resource {name!r} x {amount:g} is not offered by any node of the Ray "
                             f"cluster (custom resources there: {offered or 'none'}); start nodes with "
                             f"`ray start --resources '{{\"{name}\": N}}'`")
