"""Rollouts: sampling settings, visual-token sampling, engines, workers and pools.

    from argrpo.rollout import RolloutConfig, build_rollout_pool, SamplingParams
    pool = build_rollout_pool("runs/sft/final", RolloutConfig(num_workers=2))
    batch = pool.generate(captions, G=8, sampling=SamplingParams(temperature=1.0))   # Rollout, P*G rows
"""

from argrpo.rollout.pool import (
    LocalRolloutPool,
    RolloutConfig,
    RolloutFuture,
    RolloutPool,
    build_rollout_pool,
)
from argrpo.rollout.types import Rollout, SamplingParams
from argrpo.rollout.worker import PolicyComponents, RolloutWorker

__all__ = [
    "LocalRolloutPool",
    "PolicyComponents",
    "Rollout",
    "RolloutConfig",
    "RolloutFuture",
    "RolloutPool",
    "RolloutWorker",
    "SamplingParams",
    "build_rollout_pool",
]
