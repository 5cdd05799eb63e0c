"""Janus-Pro through the model-family seam, on tiny random-weight instances of transformers' own Janus classes."""

from __future__ import annotations

import pytest
import torch
from argrpo.models.families import JanusFamily, check_engine, detect_family
from argrpo.models.policy import load_policy
from argrpo.rollout.engines.torch_engine import TorchEngine
from argrpo.rollout.types import SamplingParams
from janus_fixtures import save_tiny_janus, tiny_janus

CAPTIONS = ["a red circle", "two blue square left of a green triangle"]


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory):
    return save_tiny_janus(tmp_path_factory.mktemp("janus") / "ckpt")


@pytest.fixture(scope="module")
def loaded(janus_dir):
    return load_policy(janus_dir)


def _engine(loaded):
    return TorchEngine(loaded.model, loaded.layout, tokenizer=loaded.tokenizer, family=loaded.family)


def test_detected_from_config_and_loaded_as_shipped(janus_dir, loaded):
    assert detect_family(janus_dir) is JanusFamily and isinstance(loaded.family, JanusFamily)
    lay = loaded.layout
    assert lay.n_image_tokens == 16 and lay.codebook_size == 512 and lay.image_size == (64, 64)
    assert lay.visual_offset >= len(loaded.tokenizer)
    with pytest.raises(ValueError, match="'janus' model family.*rollout.engine: torch"):
        check_engine(loaded.family, "vllm")


def test_prompt_and_uncond_prompt(loaded):
    fam, tok = loaded.family, loaded.tokenizer
    ids = fam.encode_prompts(tok, ["a red circle"])[0]
    boi = tok.convert_tokens_to_ids("<begin_of_image>")
    assert ids[0] == tok.bos_token_id and ids[-1] == boi and len(ids) > 3
    unc = fam.uncond_prompt_ids(tok, ids)
    assert unc == [tok.bos_token_id] + [tok.pad_token_id] * (len(ids) - 2) + [boi]


@pytest.mark.parametrize("scale", [2.0, 5.0])  # transformers fails below 1 < scale
def test_greedy_cfg_tokens_equal_transformers_generate(loaded, scale):
    fam, tok, model = loaded.family, loaded.tokenizer, loaded.model
    prompts = fam.encode_prompts(tok, CAPTIONS)  # different lengths: left padding on both sides
    L = max(map(len, prompts))
    ids = torch.full((len(prompts), L), tok.pad_token_id)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.generation_kwargs = {"boi_token_id": tok.convert_tokens_to_ids("<begin_of_image>")}
    ref = model.generate(ids, attention_mask=mask, generation_mode="image", do_sample=False, guidance_scale=scale)
    roll = _engine(loaded).generate(prompts, SamplingParams(n=1, temperature=0.0, cfg_scale=scale))
    assert torch.equal(roll.completion_ids - loaded.layout.visual_offset, ref)


def _teacher_forced(loaded, prompts, completion, temperature):
    """Log-probs of completion [B, N] (LM ids) recomputed in one forward without a cache, through generation_head."""
    fam, model = loaded.family, loaded.model
    rows = [p + c for p, c in zip(prompts, completion.tolist())]
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), loaded.tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, L - len(r):], mask[i, L - len(r):] = torch.tensor(r), 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        h = fam.decoder(model)(**fam.decoder_inputs(model, ids), attention_mask=mask, position_ids=pos).last_hidden_state
        N = completion.shape[1]
        logits = model.model.generation_head(h[:, -N - 1:-1]).float() / temperature
    codes = completion - loaded.layout.visual_offset
    return torch.log_softmax(logits, -1).gather(-1, codes[..., None])[..., 0]


def test_sampler_logprobs_equal_teacher_forced_recompute(loaded):
    prompts = loaded.family.encode_prompts(loaded.tokenizer, CAPTIONS)
    sp = SamplingParams(n=3, temperature=0.9, seed=7)
    roll = _engine(loaded).generate(prompts, sp)
    assert roll.completion_ids.shape == (6, 16) and bool(loaded.layout.is_visual(roll.completion_ids).all())
    ref = _teacher_forced(loaded, [p for p in prompts for _ in range(3)], roll.completion_ids, 0.9)
    assert torch.allclose(roll.logprobs, ref, atol=1e-4)


