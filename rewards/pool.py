"""Ray reward actors: one actor per reward model, every reward of a batch scored at the same time.

The images of a batch go into Ray's object store once (``ray.put``) and every actor reads them from there. The
combination (weights, normalisation) happens in the caller with the same :class:`~rewards.base.RewardCombiner` the
in-process :class:`~rewards.base.CompositeReward` uses, so the pool returns the same numbers.

Fault tolerance: actors are created with ``max_restarts``; a call whose actor died is sent again (``retries``
times) once Ray has restarted it. An error raised by the reward itself is not retried: it is re-raised as a
:class:`~rewards.base.RewardError` naming the reward and the batch.

Plugin rewards (``package.module:function``) are imported inside the actors, so their module must be importable
there: install it, or pass ``runtime_env={"env_vars": {"PYTHONPATH": ...}}`` (importing it runs its code).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from argrpo import cluster
from argrpo.rewards.base import (
    Normalize,
    Reward,
    RewardCombiner,
    RewardError,
    RewardOutput,
    RewardSpec,
    as_prompts,
    as_specs,
    as_uint8_images,
    available_rewards,
    check_metadata_lengths,
    check_output,
    describe_batch,
)


@dataclass
class RewardPoolConfig:
    """Placement and fault tolerance of the reward actors.

    On a multi-node Ray cluster, ``custom_resources`` and ``placement`` say which nodes the actors may use and how
    they spread (see argrpo.cluster); ``resources`` overrides any of num_cpus / num_gpus / threads /
    custom_resources for one reward.
    """

    num_cpus: float = field(default=1.0, metadata={"help": "CPUs reserved per reward actor"})
    num_gpus: float = field(default=0.0, metadata={"help": "GPU fraction per reward actor (e.g. 0.25)"})
    threads: int = field(default=1, metadata={"help": "torch threads inside each actor"})
    max_restarts: int = field(default=2, metadata={"help": "times Ray restarts a dead reward actor"})
    retries: int = field(default=2, metadata={"help": "times a call is sent again after its actor died"})
    timeout_s: float | None = field(default=None, metadata={"help": "seconds to wait for one reward call"})
    restart_timeout_s: float = field(default=300.0,
                                     metadata={"help": "seconds to wait for a reward actor to start (it builds its "
                                                       "models), or for Ray to bring a dead one back"})
    resources: dict = field(default_factory=dict,
                            metadata={"help": "per-reward overrides, e.g. {hps: {num_gpus: 0.5}}"})
    custom_resources: dict[str, float] = cluster.custom_resources_field("reward actor", "reward_node")
    placement: cluster.Placement = cluster.placement_field("reward actors")

    def __post_init__(self):
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("reward pool: num_cpus and num_gpus must be >= 0")
        if self.max_restarts < 0 or self.retries < 0:
            raise ValueError("reward pool: max_restarts and retries must be >= 0")
        known = {"num_cpus", "num_gpus", "threads", "custom_resources"}
        for key, res in self.resources.items():
            bad = set(res) - known
            if bad:
                raise ValueError(f"reward pool: resources[{key!r}] has unknown keys {sorted(bad)}; "
                                 f"valid: {sorted(known)}")
            if "custom_resources" in res:
                res["custom_resources"] = cluster.validate_custom_resources(
                    res["custom_resources"], f"reward pool: resources[{key!r}].custom_resources")
        self.custom_resources = cluster.validate_custom_resources(self.custom_resources,
                                                                  "reward pool: custom_resources")
        cluster.validate_placement(self.placement, "reward pool: placement")

    def actor_resources(self, key: str) -> dict:
        """num_cpus / num_gpus / threads / custom_resources of reward ``key``'s actor (its overrides applied)."""
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "threads": self.threads,
                "custom_resources": self.custom_resources, **self.resources.get(key, {})}

    def actor_requests(self, keys: Sequence[str], prefix: str = "reward_pool") -> list[cluster.ActorRequest]:
        """What the actors of rewards ``keys`` ask Ray for, naming the config keys that set it."""
        out = []
        for key in keys:
            res = self.actor_resources(key)
            where = f"{prefix}.resources.{key}" if key in self.resources else prefix
            names = ["reward_actors", f"{where}.num_cpus"] + [f"{where}.{k}" for k in ("num_gpus", "custom_resources")
                                                               if res[k]]
            out.append(cluster.ActorRequest(f"reward actor {key!r}", 1, res["num_cpus"], res["num_gpus"],
                                            res["custom_resources"], tuple(names)))
        return out


