"""Rewards as TRL ``reward_funcs`` entries, timed, with their scores kept for image grids.

argrpo rewards (``rewards.base.build_reward``) already accept TRL's keyword call: ``prompts`` (the captions),
``images`` (from the rollout), ``metadata`` (the GenEval row, a JSON string) and TRL's control keys. The wrapper
only measures time, notes when a reward returned None for the whole batch (TRL then excludes it: its mean is NaN
and TRL logs it as None; we log ``rewards/<name>/skipped = 1``) and keeps the last batch's scores.
"""

from __future__ import annotations

import time

from grpo.stats import StepStats


class TrackedReward:
    """Wraps one reward; TRL names its metrics ``rewards/<__name__>/mean|std``."""

    def __init__(self, reward, stats: StepStats, name: str | None = None):
        self.reward = reward
        self.stats = stats
        self.__name__ = name or getattr(reward, "__name__", type(reward).__name__)

    def __call__(self, prompts=None, completions=None, **kwargs):
        t0 = time.perf_counter()
        images = kwargs.get("images")
        out = self.reward(prompts=prompts, completions=completions, **kwargs)
        self.stats.add_time("reward", time.perf_counter() - t0)
        scores = list(out)
        self.stats.set(f"rewards/{self.__name__}/skipped", float(all(s is None for s in scores)))
        if images is not None:
            self.stats.record_scores(self.__name__, prompts, images, scores)
        return out

    def __repr__(self) -> str:
        return f"TrackedReward({self.reward!r})"


def build_reward_funcs(specs, stats: StepStats) -> tuple[list[TrackedReward], list[float]]:
    """RewardSpec list (config ``rewards:``) -> (TRL reward_funcs, reward_weights)."""
    from rewards.base import build_reward

    funcs, weights = [], []
    for spec in specs:
        reward = build_reward(spec.name, name=spec.alias, **dict(spec.kwargs))
        funcs.append(TrackedReward(reward, stats, name=spec.key if spec.alias else reward.__name__))
        weights.append(float(spec.weight))
    return funcs, weights
