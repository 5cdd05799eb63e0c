"""Scoring generated images: the reward contract and registry, built-in rewards, detectors, Ray reward actors.

Importing this package is light; the built-in rewards (``clip``, ``hps``, ``pickscore``, ``aesthetic``,
``geneval``, ``geneval_dense``) are registered when first looked up by :func:`build_reward`.
"""

from argrpo.rewards.base import (
    REWARDS,
    CompositeReward,
    FunctionReward,
    Reward,
    RewardCombiner,
    RewardError,
    RewardFn,
    RewardOutput,
    RewardSpec,
    available_rewards,
    build_reward,
    build_rewards,
    register_reward,
)

__all__ = [
    "REWARDS",
    "CompositeReward",
    "FunctionReward",
    "Reward",
    "RewardCombiner",
    "RewardError",
    "RewardFn",
    "RewardOutput",
    "RewardSpec",
    "available_rewards",
    "build_reward",
    "build_rewards",
    "register_reward",
]
