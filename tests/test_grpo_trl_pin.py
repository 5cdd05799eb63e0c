"""Pins the TRL behaviour grpo.trainer relies on where TRL has no public hook. If one of these fails after a TRL
upgrade, re-read the named TRL method and adapt grpo/trainer.py or grpo/logprobs.py before widening the pin."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import trl
from argrpo.grpo.config import CorrectionConfig
from argrpo.grpo.logprobs import reference_logprobs
from argrpo.grpo.trainer import ARGRPOTrainer
from argrpo.models.policy import load_policy
from datasets import Dataset
from grpo_fixtures import shared_world
from trl import GRPOConfig, GRPOTrainer


@pytest.fixture(scope="module")
def world():
    return shared_world()


def test_trl_version_is_the_one_these_pins_were_checked_against():
    major, minor = (int(x) for x in trl.__version__.split(".")[:2])
    assert (major, minor) == (1, 16), (
        f"TRL {trl.__version__}: grpo.trainer overrides TRL 1.16 internals (fused head call, vLLM IS path); "
        "re-check the pins in this file against the new GRPOTrainer before widening setup.cfg's trl pin")


def test_trl_source_still_has_the_paths_we_switch_on():
    gen = inspect.getsource(GRPOTrainer._generate)
    assert "self.use_vllm and self.state.global_step != self._last_loaded_step" in gen
    assert "self.vllm_generation.sync_weights()" in gen
    assert "self.rollout_func(prompts, self)" in gen
    score = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    assert "self.use_vllm and self.vllm_importance_sampling_correction" in score
    assert "old_per_token_logps - sampling_per_token_logps" in score
    assert 'output["importance_sampling_ratio"] = vllm_importance_sampling_ratio' in score
    loss = inspect.getsource(GRPOTrainer._compute_loss)
    assert 'per_token_loss = per_token_loss * inputs["importance_sampling_ratio"]' in loss
    logps = inspect.getsource(GRPOTrainer._get_per_token_logps_and_entropies)
    assert "fused_lm_head=True" in logps and "outputs.log_probs" in logps and "outputs.entropy" in logps


def _rows(n=8):
    return Dataset.from_dict({"prompt": [f"a photo of {i} circles" for i in range(n)],
                              "metadata": [f'{{"row": {i}}}' for i in range(n)]})


def _trainer(world, tmp_path, rollout_func, reward, beta=0.0, lora=False, G=4, **extra):
    loaded = load_policy(world["policy"])
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=G, per_device_train_batch_size=8, max_steps=1,
                      learning_rate=1e-3, beta=beta, loss_type="grpo", temperature=1.0,
                      max_completion_length=world["layout"].n_image_tokens, report_to="none", save_strategy="no",
                      disable_tqdm=True, shuffle_dataset=False, remove_unused_columns=False, use_cpu=True,
                      logging_steps=1, gradient_checkpointing=False, bf16=False, **extra)
    return ARGRPOTrainer(model=loaded.model, reward_funcs=[reward], args=args, train_dataset=_rows(),
                         processing_class=loaded.tokenizer, peft_config=peft_config, rollout_func=rollout_func,
                         layout=world["layout"], correction=None), loaded


def _ids(layout, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, layout.text_vocab_size, (B, 6), generator=g)
    comp = torch.randint(layout.visual_offset, layout.visual_end, (B, layout.n_image_tokens), generator=g)
    return torch.cat([prompt, comp], 1)


@pytest.mark.parametrize("setup", ["full", "full_ref", "lora_ref"])
def test_trl_scores_through_the_visual_head(world, tmp_path, setup):
    def reward(prompts, **kw):
        return [0.0] * len(prompts)

    trainer, loaded = _trainer(world, tmp_path, lambda p, t: None, reward, beta=0.0 if setup == "full" else 0.04,
                               lora=setup == "lora_ref")
    layout = world["layout"]
    ids = _ids(layout)
    mask = torch.ones_like(ids)
    n = layout.n_image_tokens
    model = trainer.model
    expected = reference_logprobs(model, ids, mask, n, layout, 1.0)
    logps, ent, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, n, compute_entropy=True)
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=1e-5)
    assert ent.shape == logps.shape and bool((ent > 0).all())
    if setup == "full_ref":  # TRL's separate reference model gets the same head
        ref, _, _ = trainer._get_per_token_logps_and_entropies(trainer.ref_model, ids, mask, n)
        torch.testing.assert_close(ref, expected, atol=1e-5, rtol=1e-5)
    if setup == "lora_ref":  # no copy: the reference is the same model with its adapter disabled
        assert trainer.ref_model is None and "ref" not in model.peft_config


def test_importance_weights_multiply_the_loss(world, tmp_path):
    def reward(prompts, **kw):
        return [0.0] * len(prompts)

    trainer, _ = _trainer(world, tmp_path, lambda p, t: None, reward)
    trainer._enable_sampler_correction(CorrectionConfig(level="token_truncate", cap=2.0))
    layout = world["layout"]
    ids = _ids(layout, B=4)
    n = layout.n_image_tokens
    inputs = {
        "prompt_ids": ids[:, :-n], "prompt_mask": torch.ones_like(ids[:, :-n]),
        "completion_ids": ids[:, -n:], "completion_mask": torch.ones_like(ids[:, -n:]),
        "advantages": torch.tensor([1.0, -0.5, 0.25, 2.0]),
        "num_items_in_batch": torch.tensor(4 * n),
        "importance_sampling_ratio": torch.ones(4, n),
    }
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop before each step
    base = trainer._compute_loss(trainer.model, inputs).item()
    inputs["importance_sampling_ratio"] = torch.full((4, n), 0.5)
    half = trainer._compute_loss(trainer.model, inputs).item()
    assert base != 0 and half == pytest.approx(base * 0.5, rel=1e-5)


def test_rollout_func_contract(world, tmp_path):
    """TRL hands each prompt's G copies in a row, merges returned list columns into the reward kwargs per sample,
    passes dataset columns through, and our stats reach its log line."""
    layout = world["layout"]
    seen = {}

    def rollout(prompts, trainer):
        seen["prompts"] = list(prompts)
        B = len(prompts)
        g = torch.Generator().manual_seed(1)
        comp = torch.randint(layout.visual_offset, layout.visual_end, (B, layout.n_image_tokens), generator=g)
        return {"prompt_ids": [[5, 6, 7]] * B, "completion_ids": comp.tolist(),
                "logprobs": [[-1.0] * layout.n_image_tokens] * B,
                "images": [np.full((4, 4, 3), i, np.uint8) for i in range(B)]}

    def reward(prompts, images=None, metadata=None, **kw):
        seen["images"], seen["metadata"], seen["reward_prompts"] = images, metadata, prompts
        return [float(im[0, 0, 0]) for im in images]

    trainer, _ = _trainer(world, tmp_path, rollout, reward)
    trainer.stats.set("probe/value", 3.0)
    trainer.train()
    p = seen["prompts"]
    assert len(p) == 8 and p[:4] == [p[0]] * 4 and p[4:] == [p[4]] * 4 and p[0] != p[4]
    assert [int(im[0, 0, 0]) for im in seen["images"]] == list(range(8))
    assert seen["reward_prompts"] == p and len(seen["metadata"]) == 8 and isinstance(seen["metadata"][0], str)
    log = [h for h in trainer.state.log_history if "reward" in h][0]
    assert log["probe/value"] == 3.0 and "advantages/std" in log
