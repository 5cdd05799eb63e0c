"""Starting or joining a Ray cluster with safe defaults (dashboard off, loopback only, no auth token files), and
where actors go in it (custom resources, pack or spread).

Multi-node: start Ray on each machine (``ray start --head`` on one, ``ray start --address HEAD:6379`` on the others,
``--resources '{"rollout": 4}'`` to label nodes), then pass ``--ray-address HEAD:6379`` (or set ``RAY_ADDRESS``)
to ``argrpo grpo | pipeline | sweep``. Rollout and reward actors are then placed on the cluster's nodes by the
resources they ask for (``num_cpus``, ``num_gpus``, ``custom_resources``) and their ``placement``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from argrpo.errors import UserError

logger = logging.getLogger(__name__)

PLACEMENTS = ("pack", "spread")
Placement = Literal["pack", "spread"]
# Ray refuses these in ``resources=`` (they have their own actor options)
_BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}
DEFAULT_PENDING_TIMEOUT_S = 600.0
PENDING_WARN_S = 30.0  # the first "still waiting for resources" warning, then one per such interval
# whether this process started the Ray cluster it is connected to (None: not connected through init_ray)
_started_local: bool | None = None


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
    global _started_local
    if address and address != "local":
        _check_reachable(address, timeout_s)
        ray.init(address=address, **common)
        _started_local = False
    else:
        os.environ.pop("RAY_ADDRESS", None)
        _loopback_only(ray)
        # "local" always starts a new cluster: without it ray.init joins whatever cluster another process recorded
        # in <ray temp dir>/ray_current_cluster (`ray start`, ray.cluster_utils), or fails when that one is gone
        ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", **common)
        _started_local = True
    return ray


def is_local_cluster() -> bool:
    """Whether the connected Ray cluster was started by this process (``init_ray`` without an address): no node will
    join it, so a request it cannot meet now never will be. A joined cluster (or one Ray Tune connected a trial to)
    may still grow."""
    return bool(_started_local)


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

    global _started_local
    if ray.is_initialized():
        ray.shutdown()
    _started_local = None


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


# ---- resource requests --------------------------------------------------------------------------------------------
class ResourceRequestError(UserError, ValueError):
    """The actors a run asks for cannot be placed on the Ray cluster; the message names the numbers and config keys."""


@dataclass(frozen=True)
class ActorRequest:
    """``count`` Ray actors of one kind and what each one reserves; ``keys``: the config keys that set them."""

    what: str
    count: int
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    custom_resources: Mapping[str, float] = field(default_factory=dict)
    keys: tuple[str, ...] = ()

    def per_actor(self) -> dict[str, float]:
        """Ray resource name -> amount one actor reserves (zero amounts left out)."""
        out = {"CPU": float(self.num_cpus), "GPU": float(self.num_gpus), **{k: float(v) for k, v in
                                                                            self.custom_resources.items()}}
        return {k: v for k, v in out.items() if v > 0}

    def describe(self) -> str:
        each = ", ".join(f"{v:g} {k}" for k, v in self.per_actor().items()) or "nothing"
        keys = f" ({', '.join(self.keys)})" if self.keys else ""
        return f"{self.count} {self.what}{'s' if self.count != 1 else ''} x {each}{keys}"


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def _fmt(resources: Mapping[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if k not in ("memory", "object_store_memory")
             and not k.startswith("node:")}
    return ", ".join(f"{v:g} {k}" for k, v in sorted(shown.items())) or "nothing"


def check_resources(requests: Sequence[ActorRequest], where: str) -> None:
    """Before any actor is created: add up what ``requests`` ask for and compare it with the cluster's nodes.

    On a cluster this process started (:func:`is_local_cluster`) a request that cannot be met raises
    :class:`ResourceRequestError` at once, naming the numbers and the config keys; on a joined cluster (which may
    grow) it is a warning, and :func:`wait_until_placed` bounds the wait.
    """
    requests = [r for r in requests if r.count > 0]
    if not requests:
        return
    nodes = _alive_nodes()
    offered: dict[str, float] = {}
    for node in nodes:
        for k, v in node.items():
            offered[k] = offered.get(k, 0.0) + v
    need: dict[str, float] = {}
    for r in requests:
        for k, v in r.per_actor().items():
            need[k] = need.get(k, 0.0) + r.count * v
    short = {k: v for k, v in need.items() if v > offered.get(k, 0.0) + 1e-9}
    # an actor is never split across nodes: one that fits on no node waits whatever the totals say
    unfit = [r for r in requests
             if not any(all(node.get(k, 0.0) >= v for k, v in r.per_actor().items()) for node in nodes)]
    if not short and not unfit:
        return
    local = is_local_cluster()
    cluster = f"the {'local' if local else 'joined'} Ray cluster ({len(nodes)} node{'s' if len(nodes) != 1 else ''})"
    parts = []
    if short:
        parts.append(f"its actors ask for {_fmt(need)} in all and {cluster} offers {_fmt(offered)}")
    if unfit:
        parts.append(f"no node of {cluster} fits one {', one '.join(r.what for r in unfit)} "
                     f"(largest node: {_fmt(max(nodes, key=lambda n: n.get('CPU', 0.0)) if nodes else {})})")
    asks = " + ".join(r.describe() for r in requests)
    msg = f"{where}: {'; '.join(parts)}. Requested: {asks}."
    if local:
        raise ResourceRequestError(f"{msg} Lower those keys, or join a larger cluster (--ray-address / RAY_ADDRESS)")
    logger.warning("%s Waiting for the cluster to grow (the run fails after ray_pending_timeout_s)", msg)


def _awaits_resources(actor: Any) -> bool:
    """Whether Ray has not placed ``actor`` on a worker yet (created but waiting for resources). A placed actor
    whose constructor still runs has a process id; one that died is not waiting."""
    from ray._private import state

    info = state.actors(actor._actor_id.hex()) or {}
    return info.get("State") in ("DEPENDENCIES_UNREADY", "PENDING_CREATION", "RESTARTING") and not info.get("Pid")


def wait_until_placed(actors: Sequence[tuple[str, Any, ActorRequest | str]], timeout_s: float = DEFAULT_PENDING_TIMEOUT_S,
                      warn_every_s: float | None = None) -> None:
    """Block until Ray has placed each of ``actors`` (``(name, handle, what it asks for)``) on a node; their
    constructors may still run. Every ``warn_every_s`` while some wait, a warning names them and their resources;
    after ``timeout_s`` (config key ``ray_pending_timeout_s``) :class:`ResourceRequestError` is raised."""
    import ray

    warn_every_s = PENDING_WARN_S if warn_every_s is None else warn_every_s
    t0 = time.monotonic()
    next_warn, delay = t0 + warn_every_s, 0.02
    waiting = list(actors)
    while True:
        waiting = [a for a in waiting if _awaits_resources(a[1])]
        if not waiting:
            return
        now = time.monotonic()
        if now - t0 >= timeout_s or now >= next_warn:
            ask = "; ".join(f"{name} asks for {req if isinstance(req, str) else _fmt(req.per_actor())}"
                            for name, _, req in waiting)
            free = f"free on the cluster: {_fmt(ray.available_resources())} (of {_fmt(ray.cluster_resources())})"
            if now - t0 >= timeout_s:
                raise ResourceRequestError(
                    f"{len(waiting)} Ray actor(s) still wait for resources after {timeout_s:g} s "
                    f"(ray_pending_timeout_s): {ask}; {free}")
            logger.warning("still waiting %.0f s for Ray resources: %s; %s", now - t0, ask, free)
            next_warn += warn_every_s
        time.sleep(min(delay, max(0.0, t0 + timeout_s - now)))
        delay = min(delay * 2, 1.0)


def start_actors(requests: Sequence[ActorRequest], creators: Sequence[tuple[str, Callable[[], Any]]], where: str,
                 pending_timeout_s: float = DEFAULT_PENDING_TIMEOUT_S) -> list:
    """Create Ray actors only once the cluster can hold them: ``requests`` (what they ask for, counted together) are
    checked first (:func:`check_cluster_offers`, :func:`check_resources`), then each ``(name, create)`` of
    ``creators`` is called in the order of ``requests`` (``count`` creators each), then this waits until Ray has
    placed them all (:func:`wait_until_placed`). On any failure the actors created so far are killed."""
    import ray

    for r in requests:
        check_cluster_offers(r.custom_resources, f"{where}: {r.what}")
    check_resources(requests, where)
    per_actor = [r for r in requests for _ in range(r.count)]
    if len(per_actor) != len(creators):
        raise ValueError(f"{where}: {len(creators)} actors to create for {len(per_actor)} requested")
    actors = []
    try:
        for _, create in creators:
            actors.append(create())
        wait_until_placed([(name, a, r) for (name, _), a, r in zip(creators, actors, per_actor)], pending_timeout_s)
    except BaseException:
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        raise
    return actors
