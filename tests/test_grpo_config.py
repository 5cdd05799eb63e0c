"""grpo.config: the shipped GRPO recipes load and validate; bad values fail with errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from argrpo.config import ConfigError, load_config
from argrpo.grpo.config import GRPORunConfig
from argrpo.grpo.trainer import trl_args

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"
RECIPES = [CONFIGS / "shapes" / "grpo.yaml", CONFIGS / "simplear" / "0.5b_grpo_clip.yaml"]
BASE = ["policy.checkpoint=ckpt", "rewards=[{name: geneval_dense}]", "data.train_prompts=shapes:train"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.parent.name + "/" + p.name)
def test_shipped_recipe_loads_and_builds_trl_args(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# argrpo grpo recipes/configs/{path.parent.name}/{path.name}")
    cfg = load_config(GRPORunConfig, path)
    args = trl_args(cfg, n_image_tokens=64, device=torch.device("cpu"))
    assert args.num_generations == cfg.grpo.num_generations and args.loss_type == cfg.grpo.loss_type
    assert args.temperature == cfg.rollout.sampling.temperature and args.max_completion_length == 64
    assert args.shuffle_dataset is False and args.save_strategy == "no"
    assert args.generation_batch_size % args.num_generations == 0


def test_simplear_recipe_has_the_published_settings():
    cfg = load_config(GRPORunConfig, RECIPES[1])
    g = cfg.grpo
    assert (g.learning_rate, g.lr_scheduler_type, g.num_generations, g.beta) == (1e-6, "cosine", 4, 0.04)
    assert cfg.rollout.engine == "vllm" and cfg.policy.layout == "simplear"
    assert cfg.rewards[0].name == "clip" and cfg.rewards[0].kwargs["model"] == "ViT-H-14"
    assert cfg.use_correction  # vLLM numerics differ from the learner's
    from argrpo.models.layout import layout_preset

    assert layout_preset("simplear", text_vocab_size=151_672).n_image_tokens == 4096
    args = trl_args(cfg, n_image_tokens=4096, device=torch.device("cpu"))
    assert args.max_completion_length == 4096 and args.beta == 0.04


def test_shapes_recipe_uses_the_geneval_reward():
    cfg = load_config(GRPORunConfig, RECIPES[0])
    assert cfg.rewards[0].name.startswith("geneval") and cfg.policy.checkpoint == "runs/shapes/sft"
    assert cfg.data.train_prompts == "shapes:train" and cfg.eval.prompts == "shapes:heldout"
    # bf16 where this CPU runs it natively; a bf16 learner scoring float32 samples turns the correction on
    from argrpo.models.runtime import bf16_is_fast

    assert cfg.grpo.bf16 is bf16_is_fast("cpu") and cfg.policy.dtype == "float32"
    assert cfg.use_correction is cfg.grpo.bf16
    assert cfg.grpo.generation_batch_size == 128 and cfg.grpo.prompts_per_generation == 16
    # LoRA adapters (embeddings and head stay as SFT left them), their rate, a cosine over the run's steps; budgeted
    # by steps alone, so every machine runs all 400
    assert cfg.policy.lora.enabled and cfg.policy.lora.r == 4 and cfg.grpo.learning_rate == 1e-3
    assert cfg.grpo.lr_scheduler_type == "cosine" and cfg.grpo.max_steps == 400 and cfg.budget_minutes is None


@pytest.mark.parametrize("override, message", [
    ("grpo.num_generations=1", "num_generations must be >= 2"),
    ("grpo.per_device_train_batch_size=12", "must be divisible by num_generations"),
    ("rollout.sampling.temperature=0.0", "temperature must be > 0"),
    ("rollout.sampling.n=4", "leave it at 1"),
    ("grpo.loss_type=ppo", "unknown 'ppo'"),
    ("grpo.trl={temperature: 0.5}", "set by argrpo from rollout.sampling.temperature"),
    ("grpo.trl={mask_truncated_completions: true}", "every completion would be masked"),
    ("grpo.trl={beta: 0.1}", "use grpo.beta"),
    ("grpo.trl={not_a_field: 1}", "not a TRL GRPOConfig field"),
    ("correction.mode=on", "expected one of ['auto', 'always', 'never']"),
    ("correction.level=token", "unknown 'token'"),
    ("rewards=[{name: a}, {name: a}]", "appear twice"),
    ("rewards=[]", "at least one reward"),
    ("eval.every=5", "needs eval.prompts or data.eval_prompts"),
    ("policy.lora.target_modules=[lm_head]", "not allowed"),
])
def test_bad_values_are_refused_by_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(GRPORunConfig, None, BASE + [override])
    assert message in str(e.value)


@pytest.mark.parametrize("term", ["grpo.beta=0.04", "grpo.entropy_coef=0.01"])
def test_skip_zero_advantage_is_refused_with_a_kl_or_entropy_term(term):
    with pytest.raises(ConfigError, match="skip_zero_advantage needs grpo.beta = 0"):
        load_config(GRPORunConfig, None, BASE + ["grpo.skip_zero_advantage=true", term])
    cfg = load_config(GRPORunConfig, None, BASE + ["grpo.skip_zero_advantage=true"])
    assert "skip_zero_advantage" not in trl_args(cfg, n_image_tokens=64, device=torch.device("cpu")).to_dict()


@pytest.mark.parametrize("overrides, skips", [
    ([], True),
    (["grpo.beta=0.04"], False),
    (["grpo.entropy_coef=0.01"], False),
    (["grpo.skip_zero_advantage=false"], False),
])
def test_skip_zero_advantage_auto_is_on_exactly_where_valid(overrides, skips):
    """The shipped recipe under a beta sweep (`--grid grpo.beta=0,0.04`): every trial's config loads."""
    cfg = load_config(GRPORunConfig, RECIPES[0], overrides)
    assert cfg.grpo.skip_zero_advantage in ("auto", False) and cfg.grpo.skips_zero_advantage is skips
    assert load_config(GRPORunConfig, None, BASE + overrides).grpo.skips_zero_advantage is skips


