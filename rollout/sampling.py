"""Logits processing for visual-token sampling, shared by every rollout engine.

Everything here works on the visual slice of the vocabulary (``logits[:, layout.visual_slice]``, a view), so only
the ``[B, C]`` visual block is ever copied to float32, never the full ``[B, V]`` vocabulary, and text or EOS ids
cannot be sampled: an image is always exactly ``grid_h * grid_w`` visual tokens.

The final distribution of one step, for temperature ``T`` and CFG scale ``s`` (no CFG when ``s == 1``)::

    lc = log_softmax(cond_logits[:, visual] / T)          # [B, C]
    lu = log_softmax(uncond_logits[:, visual] / T)        # [B, C]
    scores = lu + s * (lc - lu)                           # CFG in log-prob space
    scores = top_p(top_k(scores))                         # filtered entries become -inf
    logp = log_softmax(scores)                            # the sampler's distribution

and a token is drawn from ``exp(logp)``; its ``logp`` is the sampler logprob that the learner's importance
correction needs. ``T == 0`` is greedy: the argmax of the ``T == 1`` scores, reported with its ``T == 1`` logprob
(a point mass would report 0, which tells the learner nothing).

Randomness: a token is drawn by inverting the CDF at one uniform number per (sample, position). The uniforms of a
call are drawn up front, ``[B, N]``, one ``torch.Generator`` per row seeded with ``seed + row`` (see
:func:`draw_uniforms`), so a sample depends only on its own seed and the weights: not on batch size, padding,
or on how a pool splits the batch over workers. Fixed per-position uniforms also make sequential sampling a
deterministic function of the weights, which is what lets Jacobi (parallel fixed-point) decoding reproduce it.

Typical engine step::

    u = draw_uniforms(sampling.seed, B, N, device)                       # once per call
    codes, logp = sample_step(cond_logits, uncond_logits, sampling, u[:, t], visual_slice)
    ids = codes + layout.visual_offset
"""

from __future__ import annotations

import os

import torch
from argrpo.rollout.types import SamplingParams


# ---- the distribution ------------------------------------------------------------------------------------------
def visual_logits(logits: torch.Tensor, visual_slice: slice | None = None) -> torch.Tensor:
    """[B, V] -> [B, C] view on the visual slice (``visual_slice=None``: ``logits`` already holds only visual rows)."""
    return logits if visual_slice is None else logits[..., visual_slice]


def visual_logprobs(logits: torch.Tensor, temperature: float = 1.0, visual_slice: slice | None = None) -> torch.Tensor:
    """log_softmax over the visual slice at ``temperature`` (0 is treated as 1): [..., V] -> float32 [..., C]."""
    t = 1.0 if temperature == 0 else float(temperature)
    x = visual_logits(logits, visual_slice).float()  # copies only the visual block
    if t != 1.0:
        x = x / t
    return torch.log_softmax(x, dim=-1)


def cfg_combine(cond_logprobs: torch.Tensor, uncond_logprobs: torch.Tensor, scale: float) -> torch.Tensor:
    """``lu + scale * (lc - lu)`` on [B, C] log-probabilities (unnormalised result)."""
    if scale == 1.0:
        return cond_logprobs
    return uncond_logprobs + scale * (cond_logprobs - uncond_logprobs)