class RewardActor:
    """Holds one reward; built inside the actor's process so its model loads there."""

    def __init__(self, key: str, spec: RewardSpec | None, fn: Any, threads: int):
        import sys

        from argrpo.rewards.base import build_reward

        self.key = key
        if spec is not None:
            self.reward = build_reward(spec.name, name=key, **spec.kwargs)
        else:
            self.reward = build_reward(fn, name=key)
        # only rewards that use torch pay for importing it (OMP_NUM_THREADS is already set for the process)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)

    def ready(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def score(self, prompts: list[str], images: Any, metadata: dict, batch: Any) -> RewardOutput:
        return self.reward(prompts, images, batch_index=batch, **metadata)


class PendingScores:
    """Reward calls in flight; :meth:`result` waits for them (retrying calls whose actor died) and combines."""

    def __init__(self, pool: RewardPool, refs: dict, args: tuple, where: str):
        self.pool, self.refs, self.args, self.where = pool, refs, args, where

    def components(self) -> dict[str, RewardOutput]:
        return {key: self.pool._wait(key, ref, self.args, self.where) for key, ref in self.refs.items()}

    def result(self) -> RewardOutput:
        return self.pool.combiner.combine(self.components())


class RewardPool(Reward):
    """Score batches with one Ray actor per reward, all rewards concurrently; combine like CompositeReward.

    ``rewards``: reward config entries (:class:`~rewards.base.RewardSpec`, its dict, or a name), or
    ``{name: reward callable}`` for rewards built here and shipped to the actors by pickling.
    Also a :class:`~rewards.base.Reward` itself, so it can be handed to TRL as one reward function.
    ``pending_timeout_s``: how long an actor may wait for the cluster's resources before the pool gives up (a local
    cluster that cannot hold the actors fails before any is created).
    """

    name = "reward_pool"

    def __init__(self, rewards: Sequence[RewardSpec | Mapping | str] | Mapping[str, Callable],
                 normalize: Normalize = "none", config: RewardPoolConfig | None = None,
                 runtime_env: dict | None = None, name: str | None = None,
                 pending_timeout_s: float = cluster.DEFAULT_PENDING_TIMEOUT_S):
        import ray

        super().__init__(name)
        if not ray.is_initialized():
            raise RuntimeError("RewardPool needs a running Ray (argrpo.cluster.init_ray)")
        self.config = config or RewardPoolConfig()
        if isinstance(rewards, Mapping) and all(callable(v) for v in rewards.values()):
            entries = [(k, None, fn, 1.0) for k, fn in rewards.items()]
            modes = {}
        else:
            specs = as_specs(rewards)
            known = available_rewards()
            for s in specs:  # fail here, not inside an actor, on a misspelt name
                if ":" not in s.name and s.name not in known:
                    raise ValueError(f"unknown reward {s.name!r}; registered: {known} "
                                     f"(or name a plugin as 'package.module:function')")
            entries = [(s.key, s, None, s.weight) for s in specs]
            modes = {s.key: s.normalize for s in specs if s.normalize}
        unknown = set(self.config.resources) - {k for k, *_ in entries}
        if unknown:
            raise ValueError(f"reward pool: resources for unknown rewards {sorted(unknown)}")
        self.combiner = RewardCombiner({k: w for k, _, _, w in entries},
                                       {k: modes.get(k) or normalize for k, *_ in entries}, name=self.name)
        self.actors: dict[str, Any] = {}
        cls = ray.remote(RewardActor)
        creators = []
        for key, spec, fn, _ in entries:
            res = self.config.actor_resources(key)
            env = dict(runtime_env or {})
            env["env_vars"] = {"OMP_NUM_THREADS": str(int(res["threads"])), **env.get("env_vars", {})}
            options = dict(num_cpus=res["num_cpus"], num_gpus=res["num_gpus"],
                           max_restarts=self.config.max_restarts, max_task_retries=0, runtime_env=env,
                           **cluster.scheduling_options(res["custom_resources"], self.config.placement))
            creators.append((f"reward actor {key!r}",
                             functools.partial(cls.options(**options).remote, key, spec, fn, int(res["threads"]))))
        keys = [key for key, *_ in entries]
        actors = cluster.start_actors(self.config.actor_requests(keys), creators, "reward pool", pending_timeout_s)
        self.actors = dict(zip(keys, actors))
        # Building the models happens in the actors' constructors: wait so a bad config fails here, by name.
        for key, actor in self.actors.items():
            try:
                # a start is model building, not a reward call: it gets the start/restart budget
                ray.get(actor.ready.remote(), timeout=self.config.restart_timeout_s)
            except Exception as e:
                self.shutdown()
                raise RewardError(f"reward {key!r}: its actor failed to start: {_cause(e)}") from e

    # --------------------------------------------------------------------------------------------- scoring

    def submit(self, prompts: Any, images: Any, batch: Any = None, **metadata: Any) -> PendingScores:
        """Start every reward on this batch; returns at once. ``images``: any form :class:`Reward` accepts."""
        import ray

        imgs = as_uint8_images(images)
        texts = as_prompts(prompts, len(imgs))
        if len(texts) != len(imgs):
            raise RewardError(f"reward pool: {len(texts)} prompts but {len(imgs)} images")
        check_metadata_lengths(metadata, len(imgs), self.name)
        shapes = {im.shape for im in imgs}
        # one object in the store for all actors; a stacked array is read zero-copy from shared memory
        payload = np.stack(imgs) if len(shapes) == 1 else imgs
        images_ref = ray.put(payload)
        args = (texts, images_ref, dict(metadata), batch)
        refs = {key: actor.score.remote(*args) for key, actor in self.actors.items()}
        return PendingScores(self, refs, args, describe_batch(texts, batch))

    def score_components(self, prompts: Any, images: Any, batch: Any = None, **metadata: Any
                         ) -> dict[str, RewardOutput]:
        return self.submit(prompts, images, batch=batch, **metadata).components()

    def score(self, prompts, images, **metadata) -> RewardOutput:
        # called by Reward.__call__ (TRL's convention, input normalisation, output checks)
        return self.submit(prompts, images, **metadata).result()

    def _wait(self, key: str, ref: Any, args: tuple, where: str) -> RewardOutput:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        died = []
        for attempt in range(self.config.retries + 1):
            if attempt:
                self._await_restart(key, where)
                ref = self.actors[key].score.remote(*args)
            try:
                out = ray.get(ref, timeout=self.config.timeout_s)
            except RayTaskError as e:
                raise RewardError(str(_cause(e))) from e
            except RayActorError as e:
                died.append(type(e).__name__)
                continue
            except GetTimeoutError as e:
                raise RewardError(f"reward {key!r} ({where}): no answer in {self.config.timeout_s} s") from e
            return check_output(out, key, len(args[0]), where)
        raise RewardError(f"reward {key!r} ({where}): its actor died on {len(died)} tries ({', '.join(died)}); "
                          f"raise max_restarts/retries or look at the actor's log")

    def _await_restart(self, key: str, where: str) -> None:
        """Block until Ray has restarted ``key``'s actor (calls fail fast with ActorUnavailableError meanwhile)."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        deadline = time.monotonic() + self.config.restart_timeout_s
        while True:
            try:
                ray.get(self.actors[key].ready.remote(), timeout=self.config.restart_timeout_s)
                return
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            except ActorDiedError as e:
                raise RewardError(f"reward {key!r} ({where}): its actor died for good (max_restarts="
                                  f"{self.config.max_restarts} used up): {e}") from e
        raise RewardError(f"reward {key!r} ({where}): its actor did not come back in "
                          f"{self.config.restart_timeout_s} s")

    # --------------------------------------------------------------------------------------------- lifecycle

    def pids(self) -> dict[str, int]:
        import ray

        return {k: ray.get(a.ready.remote()) for k, a in self.actors.items()}

    def actor_nodes(self) -> dict[str, str]:
        """The Ray node id each reward's actor runs on now."""
        import ray

        return dict(zip(self.actors, ray.get([a.node_id.remote() for a in self.actors.values()])))

    def state_dict(self) -> dict:
        return self.combiner.state_dict()

    def load_state_dict(self, state) -> None:
        self.combiner.load_state_dict(state)

    def shutdown(self) -> None:
        import ray

        for actor in self.actors.values():
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def _cause(e: BaseException) -> BaseException:
    """The reward's own exception inside a Ray error (RayTaskError keeps it as ``cause``)."""
    return getattr(e, "cause", None) or e
