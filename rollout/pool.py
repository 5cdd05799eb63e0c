"""Rollout pools: spread P x G samples over workers and hand back one typed ``Rollout`` in prompt order.

``RolloutPool`` runs :class:`~rollout.worker.RolloutWorker` as Ray actors; ``LocalRolloutPool`` runs one worker
in-process (no Ray) with the same interface, for small runs and for tests of other components.

Splitting: prompts are cut into contiguous groups, one per worker; a worker samples all G samples of its prompts.
Sample ``r`` of a call (row ``r`` of the result) always uses seed ``seed + r``, so the output does not depend on
the number of workers.

Fault tolerance: actors are created with ``max_restarts`` and ``max_task_retries``, so Ray rebuilds a killed
worker from its constructor arguments and retries its call. A rebuilt worker holds its initial weights, so the
pool keeps the latest weights (one object-store ref) and, when a result comes back with an older weight version
than the call was submitted under, re-sends them to that worker and runs its chunk again.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from argrpo import cluster
from argrpo.rollout.sampling import resolve_seed
from argrpo.rollout.types import Rollout, SamplingParams
from argrpo.rollout.worker import RolloutWorker


@dataclass
class RolloutConfig:
    """How rollouts are produced.

    Engine: ``engine``, ``device``, ``max_batch_rows``. Workers: ``num_workers`` (0 = in-process, no Ray),
    ``num_cpus_per_worker`` (also the worker's OMP_NUM_THREADS), ``num_gpus_per_worker``, ``max_restarts``,
    ``max_task_retries``. Placement on a (multi-node) Ray cluster: ``custom_resources``, ``placement``.
    Sampling: ``sampling``. Scheduling: ``mode``.
    """

    engine: str = field(default="torch", metadata={"help": "rollout engine: 'torch' or 'vllm'"})
    num_workers: int = field(default=1, metadata={"help": "Ray rollout actors (0 = one in-process worker, no Ray)"})
    num_cpus_per_worker: int = field(
        default=1, metadata={"help": "CPUs reserved per actor; also its OMP_NUM_THREADS / torch threads"}
    )
    num_gpus_per_worker: float = field(default=0.0, metadata={"help": "GPUs reserved per actor (fractions allowed)"})
    device: str = field(default="auto", metadata={"help": "engine device: 'auto' (cuda when a GPU is reserved), 'cpu', 'cuda'"})
    max_batch_rows: int | None = field(
        default=None, metadata={"help": "most samples per forward batch in one worker (None = all at once)"}
    )
    custom_resources: dict[str, float] = cluster.custom_resources_field("rollout actor", "rollout")
    placement: cluster.Placement = cluster.placement_field("rollout actors")
    max_restarts: int = field(default=3, metadata={"help": "times Ray may restart a dead rollout actor"})
    max_task_retries: int = field(default=3, metadata={"help": "times Ray retries a call on a restarted actor"})
    sampling: SamplingParams = field(default_factory=SamplingParams, metadata={"help": "rollout sampling settings"})
    mode: Literal["sync", "async"] = field(
        default="sync",
        metadata={"help": "sync: generate(t) then learn(t); async: generate(t+1) while learning t (one step stale)"},
    )

    def __post_init__(self):
        if self.num_workers < 0:
            raise ValueError(f"rollout.num_workers must be >= 0, got {self.num_workers}")
        if self.num_cpus_per_worker < 1:
            raise ValueError(f"rollout.num_cpus_per_worker must be >= 1, got {self.num_cpus_per_worker}")
        if self.num_gpus_per_worker < 0:
            raise ValueError(f"rollout.num_gpus_per_worker must be >= 0, got {self.num_gpus_per_worker}")
        if self.mode not in ("sync", "async"):
            raise ValueError(f"rollout.mode must be 'sync' or 'async', got {self.mode!r}")
        self.custom_resources = cluster.validate_custom_resources(self.custom_resources,
                                                                  "rollout.custom_resources")
        cluster.validate_placement(self.placement, "rollout.placement")

    def actor_request(self, prefix: str = "rollout") -> cluster.ActorRequest:
        """What the Ray rollout workers ask for, naming the config keys that set it (none with num_workers 0)."""
        keys = [f"{prefix}.num_workers", f"{prefix}.num_cpus_per_worker"]
        keys += [f"{prefix}.{k}" for k in ("num_gpus_per_worker", "custom_resources") if getattr(self, k)]
        return cluster.ActorRequest("rollout worker", self.num_workers, self.num_cpus_per_worker,
                                    self.num_gpus_per_worker, self.custom_resources, tuple(keys))

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if self.num_gpus_per_worker > 0 else "cpu"


def _split(n_prompts: int, n_workers: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) prompt ranges, at most one per worker, none empty."""
    bounds = np.linspace(0, n_prompts, min(n_workers, n_prompts) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _chunk_sampling(sampling: SamplingParams, G: int, seed: int, first_prompt: int) -> SamplingParams:
    return sampling.with_(n=G, seed=seed + first_prompt * G)


def _check_request(prompts, G: int) -> None:
    if not prompts:
        raise ValueError("generate: no prompts given")
    if G < 1:
        raise ValueError(f"generate: G must be >= 1, got {G}")


class RolloutFuture:
    """Handle on a submitted ``generate``; ``result()`` blocks and returns the Rollout (in prompt order)."""

    def __init__(self, resolve, done):
        self._resolve, self._done, self._value = resolve, done, None

    def done(self) -> bool:
        return self._value is not None or self._done()

    def result(self) -> Rollout:
        if self._value is None:
            self._value = self._resolve()
        return self._value


# ---- Ray --------------------------------------------------------------------------------------------------------
class RolloutPool:
    """``num_workers`` Ray actors, each a RolloutWorker.

    Args:
        policy: checkpoint directory, PolicyComponents or a zero-argument callable returning one (must pickle).
        config: RolloutConfig (engine, workers, resources, restart policy).
        engine_kwargs: extra engine constructor arguments.
        pending_timeout_s: how long a worker may wait for the cluster's resources before the pool gives up (a
            local cluster that cannot hold the workers fails before any is created).
    """

    def __init__(self, policy, config: RolloutConfig | None = None, engine_kwargs: dict | None = None, dtype=None,
                 pending_timeout_s: float = cluster.DEFAULT_PENDING_TIMEOUT_S):
        import ray

        if not ray.is_initialized():
            from argrpo.cluster import init_ray

            init_ray()
        self.config = config = config or RolloutConfig()
        if config.num_workers < 1:
            raise ValueError("RolloutPool needs num_workers >= 1 (use LocalRolloutPool for in-process rollouts)")
        threads = str(config.num_cpus_per_worker)
        actor_cls = ray.remote(RolloutWorker).options(
            **cluster.scheduling_options(config.custom_resources, config.placement),
            num_cpus=config.num_cpus_per_worker,
            num_gpus=config.num_gpus_per_worker,
            max_restarts=config.max_restarts,
            max_task_retries=config.max_task_retries,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                                      "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}},
        )
        kwargs = {} if config.max_batch_rows is None else {"max_batch_rows": config.max_batch_rows}
        kwargs.update(engine_kwargs or {})

        def create():
            return actor_cls.remote(policy, engine=config.engine, device=config.resolved_device(),
                                    engine_kwargs=kwargs, num_threads=config.num_cpus_per_worker, dtype=dtype)

        self.workers = cluster.start_actors([config.actor_request()],
                                            [(f"rollout worker {i}", create) for i in range(config.num_workers)],
                                            "rollout pool", pending_timeout_s)
        self.version = ray.get(self.workers[0].weight_version.remote())  # also waits for the constructors
        ray.get([w.weight_version.remote() for w in self.workers[1:]])
        self._weights: tuple[Any, int, bool] | None = None  # (object ref, version, adapter) of the latest weights
        self._resends = 0

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    def generate(self, prompts: list[str], G: int, sampling: SamplingParams | None = None) -> Rollout:
        """P captions x G samples -> Rollout of P*G rows (rows p*G .. p*G+G-1 belong to prompt p)."""
        return self.generate_async(prompts, G, sampling).result()

    def generate_async(self, prompts: list[str], G: int, sampling: SamplingParams | None = None) -> RolloutFuture:
        """Submit and return at once; ``.result()`` later (lets the learner overlap with generation)."""
        import ray

        _check_request(prompts, G)
        sampling = sampling or self.config.sampling
        seed = resolve_seed(sampling.seed)
        expected = self.version
        t0 = time.perf_counter()
        chunks = []
        for worker, (a, b) in zip(self.workers, _split(len(prompts), len(self.workers))):
            sp = _chunk_sampling(sampling, G, seed, a)
            chunks.append((worker, list(prompts[a:b]), sp, worker.generate.remote(list(prompts[a:b]), sp)))

        def resolve() -> Rollout:
            parts = []
            for worker, chunk_prompts, sp, ref in chunks:
                part = ray.get(ref)
                for _ in range(self.config.max_task_retries + 1):
                    if part.weight_version >= expected or self._weights is None:
                        break
                    # the worker was rebuilt from its constructor: give it the latest weights, redo its chunk
                    self._resend(worker)
                    part = ray.get(worker.generate.remote(chunk_prompts, sp))
                else:
                    raise RuntimeError(f"rollout worker kept returning weight version {part.weight_version} < {expected}")
                parts.append(part)
            out = Rollout.concat(parts)
            out.timings["wall"] = time.perf_counter() - t0
            return out

        def done() -> bool:
            ready, _ = ray.wait([c[3] for c in chunks], num_returns=len(chunks), timeout=0)
            return len(ready) == len(chunks)

        return RolloutFuture(resolve, done)

    def load_weights(self, state_dict: dict, version: int, adapter: bool = False) -> None:
        """Send weights to every worker through the object store (one ``ray.put``) and wait until all hold them."""
        import ray

        ref = ray.put(state_dict)
        self._weights = (ref, int(version), bool(adapter))
        ray.get([w.load_weights.remote(ref, int(version), bool(adapter)) for w in self.workers])
        self.version = int(version)

    def _resend(self, worker) -> None:
        import ray

        ref, version, adapter = self._weights
        self._resends += 1
        ray.get(worker.load_weights.remote(ref, version, adapter))

    def worker_pids(self) -> list[int]:
        import ray

        return ray.get([w.pid.remote() for w in self.workers])

    def worker_nodes(self) -> list[str]:
        """The Ray node id each worker runs on now (a restarted worker may have moved)."""
        import ray

        return ray.get([w.node_id.remote() for w in self.workers])

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


# ---- in-process ---------------------------------------------------------------------------------------------------
class LocalRolloutPool:
    """One in-process RolloutWorker with RolloutPool's interface.

    ``generate_async`` runs on a single background thread (PyTorch releases the GIL in its kernels, so the
    caller's work overlaps); ``load_weights`` goes through the same thread, so calls keep their order.
    """

    def __init__(self, policy, config: RolloutConfig | None = None, engine_kwargs: dict | None = None, dtype=None):
        self.config = config = config or RolloutConfig(num_workers=0)
        kwargs = {} if config.max_batch_rows is None else {"max_batch_rows": config.max_batch_rows}
        kwargs.update(engine_kwargs or {})
        self.worker = RolloutWorker(policy, engine=config.engine, device=config.resolved_device(),
                                    engine_kwargs=kwargs, num_threads=None, dtype=dtype)
        self.version = self.worker.weight_version()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout")

    num_workers = 1

    def generate(self, prompts: list[str], G: int, sampling: SamplingParams | None = None) -> Rollout:
        return self.generate_async(prompts, G, sampling).result()

    def generate_async(self, prompts: list[str], G: int, sampling: SamplingParams | None = None) -> RolloutFuture:
        _check_request(prompts, G)
        sampling = sampling or self.config.sampling
        sp = _chunk_sampling(sampling, G, resolve_seed(sampling.seed), 0)
        t0 = time.perf_counter()

        def run() -> Rollout:
            out = self.worker.generate(list(prompts), sp)
            out.timings["wall"] = time.perf_counter() - t0
            return out

        fut = self._executor.submit(run)
        return RolloutFuture(fut.result, fut.done)

    def load_weights(self, state_dict: dict, version: int, adapter: bool = False) -> None:
        self._executor.submit(self.worker.load_weights, state_dict, int(version), bool(adapter)).result()
        self.version = int(version)

    def worker_nodes(self) -> list[str | None]:
        """[this process's Ray node id], or [None] when Ray is not running."""
        return [self.worker.node_id()]

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def build_rollout_pool(policy, config: RolloutConfig, engine_kwargs: dict | None = None, dtype=None,
                       pending_timeout_s: float = cluster.DEFAULT_PENDING_TIMEOUT_S):
    """``num_workers == 0``: LocalRolloutPool; else a Ray RolloutPool."""
    if config.num_workers == 0:
        return LocalRolloutPool(policy, config, engine_kwargs=engine_kwargs, dtype=dtype)
    return RolloutPool(policy, config, engine_kwargs=engine_kwargs, dtype=dtype, pending_timeout_s=pending_timeout_s)
