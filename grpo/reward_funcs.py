"""Rewards as TRL ``reward_funcs`` entries, timed, with their scores kept for image grids.

argrpo rewards (``rewards.base.build_reward``) already accept TRL's keyword call: ``prompts`` (the captions),
``images`` (from the rollout), ``metadata`` (the GenEval row, a JSON string) and TRL's control keys. The wrapper
only measures time, notes when a reward returned None for the whole batch (TRL then excludes it: its mean is NaN
and TRL logs it as None; we log ``rewards/<name>/skipped = 1``), keeps the last batch's scores and applies the
reward's own ``normalize`` (``batch`` or ``running`` z-score) before TRL weights and sums the rewards. Raw scores
are logged as ``rewards/<name>/raw_mean`` when normalised; the running statistics travel with GRPO checkpoints.
Under data parallelism each rank normalises the slice it scored.
"""

from __future__ import annotations

import time

from argrpo.cluster import DEFAULT_PENDING_TIMEOUT_S
from argrpo.grpo.stats import StepStats


class TrackedReward:
    """Wraps one reward; TRL names its metrics ``rewards/<__name__>/mean|std``."""

    def __init__(self, reward, stats: StepStats, name: str | None = None, normalize: str | None = None):
        from argrpo.rewards.base import RewardCombiner

        self.reward = reward
        self.stats = stats
        self.__name__ = name or getattr(reward, "__name__", type(reward).__name__)
        self.normalize = normalize or "none"
        self._norm = RewardCombiner({self.__name__: 1.0}, {self.__name__: self.normalize}, name=self.__name__)

    def __call__(self, prompts=None, completions=None, **kwargs):
        t0, c0 = time.perf_counter(), time.process_time()
        images = kwargs.get("images")
        out = self.reward(prompts=prompts, completions=completions, **kwargs)
        self.stats.add_time("reward", time.perf_counter() - t0, cpu=time.process_time() - c0)
        scores = list(out)
        self.stats.set(f"rewards/{self.__name__}/skipped", float(all(s is None for s in scores)))
        if images is not None:
            self.stats.record_scores(self.__name__, prompts, images, scores)
        if self.normalize == "none":
            return out
        present = [s for s in scores if s is not None]
        if present:
            self.stats.set(f"rewards/{self.__name__}/raw_mean", float(sum(present) / len(present)))
        return self._norm.normalise(self.__name__, scores)

    def state_dict(self) -> dict:
        """Running normalisation statistics (empty unless ``normalize: running``)."""
        return self._norm.state_dict()[self.__name__] if self.normalize == "running" else {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._norm.load_state_dict({self.__name__: state})

    def close(self) -> None:
        close = getattr(self.reward, "close", None)
        if close is not None:
            close()

    def __repr__(self) -> str:
        return f"TrackedReward({self.reward!r})"


class _PooledScores:
    """One Ray RewardPool behind several TRL reward functions: the first call of a batch starts every reward on
    the actors at once, each function then returns its own reward's scores (so TRL still logs each reward)."""

    def __init__(self, specs, config, pending_timeout_s: float):
        import os
        import sys

        from argrpo.rewards.pool import RewardPool

        # plugin rewards ('module:function') are imported inside the actors: give them the driver's import path
        path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        self.pool = RewardPool(list(specs), config=config, runtime_env={"env_vars": {"PYTHONPATH": path}},
                               pending_timeout_s=pending_timeout_s)
        self._key = None
        self._components = None
        self.closed = False

    def component(self, key: str, prompts, kwargs) -> list:
        images = kwargs.get("images")
        if self._key is not images:  # a new batch: TRL passes the same images list to every reward function
            meta = {k: v for k, v in kwargs.items() if k not in ("images", "completions", "completion_ids",
                                                                 "trainer_state", "log_extra", "log_metric")}
            self._components = self.pool.score_components(prompts, images, **meta)
            self._key = images
        return self._components[key]


class PooledReward:
    """A TRL reward function reading one component of a :class:`_PooledScores`."""

    def __init__(self, shared: _PooledScores, key: str):
        self.shared, self.key, self.__name__ = shared, key, key

    def __call__(self, prompts=None, completions=None, **kwargs):
        out = self.shared.component(self.key, prompts, kwargs)
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            from argrpo.rewards.base import log_extras

            log_extras(out, self.key, log_metric)
        return out

    def close(self) -> None:
        if not self.shared.closed:
            self.shared.closed = True
            self.shared.pool.shutdown()


def display_name(spec) -> str:
    """How a reward is named in logs: its alias, else its registered name or plugin function name."""
    return spec.alias or spec.name.rpartition(":")[2]


def build_reward_funcs(specs, stats: StepStats, actors: bool = False, pool_config=None,
                       pending_timeout_s: float = DEFAULT_PENDING_TIMEOUT_S) -> tuple[list[TrackedReward], list[float]]:
    """RewardSpec list (config ``rewards:``) -> (TRL reward_funcs, reward_weights).

    actors: score on Ray reward actors (rewards.pool.RewardPool), every reward of a batch concurrently;
    pending_timeout_s: how long they may wait for the cluster's resources.
    """
    from argrpo.rewards.base import build_reward

    funcs, weights = [], []
    if actors:
        from argrpo.cluster import init_ray

        init_ray()
        shared = _PooledScores(specs, pool_config, pending_timeout_s)
        for spec in specs:
            funcs.append(TrackedReward(PooledReward(shared, spec.key), stats, name=display_name(spec),
                                       normalize=spec.normalize))
            weights.append(float(spec.weight))
        return funcs, weights
    for spec in specs:
        reward = build_reward(spec.name, name=spec.alias, **dict(spec.kwargs))
        funcs.append(TrackedReward(reward, stats, name=display_name(spec), normalize=spec.normalize))
        weights.append(float(spec.weight))
    return funcs, weights