def filter_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest scores per row ([B, C]); others become -inf. ``k <= 0`` or ``k >= C``: unchanged."""
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def filter_top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter on [B, C] scores: keep the smallest set of top tokens whose mass reaches ``p`` (at least one)."""
    if p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    probs = torch.softmax(sorted_scores, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly better tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def final_logprobs(
    cond_logits: torch.Tensor,
    uncond_logits: torch.Tensor | None,
    sampling: SamplingParams,
    visual_slice: slice | None = None,
) -> torch.Tensor:
    """The sampler's distribution over visual codes, as normalised log-probabilities float32 [B, C].

    cond_logits / uncond_logits: [B, V] (with ``visual_slice``) or [B, C] (visual rows only). ``uncond_logits`` is
    required when ``sampling.use_cfg`` and ignored otherwise. Filtered-out codes get -inf.
    """
    lc = visual_logprobs(cond_logits, sampling.temperature, visual_slice)
    if sampling.use_cfg:
        if uncond_logits is None:
            raise ValueError(f"cfg_scale={sampling.cfg_scale} needs unconditional logits")
        lu = visual_logprobs(uncond_logits, sampling.temperature, visual_slice)
        scores = cfg_combine(lc, lu, sampling.cfg_scale)
    else:
        scores = lc
    if sampling.top_k or sampling.top_p < 1.0:
        scores = filter_top_p(filter_top_k(scores, sampling.top_k), sampling.top_p)
    elif not sampling.use_cfg:
        return scores  # already normalised
    return torch.log_softmax(scores, dim=-1)


# ---- drawing tokens ----------------------------------------------------------------------------------------------
def resolve_seed(seed: int | None) -> int:
    """``seed`` itself, or a fresh random 62-bit seed when None (so unseeded calls still differ)."""
    if seed is not None:
        return int(seed)
    return int.from_bytes(os.urandom(8), "little") >> 2


def draw_uniforms(seed: int, rows: int, n_tokens: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [rows, n_tokens] uniforms in [0, 1); row ``i`` comes from its own generator seeded ``seed + i``.

    Drawn on the CPU so CPU and GPU engines sample the same tokens from the same distribution.
    """
    out = torch.empty(rows, n_tokens, dtype=torch.float64)
    g = torch.Generator(device="cpu")
    for i in range(rows):
        g.manual_seed(int(seed) + i)
        out[i] = torch.rand(n_tokens, generator=g, dtype=torch.float64)
    return out.to(device=device, dtype=torch.float32).clamp_(max=1.0 - 2**-24)


def sample_from_logprobs(
    logprobs: torch.Tensor, uniforms: torch.Tensor | None = None, greedy: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one code per row of normalised log-probs [B, C] by inverting the CDF at ``uniforms`` [B].

    Returns (codes int64 [B], sampler logprobs float32 [B]). A code of probability 0 (filtered) is never drawn:
    the target stays strictly below the total mass, and a zero-mass code never raises the CDF.
    """
    if greedy:
        codes = logprobs.argmax(dim=-1)
    else:
        if uniforms is None:
            raise ValueError("non-greedy sampling needs uniforms (see draw_uniforms)")
        probs = logprobs.exp()
        cdf = torch.cumsum(probs, dim=-1)
        total = cdf[:, -1:]
        target = torch.minimum(uniforms.to(cdf.dtype).reshape(-1, 1) * total, torch.nextafter(total, total.new_zeros(())))
        codes = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=logprobs.shape[-1] - 1)
    return codes, logprobs.gather(-1, codes.unsqueeze(-1)).squeeze(-1)


def sample_step(
    cond_logits: torch.Tensor,
    uncond_logits: torch.Tensor | None,
    sampling: SamplingParams,
    uniforms: torch.Tensor | None,
    visual_slice: slice | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampling step: logits [B, V] or [B, C] -> (codes int64 [B] in 0..C-1, sampler logprobs float32 [B])."""
    logp = final_logprobs(cond_logits, uncond_logits, sampling, visual_slice)
    return sample_from_logprobs(logp, uniforms, greedy=sampling.greedy)


# ---- scoring (learner side and tests) -------------------------------------------------------------------------
def token_logprobs(
    logits: torch.Tensor, ids: torch.Tensor, visual_slice: slice, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probabilities of visual LM ids under the visual-slice softmax at ``temperature``.

    logits: [B, N, V] (or [B, N, C] visual rows only, then pass ``slice(offset, offset + C)`` anyway: only
    ``visual_slice.start`` is used to map ids to codes); ids: int64 [B, N] LM ids -> float32 [B, N].
    With ``cfg_scale == 1`` and no top-k/top-p this equals the sampler logprob of the same tokens.
    """
    full = logits.shape[-1] > (visual_slice.stop - visual_slice.start)
    logp = visual_logprobs(logits, temperature, visual_slice if full else None)
    return logp.gather(-1, (ids - visual_slice.start).unsqueeze(-1)).squeeze(-1)
