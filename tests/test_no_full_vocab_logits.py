"""No stage materialises a ``[*, vocab_size]`` floating-point logits tensor for image positions.

A ``TorchDispatchMode`` sees every tensor any ATen op produces (forward, backward, activation-checkpoint
recomputation, the optimizer step) and records those whose last dimension equals the model's full vocabulary.
Checked: the pretrain/SFT loss (``grpo.lm_stage.visual_lm_loss``, forward + backward), a real TRL GRPO learner
step (``grpo.trainer``, full and LoRA with a KL reference and the importance-sampling correction), and the torch
rollout engine with CFG. The positive controls show that the watcher does fire on the paths these stages avoid
(a plain Hugging Face forward; TRL's own fused head, which tiles the full vocabulary).
"""

from __future__ import annotations

import pytest
import torch
from argrpo.config import load_config
from argrpo.grpo.config import GRPORunConfig
from argrpo.grpo.lm_stage import CodesCollator, visual_lm_loss
from argrpo.grpo.trainer import build_run
from argrpo.models.policy import load_policy
from grpo_fixtures import run_overrides, shared_world
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class FullVocabWatch(TorchDispatchMode):
    """Records (op, shape, dtype) of every floating-point tensor with ``shape[-1] == vocab`` created inside."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = int(vocab)
        self.hits: list[tuple[str, tuple[int, ...], torch.dtype]] = []
        self.ops: set[str] = set()  # every op seen: proves the watched region really ran backward/optimizer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        for t in tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab
                    and t.is_floating_point()):
                self.hits.append((str(func), tuple(t.shape), t.dtype))
        return out


@pytest.fixture(scope="module")
def world():
    return shared_world()


@pytest.fixture(scope="module")
def policy(world):
    loaded = load_policy(world["policy"])
    cfg, layout = loaded.model.config, loaded.layout
    vocab = cfg.vocab_size
    # the watcher keys on the last dimension: it must not coincide with any other size these stages produce
    others = {cfg.hidden_size, cfg.intermediate_size, layout.codebook_size, layout.n_image_tokens,
              layout.text_vocab_size, cfg.hidden_size // cfg.num_attention_heads}
    assert vocab not in others, f"vocab {vocab} collides with another model dimension {sorted(others)}"
    return loaded


def _sft_batch(loaded, captions, seed=0):
    tok, layout = loaded.tokenizer, loaded.layout
    g = torch.Generator().manual_seed(seed)
    items = [{"prompt_ids": tok(layout.format_prompt(c), add_special_tokens=False)["input_ids"],
              "codes": torch.randint(0, layout.codebook_size, (layout.n_image_tokens,), generator=g)}
             for c in captions]
    return CodesCollator(layout, tok.pad_token_id or 0)(items)


def test_watcher_catches_a_plain_forward(policy):
    """Positive control: the usual ``model(...).logits`` path is caught, in forward and in backward."""
    model = policy.model.train()
    b = _sft_batch(policy, ["a photo of a red circle", "a photo of two squares"])
    watch = FullVocabWatch(model.config.vocab_size)
    with watch:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logits.float().log_softmax(-1).mean().backward()
    model.zero_grad(set_to_none=True)
    assert any("mm" in op or "linear" in op for op, _, _ in watch.hits), watch.hits[:3]
    assert any(shape[:-1] == tuple(b["input_ids"].shape) for _, shape, _ in watch.hits)


@pytest.mark.parametrize("text_loss_weight", [0.0, 0.5])
def test_pretrain_sft_loss_builds_no_full_vocab_logits(policy, text_loss_weight):
    model = policy.model.train()
    b = _sft_batch(policy, ["a photo of a red circle", "a photo of a blue square above a green triangle"])
    watch = FullVocabWatch(model.config.vocab_size)
    with watch:
        loss, metrics = visual_lm_loss(model, b, policy.layout, text_loss_weight=text_loss_weight)
        loss.backward()
    assert any("backward" in op for op in watch.ops)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    assert grads and torch.isfinite(loss)  # the step really ran and reached the weights
    assert ("text_loss" in metrics) == (text_loss_weight > 0)
    assert watch.hits == []


@pytest.fixture
def plugins(world, monkeypatch):
    monkeypatch.syspath_prepend(str(world["plugins"]))


@pytest.mark.parametrize("variant", ["full_async", "lora_kl_cfg"])
def test_grpo_learner_step_builds_no_full_vocab_logits(world, plugins, policy, tmp_path, variant):
    """One real TRL learner step: old/ref log-probs, the loss, backward and AdamW, watched end to end.

    The rollouts run on the in-process pool's own thread (dispatch modes are per thread); the engine is
    checked on its own below.
    """
    kw = {"grpo.max_steps": 1}
    if variant == "full_async":
        kw.update({"rollout.mode": "async"})  # async switches the importance correction on: old log-probs too
    else:
        kw.update({"policy.lora.enabled": True, "policy.lora.r": 4, "grpo.beta": 0.04,
                   "rollout.sampling.cfg_scale": 3.0})
    run = build_run(load_config(GRPORunConfig, None, run_overrides(world, tmp_path, **kw)))
    model = run.trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    watch = FullVocabWatch(policy.model.config.vocab_size)
    try:
        with watch:
            run.trainer.train()
    finally:
        run.close()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    logs = [h for h in run.trainer.state.log_history if "loss" in h]
    assert logs and "sampling/importance_sampling_ratio/mean" in logs[0]  # the old-logprob pass ran
    if variant == "lora_kl_cfg":
        assert "kl" in logs[0]  # the reference (adapter-disabled) pass ran
    # the watched region covered the backward pass and Adam's update, not only the forward
    assert any("backward" in op for op in watch.ops) and "aten.addcdiv_.default" in watch.ops
    assert watch.hits == []


def test_trl_default_head_would_be_caught(world, policy):
    """Positive control for the learner: TRL's fused head (full-vocabulary tiles) trips the watcher, which is
    why grpo.logprobs replaces it with the visual-slice head."""
    from trl.trainer.utils import add_fused_lm_head

    loaded = load_policy(world["policy"])
    model = loaded.model.train()
    add_fused_lm_head(model, temperature=1.0, outputs=("log_probs", "entropy"))
    b = _sft_batch(policy, ["a photo of a red circle", "a photo of two squares"])
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    labels[:, : -policy.layout.n_image_tokens] = -100
    watch = FullVocabWatch(model.config.vocab_size)
    with watch:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels, fused_lm_head=True)
        out.log_probs.sum().backward()
    assert watch.hits


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_torch_engine_rollout_builds_no_full_vocab_logits(policy, cfg_scale):
    from argrpo.rollout.engines.torch_engine import TorchEngine
    from argrpo.rollout.types import SamplingParams

    tok, layout = policy.tokenizer, policy.layout
    engine = TorchEngine(policy.model, layout, tokenizer=tok)
    prompts = [tok(layout.format_prompt(c), add_special_tokens=False)["input_ids"]
               for c in ("a photo of a red circle", "a photo of three squares")]
    watch = FullVocabWatch(policy.model.config.vocab_size)
    with watch:
        out = engine.generate(prompts, SamplingParams(n=2, cfg_scale=cfg_scale, seed=0))
    assert out.completion_ids.shape == (4, layout.n_image_tokens)
    assert watch.hits == []
