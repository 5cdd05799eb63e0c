"""rollout.sampling: visual-only sampling, CFG in log-prob space, top-k/top-p, sampler logprobs, seeding."""

from __future__ import annotations

import math

import pytest
import torch
from argrpo.rollout.sampling import (
    cfg_combine,
    draw_uniforms,
    filter_top_k,
    filter_top_p,
    final_logprobs,
    sample_from_logprobs,
    sample_step,
    token_logprobs,
    visual_logprobs,
)
from argrpo.rollout.types import SamplingParams
from torch.utils._python_dispatch import TorchDispatchMode

V, OFF, C = 50, 20, 16  # vocab, visual offset, codebook
VS = slice(OFF, OFF + C)


def _logits(b, seed, text_boost=8.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, V, generator=g) * 3
    x[:, :OFF] += text_boost  # text and EOS ids are far more likely than any visual id
    x[:, OFF + C :] += text_boost
    return x


@pytest.mark.parametrize(
    "params",
    [
        dict(),
        dict(temperature=0.7, top_k=5),
        dict(temperature=1.3, top_p=0.8),
        dict(cfg_scale=3.0),
        dict(cfg_scale=5.0, top_k=3, top_p=0.9, temperature=0.5),
        dict(temperature=0.0, cfg_scale=2.0),
    ],
)
def test_only_visual_codes_come_out(params):
    sp = SamplingParams(**params)
    for seed in range(20):
        cond, unc = _logits(32, seed), _logits(32, 1000 + seed)
        u = draw_uniforms(seed, 32, 1)[:, 0]
        codes, logp = sample_step(cond, unc, sp, u, VS)
        assert codes.dtype == torch.int64 and codes.min() >= 0 and codes.max() < C
        assert torch.isfinite(logp).all() and (logp <= 0).all()


def test_cfg_is_combined_in_logprob_space():
    cond, unc = _logits(4, 1), _logits(4, 2)
    T, s = 0.8, 3.0
    lc = torch.log_softmax(cond[:, VS] / T, -1)
    lu = torch.log_softmax(unc[:, VS] / T, -1)
    expected = torch.log_softmax(lu + s * (lc - lu), -1)
    got = final_logprobs(cond, unc, SamplingParams(temperature=T, cfg_scale=s), VS)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(cfg_combine(lc, lu, 1.0), lc)
    with pytest.raises(ValueError, match="unconditional"):
        final_logprobs(cond, None, SamplingParams(cfg_scale=2.0), VS)


def test_visual_only_logits_give_the_same_distribution():
    cond, unc = _logits(3, 5), _logits(3, 6)
    sp = SamplingParams(temperature=0.9, cfg_scale=2.5, top_k=7)
    torch.testing.assert_close(
        final_logprobs(cond, unc, sp, VS), final_logprobs(cond[:, VS].clone(), unc[:, VS].clone(), sp, None)
    )


def test_top_k_and_top_p_keep_the_right_sets():
    scores = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]))
    kept = torch.isfinite(filter_top_k(scores, 2))
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    kept = torch.isfinite(filter_top_p(scores, 0.65))  # 0.4 + 0.3 reaches 0.65
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    kept = torch.isfinite(filter_top_p(scores, 0.01))  # always at least the best token
    assert kept.sum(-1).tolist() == [1, 1]


def test_filtered_codes_are_never_drawn():
    sp = SamplingParams(top_k=3)
    cond = _logits(256, 9)
    logp = final_logprobs(cond, None, sp, VS)
    allowed = torch.isfinite(logp)
    assert allowed.sum(-1).eq(3).all()
    # uniforms at the very edges of [0, 1) must still land on kept codes
    for u in (torch.zeros(256), torch.full((256,), 1.0 - 2**-24), torch.rand(256, generator=torch.Generator().manual_seed(0))):
        codes, lp = sample_from_logprobs(logp, u)
        assert allowed.gather(1, codes[:, None]).all()
        assert torch.isfinite(lp).all()


def test_sampler_logprob_is_the_final_distribution_and_matches_frequencies():
    sp = SamplingParams(temperature=0.8, cfg_scale=2.0, top_p=0.95)
    cond, unc = _logits(1, 3), _logits(1, 4)
    logp = final_logprobs(cond, unc, sp, VS)[0]
    torch.testing.assert_close(logp.exp().sum(), torch.tensor(1.0))
    n = 20000
    u = draw_uniforms(123, 1, n)[0]
    codes, lp = sample_from_logprobs(logp.expand(n, C), u)
    torch.testing.assert_close(lp, logp[codes])
    freq = torch.bincount(codes, minlength=C).float() / n
    p = logp.exp()
    # binomial standard error bound, 5 sigma
    assert ((freq - p).abs() <= 5 * torch.sqrt(p * (1 - p) / n) + 1e-6).all(), (freq, p)


def test_greedy_is_argmax_with_temperature_one_logprob():
    cond, unc = _logits(8, 11), _logits(8, 12)
    sp = SamplingParams(temperature=0.0, cfg_scale=2.0)
    codes, lp = sample_step(cond, unc, sp, None, VS)
    lc, lu = visual_logprobs(cond, 1.0, VS), visual_logprobs(unc, 1.0, VS)
    combined = lu + 2.0 * (lc - lu)
    assert torch.equal(codes, combined.argmax(-1))
    torch.testing.assert_close(lp, torch.log_softmax(combined, -1).gather(1, codes[:, None])[:, 0])


def test_uniforms_depend_only_on_the_row_seed():
    a = draw_uniforms(7, 4, 10)
    b = draw_uniforms(9, 2, 10)  # rows 2, 3 of seed 7 == rows 0, 1 of seed 9
    assert torch.equal(a[2:], b)
    assert not torch.equal(a[0], a[1])
    assert torch.equal(draw_uniforms(7, 4, 10), a)
    assert ((a >= 0) & (a < 1)).all()


def test_token_logprobs_matches_visual_log_softmax():
    logits = torch.randn(2, 5, V)
    ids = torch.randint(OFF, OFF + C, (2, 5))
    expected = torch.log_softmax(logits[..., VS] / 0.7, -1).gather(-1, (ids - OFF)[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, ids, VS, 0.7), expected)
    torch.testing.assert_close(token_logprobs(logits[..., VS], ids, VS, 0.7), expected)


class _Float32Allocs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.sizes.append(t.numel())
        return out


def test_no_full_vocabulary_float32_copy():
    big_v, b = 4096, 8
    vs = slice(1000, 1000 + 64)
    cond = torch.randn(b, big_v, dtype=torch.bfloat16)
    unc = torch.randn(b, big_v, dtype=torch.bfloat16)
    sp = SamplingParams(temperature=0.9, cfg_scale=3.0, top_k=10, top_p=0.9)
    u = draw_uniforms(0, b, 1)[:, 0]
    with _Float32Allocs() as mode:
        codes, _ = sample_step(cond, unc, sp, u, vs)
    assert codes.max() < 64
    assert mode.sizes and max(mode.sizes) <= b * 64, max(mode.sizes)


def test_temperature_sharpens():
    cond = _logits(1, 21)
    ent = []
    for t in (0.5, 1.0, 2.0):
        p = final_logprobs(cond, None, SamplingParams(temperature=t), VS).exp()
        ent.append(-(p * p.clamp_min(1e-30).log()).sum().item())
    assert ent[0] < ent[1] < ent[2] <= math.log(C) + 1e-5