def test_generation_batch_counts_steps_per_generation():
    cfg = load_config(GRPORunConfig, None, BASE + ["grpo.per_device_train_batch_size=8",
                                                   "grpo.gradient_accumulation_steps=4", "grpo.num_generations=16"])
    assert cfg.grpo.generation_batch_size == 32 and cfg.grpo.prompts_per_generation == 2


@pytest.mark.parametrize("overrides, expected", [
    ([], False),
    (["rollout.sampling.cfg_scale=3.0"], True),
    (["rollout.sampling.top_k=50"], True),
    (["rollout.mode=async"], True),
    (["rollout.engine=vllm"], True),
    (["correction.mode=always"], True),
    (["grpo.bf16=true"], True),  # bf16 learner, float32 sampler
    (["grpo.bf16=true", "correction.mode=never"], False),
    (["rollout.mode=async", "correction.mode=never"], False),
])
def test_correction_auto(overrides, expected):
    assert load_config(GRPORunConfig, None, BASE + overrides).use_correction is expected


def test_trl_passthrough_reaches_grpo_config():
    cfg = load_config(GRPORunConfig, None, BASE + ["grpo.trl={num_generations_eval: 2, sapo_temperature_pos: 0.5}"])
    args = trl_args(cfg, 64, torch.device("cpu"))
    assert args.num_generations_eval == 2 and args.sapo_temperature_pos == 0.5


@pytest.mark.parametrize("flags, expected", [(frozenset({"avx2", "avx512_bf16"}), True),
                                             (frozenset({"avx2", "amx_bf16"}), True),
                                             (frozenset({"avx2", "fma"}), False)])
def test_bf16_auto_follows_the_cpu_features(monkeypatch, flags, expected):
    from argrpo.models import runtime

    monkeypatch.setattr(runtime, "cpu_flags", lambda: flags)
    cfg = load_config(GRPORunConfig, None, [*BASE, "device=cpu", "grpo.bf16=auto"])
    assert cfg.grpo.bf16 is expected
    assert trl_args(cfg, n_image_tokens=64, device=torch.device("cpu")).bf16 is expected
    # an explicit value is kept whatever the CPU
    assert load_config(GRPORunConfig, None, [*BASE, "device=cpu", "grpo.bf16=true"]).grpo.bf16 is True


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    from argrpo.models.runtime import cpu_flags

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_bf16\n\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_bf16_setting_that_is_not_a_switch_is_refused():
    with pytest.raises(ConfigError, match="grpo.bf16"):
        load_config(GRPORunConfig, None, [*BASE, "grpo.bf16=sometimes"])