def test_learner_head_scores_the_sampler_distribution(janus_dir):
    """The learner's patched forward (what TRL calls with fused_lm_head=True) returns the sampler's log-probs:
    the importance ratio is 1 on policy without CFG."""
    from argrpo.grpo.logprobs import install_visual_head

    pol = load_policy(janus_dir)
    prompts = pol.family.encode_prompts(pol.tokenizer, CAPTIONS[:1])
    roll = _engine(pol).generate(prompts, SamplingParams(n=2, temperature=1.0, seed=3))
    install_visual_head(pol.model, pol.family, 1.0)
    ids = torch.cat([torch.tensor(roll.prompt_ids), roll.completion_ids], 1)
    labels = ids.clone()
    labels[:, : len(prompts[0])] = -100
    out = pol.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)
    lp = out.log_probs[:, -16:]
    assert torch.allclose(lp, roll.logprobs, atol=1e-4)
    assert torch.allclose(torch.exp(lp - roll.logprobs), torch.ones_like(lp), atol=1e-4)


def test_decode_gives_images_of_the_configured_size(loaded):
    prompts = loaded.family.encode_prompts(loaded.tokenizer, CAPTIONS)
    roll = _engine(loaded).generate(prompts, SamplingParams(n=1, temperature=1.0, seed=1))
    images = loaded.image_decoder().decode(loaded.layout.ids_to_codes(roll.completion_ids))
    assert images.shape == (2, 64, 64, 3) and images.dtype == torch.uint8
    codes = loaded.image_decoder().encode(images)  # what an SFT token cache stores
    assert codes.shape == (2, 4, 4) and 0 <= int(codes.min()) and int(codes.max()) < 512


def test_save_then_transformers_from_pretrained_gives_equal_logits(loaded, tmp_path):
    from transformers import JanusForConditionalGeneration

    out = loaded.family.save(tmp_path / "saved", loaded.model, loaded.tokenizer)
    again = JanusForConditionalGeneration.from_pretrained(str(out)).eval()
    ids = torch.tensor(loaded.family.encode_prompts(loaded.tokenizer, CAPTIONS[:1]))
    with torch.no_grad():
        a = loaded.model(input_ids=ids).logits
        b = again(input_ids=ids).logits
        ha = loaded.model.model.generation_head(loaded.model.model.language_model(input_ids=ids).last_hidden_state)
        hb = again.model.generation_head(again.model.language_model(input_ids=ids).last_hidden_state)
    assert torch.equal(a, b) and torch.equal(ha, hb)
    back = load_policy(out)
    assert isinstance(back.family, JanusFamily) and back.layout == loaded.layout


def test_lora_adapts_the_language_model_only(loaded):
    from argrpo.models.policy import apply_lora

    model, _tok = tiny_janus(seed=1)
    lora = apply_lora(model, r=4, alpha=8, family=loaded.family)
    adapted = {n.split(".lora_")[0] for n, _ in lora.named_parameters() if "lora_" in n}
    assert adapted and all("language_model" in n for n in adapted)


def test_jacobi_greedy_equals_plain_greedy_with_cfg(loaded):
    """Speculative Jacobi decoding runs through the same seam (drafts embed through generation_embeddings)."""
    prompts = loaded.family.encode_prompts(loaded.tokenizer, CAPTIONS)
    eng = _engine(loaded)
    plain = eng.generate(prompts, SamplingParams(n=1, temperature=0.0, cfg_scale=3.0))
    sjd = eng.generate(prompts, SamplingParams(n=1, temperature=0.0, cfg_scale=3.0, jacobi=True))
    assert torch.equal(plain.completion_ids, sjd.completion_ids)
    assert torch.allclose(plain.logprobs, sjd.logprobs, atol=1e-4)
