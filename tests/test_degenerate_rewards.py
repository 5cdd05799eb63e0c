"""Degenerate rewards in a real GRPO step: a group whose rewards are all equal gets exactly zero advantage (never
NaN, whatever the reward scaling), and a reward that is None for a whole batch is skipped and logged, even when it
is the only reward."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
from argrpo.config import load_config
from argrpo.grpo.config import GRPORunConfig
from argrpo.grpo.trainer import build_run
from grpo_fixtures import run_overrides, shared_world

G = 4
DEGENERATE = textwrap.dedent(f'''
    import numpy as np

    def first_group_flat(prompts, images, **kwargs):
        """The first prompt's {G} samples all score 0.5; the others score by colour (they differ)."""
        return [0.5 if i < {G} else float(np.asarray(im, dtype=np.float32)[..., 0].mean() / 255.0)
                for i, im in enumerate(images)]

    def all_none(prompts, images, **kwargs):
        return [None] * len(images)
''')


@pytest.fixture(scope="module")
def world():
    return shared_world()


@pytest.fixture
def plugins(world, tmp_path, monkeypatch):
    (tmp_path / "degenerate_rewards.py").write_text(DEGENERATE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def one_step(world, out, **kw):
    """Train one step; returns (the step's advantages [P*G], its log line, its metrics.jsonl row)."""
    # every group's advantages are looked at, so tied groups are kept (skip_zero_advantage would drop them first)
    sets = run_overrides(world, out, **{"grpo.max_steps": 1, "grpo.skip_zero_advantage": False, **kw})
    run = build_run(load_config(GRPORunConfig, None, sets))
    seen = []
    score = run.trainer._generate_and_score_completions

    def capture(inputs):
        out_ = score(inputs)
        seen.append(out_["advantages"].detach().clone())
        return out_

    run.trainer._generate_and_score_completions = capture
    try:
        run.trainer.train()
    finally:
        run.close()
    log = [h for h in run.trainer.state.log_history if "loss" in h][0]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    return torch.cat(seen), log, row


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_a_group_with_equal_rewards_gets_zero_advantage(world, plugins, tmp_path, scale):
    adv, log, _ = one_step(world, tmp_path, rewards="[{name: 'degenerate_rewards:first_group_flat'}]",
                           **{"grpo.scale_rewards": scale})
    assert adv.shape == (2 * G,) and torch.isfinite(adv).all()
    assert torch.equal(adv[:G], torch.zeros(G))  # exactly zero: this group carries no signal
    assert adv[G:].abs().min() > 0  # the other group still learns
    if scale == "group":  # TRL's metric is about the std it divides by: per group only with group scaling
        assert log["frac_reward_zero_std"] == 0.5
    assert math.isfinite(log["loss"]) and math.isfinite(log["grad_norm"])


def test_a_reward_that_is_none_for_the_whole_batch_is_skipped_and_logged(world, plugins, tmp_path):
    """The only reward returns None everywhere: the step still runs, every advantage is 0, nothing is NaN, and
    the log says the reward was skipped."""
    adv, log, row = one_step(world, tmp_path, rewards="[{name: 'degenerate_rewards:all_none'}]")
    assert torch.equal(adv, torch.zeros_like(adv))
    assert log["rewards/all_none/skipped"] == 1.0
    assert math.isfinite(log["loss"]) and math.isfinite(log["grad_norm"])
    assert row["rewards/all_none/skipped"] == 1.0
    numbers = [v for v in row.values() if isinstance(v, float)]
    assert numbers and all(math.isfinite(v) for v in numbers)  # metrics.jsonl never holds a NaN


def test_per_reward_normalize_applies_on_the_grpo_path():
    """A reward's own ``normalize`` is applied before TRL weights the rewards: batch z-scores each batch, running
    keeps statistics across batches (and hands them over for checkpoints); None stays None; the raw mean is logged."""
    from argrpo.grpo.reward_funcs import TrackedReward
    from argrpo.grpo.stats import StepStats

    def raw(prompts=None, images=None, **kw):
        return [1.0, 2.0, None, 3.0]

    stats = StepStats()
    batch = TrackedReward(raw, stats, name="r", normalize="batch")
    out = batch(prompts=["p"] * 4, completions=None, images=None)
    assert out[2] is None
    vals = [v for v in out if v is not None]
    assert sum(vals) == pytest.approx(0.0, abs=1e-9) and max(vals) == pytest.approx(1.2247, abs=1e-3)
    assert stats.take()["rewards/r/raw_mean"] == pytest.approx(2.0)
    assert batch.state_dict() == {}

    running = TrackedReward(raw, StepStats(), name="r", normalize="running")
    running(prompts=["p"] * 4, completions=None, images=None)
    second = running(prompts=["p"] * 4, completions=None, images=None)
    assert running.state_dict()["count"] == 6
    again = TrackedReward(raw, StepStats(), name="r", normalize="running")
    again.load_state_dict(running.state_dict())
    assert again.state_dict() == running.state_dict()
    assert second == pytest.approx(batch(prompts=["p"] * 4, completions=None, images=None))  # same values seen twice

    plain = TrackedReward(raw, StepStats(), name="r")
    assert list(plain(prompts=["p"] * 4, completions=None, images=None)) == [1.0, 2.0, None, 3.0]
