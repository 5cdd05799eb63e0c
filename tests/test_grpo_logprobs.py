"""grpo.logprobs: the learner's visual-slice head against plain logits, gradients, errors."""

from __future__ import annotations

import pytest
import torch
from argrpo.grpo.logprobs import install_visual_head, reference_logprobs, visual_token_logprobs
from argrpo.models.layout import TokenLayout
from transformers import Qwen2Config, Qwen2ForCausalLM

LAYOUT = TokenLayout(name="custom", text_vocab_size=20, visual_offset=20, codebook_size=24, grid=(2, 3),
                     image_size=(8, 12), prompt_template="{caption}")
VOCAB = 64  # text ids, 24 visual ids, then padding rows that must not enter the softmax


def tiny(seed=0, tie=False):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return Qwen2ForCausalLM(cfg).eval()


def batch(seed=0, B=3, prompt=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(0, 20, (B, prompt), generator=g),
                     torch.randint(20, 44, (B, LAYOUT.n_image_tokens), generator=g)], dim=1)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row
    return ids, mask


def fused_call(model, ids, mask, n):
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-n] = -100
    return model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("tie", [False, True])
def test_visual_head_matches_plain_logits(temperature, tie):
    model = tiny(tie=tie)
    ids, mask = batch()
    n = LAYOUT.n_image_tokens
    ref = reference_logprobs(model, ids, mask, n, LAYOUT, temperature)
    install_visual_head(model, LAYOUT, temperature)
    out = fused_call(model, ids, mask, n)
    assert out.log_probs.shape == (3, ids.shape[1] - 1)
    torch.testing.assert_close(out.log_probs[:, -n:], ref, atol=1e-5, rtol=1e-5)
    assert torch.all(out.log_probs[:, :-n] == 0)
    # entropy over the visual slice only: between 0 and log(C)
    ent = out.entropy[:, -n:]
    assert torch.all(ent > 0) and torch.all(ent <= torch.log(torch.tensor(24.0)) + 1e-5)
    # the full-vocabulary normalisation would give different (smaller) log-probs
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float() / temperature, -1)
    full_lp = full[:, -n - 1 : -1].gather(-1, ids[:, -n:].unsqueeze(-1)).squeeze(-1)
    assert (out.log_probs[:, -n:] - full_lp).min() > 1e-3


def test_plain_forward_and_generation_path_untouched():
    model = tiny()
    ids, mask = batch()
    before = model(input_ids=ids, attention_mask=mask).logits
    install_visual_head(model, LAYOUT, 1.0)
    after = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(before, after)
    with pytest.raises(ValueError, match="already has a visual head"):
        install_visual_head(model, LAYOUT, 1.0)


def test_gradient_reaches_only_visual_rows_of_the_head():
    model = tiny()
    install_visual_head(model, LAYOUT, 1.0)
    ids, mask = batch()
    out = fused_call(model, ids, mask, LAYOUT.n_image_tokens)
    out.log_probs.sum().backward()
    g = model.lm_head.weight.grad
    assert g[LAYOUT.visual_slice].abs().sum() > 0
    assert g[: LAYOUT.visual_offset].abs().sum() == 0 and g[LAYOUT.visual_end :].abs().sum() == 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_chunking_and_checkpointing_do_not_change_values_or_grads():
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(24, 16, requires_grad=True)
    codes = torch.randint(0, 24, (37,))
    lp1, e1 = visual_token_logprobs(h, w, codes, 0.9)
    (lp1.sum() + e1.sum()).backward()
    g1h, g1w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    lp2, e2 = visual_token_logprobs(h, w, codes, 0.9, chunk_elements=24 * 5)  # 5 rows a chunk
    (lp2.sum() + e2.sum()).backward()
    torch.testing.assert_close(lp1, lp2)
    torch.testing.assert_close(e1, e2)
    torch.testing.assert_close(g1h, h.grad)
    torch.testing.assert_close(g1w, w.grad)


def test_a_text_label_is_refused():
    model = tiny()
    install_visual_head(model, LAYOUT, 1.0)
    ids, mask = batch()
    ids[1, -1] = 3  # a text id where an image token must be
    with pytest.raises(ValueError, match="outside the visual ids"):
        fused_call(model, ids, mask, LAYOUT.n_image_tokens)


def test_softcapped_heads_are_refused():
    model = tiny()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        install_visual_head(model, LAYOUT, 1.0)
