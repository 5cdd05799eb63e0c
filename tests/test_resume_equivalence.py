"""Resume equals an uninterrupted run: 4 steps straight vs 2 steps, stop, resume, 2 steps give the same weights
(within 1e-6 on CPU, same seeds), the same data order, the same logged rewards or losses and the same optimizer
state. GRPO (full fine-tuning with a warm-up + linear LR schedule; LoRA with a KL term) and pretraining.

The stopped run ends cleanly after step 2 (as a time budget or Ctrl-C between steps would); a kill at any moment
is tests/test_faults.py's job.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from argrpo.config import load_config
from argrpo.grpo.config import GRPORunConfig
from argrpo.grpo.trainer import build_run, train
from grpo_fixtures import run_overrides, shared_world
from transformers import TrainerCallback


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def optimizer_moments(trainer) -> list[torch.Tensor]:
    return [s[k].clone() for s in trainer.optimizer.state_dict()["state"].values() for k in ("exp_avg", "exp_avg_sq")]


def train_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "reward" in h]


# ---- GRPO ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world():
    return shared_world()


def _grpo_run(cfg, stop_at=None, resume=False):
    """Build and train one segment, recording the captions each rollout sampled -> (run, prompts per rollout)."""
    from argrpo.grpo.checkpointing import latest_checkpoint

    run = build_run(cfg)
    seen = []
    submit = run.pool.generate_async

    def recording(prompts, G, sampling=None):
        seen.append(list(prompts))
        return submit(prompts, G, sampling)

    run.pool.generate_async = recording
    if stop_at:
        run.trainer.add_callback(StopAt(stop_at))
    ckpt = latest_checkpoint(Path(cfg.output_dir) / "checkpoints") if resume else None
    try:
        run.trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    finally:
        run.close()
    return run, seen


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_grpo_four_steps_equal_two_plus_resume_plus_two(world, tmp_path, monkeypatch, variant):
    monkeypatch.syspath_prepend(str(world["plugins"]))
    kw = {"grpo.max_steps": 4, "checkpoint.every": 2, "checkpoint.keep": 1, "grpo.lr_scheduler_type": "linear",
          "grpo.warmup_steps": 1, "data.shuffle": True}
    if variant == "lora":
        kw.update({"policy.lora.enabled": True, "policy.lora.r": 4, "grpo.beta": 0.04, "grpo.learning_rate": 0.05})

    def cfg(out):
        return load_config(GRPORunConfig, None, run_overrides(world, out, **kw))

    straight, straight_prompts = _grpo_run(cfg(tmp_path / "straight"))
    first, first_prompts = _grpo_run(cfg(tmp_path / "split"), stop_at=2)
    assert first.trainer.state.global_step == 2
    assert [p.name for p in (tmp_path / "split" / "checkpoints").iterdir()] == ["step-0000002"]
    second, second_prompts = _grpo_run(cfg(tmp_path / "split"), resume=True)
    assert second.trainer.state.global_step == 4

    # the same data order: generation k of the split run samples exactly the straight run's prompts
    assert len(straight_prompts) == 4 and first_prompts + second_prompts == straight_prompts
    assert second.source.generations == [2, 3]
    # the same weights and optimizer state
    a, b = params(straight.trainer.model), params(second.trainer.model)
    assert a.keys() == b.keys() and (variant == "full" or all("lora_" in n for n in a))
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6), n
    for x, y in zip(optimizer_moments(straight.trainer), optimizer_moments(second.trainer), strict=True):
        assert torch.allclose(x, y, atol=1e-6)
    # the same logs: rewards, loss, learning rate (the schedule continued where it stopped), KL for LoRA
    rows = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == [1, 2, 3, 4]
    for key in ("reward", "reward_std", "loss", "learning_rate") + (("kl",) if variant == "lora" else ()):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in ref], abs=1e-6), key
    assert len({r["learning_rate"] for r in ref}) > 1  # the schedule really moves, so a reset would show


def test_grpo_resume_through_train_entry_point(world, tmp_path, monkeypatch):
    """`argrpo grpo --resume` goes through grpo.trainer.train: it finds the newest checkpoint itself and writes the
    final policy, which equals the straight run's. Two rewards, one z-scored with running statistics: those travel
    with the checkpoint (a reset would change the weighted sum, hence the advantages and the weights)."""
    from argrpo.grpo.checkpointing import read_run_state
    from safetensors.torch import load_file

    monkeypatch.syspath_prepend(str(world["plugins"]))
    kw = {"grpo.max_steps": 4, "checkpoint.every": 2, "checkpoint.save_final": True,
          "rewards": "[{name: 'user_rewards:redness', normalize: running}, {name: 'user_rewards:greenness'}]"}

    def cfg(out):
        return load_config(GRPORunConfig, None, run_overrides(world, out, **kw))

    train(cfg(tmp_path / "straight"))
    _grpo_run(cfg(tmp_path / "split"), stop_at=2)
    summary = train(cfg(tmp_path / "split"), resume=True)
    assert summary["resumed_from"].endswith("step-0000002") and summary["steps"] == 4
    norm = read_run_state(tmp_path / "split" / "checkpoints" / "step-0000002")["reward_norm"]
    assert norm["redness"]["count"] == 2 * 8 and "greenness" not in norm  # two steps of 8 samples
    rows = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    for key in ("rewards/redness/mean", "rewards/redness/raw_mean", "reward", "loss"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in ref], abs=1e-6), key
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "final" / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


# ---- pretrain -----------------------------------------------------------------------------------------------------
def test_pretrain_four_steps_equal_two_plus_resume_plus_two(vq_dir, tmp_path, monkeypatch):
    """Same weights (exactly), the same batches in the same order (caption dropout included) and the same losses."""
    import argrpo.grpo.lm_stage as lm
    from argrpo.grpo.lm_stage import PretrainConfig, run_lm_stage
    from safetensors.torch import load_file

    batches: list[str] = []  # each trained batch (prompt ids with dropout applied, then codes), in order
    loss = lm.visual_lm_loss

    def recording(model, batch, *args, **kwargs):
        batches.append(hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest())
        return loss(model, batch, *args, **kwargs)

    monkeypatch.setattr(lm, "visual_lm_loss", recording)

    def cfg(out):
        return load_config(PretrainConfig, None, [
            f"output_dir={out}", f"image_tokenizer={vq_dir}", f"cache_dir={tmp_path / 'cache'}", "policy.size=tiny",
            "data.shapes_n=48", "caption_dropout=0.3", "train.max_steps=4", "train.batch_size=16",
            "train.save_steps=2", "train.logging_steps=1", "train.report_to=[]", "train.learning_rate=0.003",
            "train.warmup_steps=1", "train.bf16=false", "train.threads=1"])

    straight = run_lm_stage(cfg(tmp_path / "straight"))
    straight_batches, batches[:] = list(batches), []
    first = run_lm_stage(cfg(tmp_path / "split"), callbacks=[StopAt(2)])
    first_batches, batches[:] = list(batches), []
    assert first.global_step == 2
    second = run_lm_stage(cfg(tmp_path / "split"))  # train.resume=auto: continues from checkpoint-2
    assert second.global_step == 4

    assert len(straight_batches) == 4  # 48 rows / 16 = 3 batches an epoch: the resume crosses an epoch boundary
    assert first_batches == straight_batches[:2] and batches == straight_batches[2:]
    assert len(set(straight_batches)) == 4
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    losses = [h["loss"] for h in straight.log_history if "loss" in h]
    resumed = [h["loss"] for h in second.log_history if "loss" in h]
    assert resumed[-2:] == pytest.approx(losses[2:], abs=1e-6)
    lrs = [h["learning_rate"] for h in second.log_history if "learning_rate" in h]
    assert lrs[-2:] == pytest.approx([h["learning_rate"] for h in straight.log_history if "learning_rate" in h][2:])
