"""The torch engine's CPU fast paths give the plain path's results: column-major linear weights and the folded
grouped-query decode attention (no timings here; bench/NOTES.md has the measurements)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from argrpo.models.layout import TokenLayout
from argrpo.models.policy import build_policy
from argrpo.rollout.engines.torch_engine import TorchEngine, _sdpa_gqa_decode, column_major_linears
from argrpo.rollout.types import SamplingParams

LAYOUT = TokenLayout(name="custom", text_vocab_size=40, visual_offset=40, codebook_size=24, grid=(4, 4),
                     image_size=(16, 16))
PROMPTS = [[3, 4, 5, 6], [7, 8], [9, 10, 11]]


def _model(seed=0):
    return build_policy(LAYOUT, size="tiny", seed=seed)  # 2 query heads, 1 KV head: grouped-query attention


def test_column_major_weights_keep_the_samples_and_survive_weight_loads():
    plain = TorchEngine(_model(), LAYOUT, uncond_prompt_ids=[1, 2])
    fast_model = _model()
    fast = TorchEngine(fast_model, LAYOUT, uncond_prompt_ids=[1, 2], column_major_weights=True)
    linears = [m for m in fast_model.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(not m.weight.is_contiguous() and m.weight.t().is_contiguous() for m in linears)
    assert fast_model.lm_head.weight.is_contiguous()  # the head is left alone
    for cfg in (1.0, 3.0):
        sp = SamplingParams(temperature=1.0, cfg_scale=cfg, n=3, seed=5)
        a, b = plain.generate(PROMPTS, sp), fast.generate(PROMPTS, sp)
        assert torch.equal(a.completion_ids, b.completion_ids)
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)

    other = _model(seed=1)
    state = copy.deepcopy(other.state_dict())
    plain.load_weights(state, version=1)
    fast.load_weights(state, version=1)
    assert all(not m.weight.is_contiguous() for m in linears)  # the copy kept the layout...
    assert torch.equal(linears[0].weight, other.model.layers[0].self_attn.q_proj.weight)  # ...and took the values
    sp = SamplingParams(temperature=0.0, n=1)
    assert torch.equal(plain.generate(PROMPTS, sp).completion_ids, fast.generate(PROMPTS, sp).completion_ids)


def test_column_major_linears_skips_vectors_and_counts():
    m = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 1))
    x = torch.randn(5, 8)
    before = m(x)
    assert column_major_linears(m) == 1  # a [1, 6] weight gains nothing
    torch.testing.assert_close(m(x), before)


class _Attn(torch.nn.Module):
    num_key_value_groups = 4
    training = False


def test_folded_gqa_decode_attention_matches_repeated_heads():
    torch.manual_seed(0)
    B, H, KV, T, D = 3, 8, 2, 11, 16
    q = torch.randn(B, H, 1, D)
    cache_k, cache_v = torch.randn(B, KV, 20, D), torch.randn(B, KV, 20, D)
    k, v = cache_k[:, :, :T], cache_v[:, :, :T]  # growing views of a preallocated cache, as the engine hands out
    mask = torch.zeros(B, 1, 1, T)
    mask[0, ..., :4] = torch.finfo(torch.float32).min  # left padding of row 0
    out, _ = _sdpa_gqa_decode(_Attn(), q, k, v, mask, scaling=D**-0.5)
    rep = lambda x: x.repeat_interleave(H // KV, dim=1)  # noqa: E731 - transformers' repeat_kv pairing
    ref = F.scaled_dot_product_attention(q, rep(k), rep(v), attn_mask=mask, scale=D**-0.5).transpose(1, 2)
    assert out.shape == (B, 1, H, D)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
