"""Speculative Jacobi decoding (SJD) for the torch engine: several visual tokens per forward, same distribution.

Plain sampling spends one forward pass per token. SJD (Teng et al., 2024) keeps a window of ``W`` draft tokens
after each row's accepted prefix and checks them all in ONE forward pass; each pass accepts between 1 and ``W + 1``
tokens. What makes the samples follow the model's distribution exactly (not approximately) is the acceptance rule
of speculative sampling:

* every draft ``x_i`` was drawn from a known proposal ``q_i`` (a distribution fixed by what happened before it was
  drawn, never by ``x_i`` itself): uniform over the codebook, or a target distribution of an earlier pass;
* one forward over ``[last accepted token, x_0 .. x_{W-1}]`` gives the sampler's distribution ``p_i`` (temperature,
  CFG, top-k/top-p: :func:`rollout.sampling.final_logprobs`) at each window position, ``p_i`` conditioned on the
  drafts before it;
* scanning left to right, ``x_i`` is accepted with probability ``min(1, p_i(x_i) / q_i(x_i))`` (its prefix has been
  accepted, so ``p_i`` is the true conditional there); at the first rejection a token is drawn from the normalised
  residual ``max(0, p_i - q_i)``, and if every draft passed a bonus token is drawn from ``p_W``. Either way that
  token is distributed as ``p_i``: this is the standard speculative-sampling identity;
* the positions after the new token get new drafts (:meth:`_JacobiBatch._redraft`): the proposal is this pass's
  ``p`` there (conditioned on now-stale drafts: the Jacobi fixed-point guess; for positions entering the window,
  ``init``: ``"last"`` the last window position's ``p``, or ``"uniform"``) mixed with point masses on the code to
  the left and the code above (image tokens repeat their neighbours), and an earlier draft at the same position is
  kept by a maximal coupling when the new proposal allows it. Any proposal fixed before its draft is drawn keeps the
  result exact; these only raise the acceptance (measured in bench/jacobi.py).

The sampler logprob of a token is ``log p_i(x_i)`` from the pass that accepted it, whose prefix was already
correct, so it is the same number plain sampling reports (up to float rounding). Greedy (temperature 0) accepts a
draft iff it is the argmax of ``p_i`` and takes the argmax at the first mismatch: Jacobi fixed-point iteration,
whose output equals plain greedy decoding.

Batching with ragged progress (the KV cache, ``[R, heads, T, head_dim]`` per layer, ``R`` = rows incl. CFG's
uncond rows). Each row keeps its valid cache entries in one left-aligned run ``[pad_r, len_r)`` of physical
columns (``pad_r``: the row's left padding of the prompt block) followed by masked holes up to the common length
``T``. A pass appends its ``m + W`` input columns at ``T`` for every row (``m``: committed tokens, the whole prompt
on the first pass, then 1); afterwards each row's new columns are moved down to start at ``len_r`` (a scatter of
only those columns), only the committed tokens and the accepted drafts count as valid, and the cache is cropped to
the longest row. The attention mask (4-D additive for sdpa/eager, else 2-D) marks ``[pad_r, len_r)`` and the
new columns up to each query valid, every hole invalid; position ids are
per row (prompt length + visual index), so a hole changes nothing a row attends to. ``T`` stays at most
``prompt + N + W`` columns. Finished rows leave the batch. A CFG pair (cond row ``r``, uncond row ``r + b``) always
holds the same visual tokens; only its prompt differs.

Randomness: row ``i`` of a call draws from its own ``torch.Generator`` seeded ``seed + i`` (a fixed number of
uniforms per pass), so a sample depends on its seed and the weights, not on the batch or chunking. SJD consumes
randomness differently from plain sampling: the same seed gives a different sample, from the same distribution.

Entry point: :func:`jacobi_generate` (``TorchEngine.generate`` calls it when ``SamplingParams.jacobi``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from argrpo.rollout.engines.kv_cache import compact, crop, preallocated_cache, select_rows
from argrpo.rollout.sampling import final_logprobs, resolve_seed, sample_from_logprobs
from argrpo.rollout.types import Rollout, SamplingParams

DEFAULT_WINDOW = 16
DEFAULT_COPY_LEFT = 0.5
DEFAULT_COPY_UP = 0.45
INITS = ("last", "uniform")
# acceptance rules; only "speculative" keeps the model's distribution (the others exist so tests can show that a
# wrong rule is caught by the distribution check)
RULES = ("speculative", "always", "target_on_reject")


@dataclass
class JacobiStats:
    """Counters of one or more SJD calls.

    forward_steps: forward passes run (a batch pass counts once); plain_steps: the passes plain sampling needs for
    the same work (``N`` per batch chunk). row_steps: passes each row took until its ``N`` tokens were accepted.
    tested[j] / accepted[j]: drafts at window offset ``j`` that were checked / accepted (a draft is checked only if
    every draft before it in the window was accepted). tokens_per_pass[k]: row-passes that produced ``k`` tokens.
    """

    window: int
    forward_steps: int = 0
    plain_steps: int = 0
    row_steps: list[int] = field(default_factory=list)
    tested: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    tokens_per_pass: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.tested = self.tested or [0] * self.window
        self.accepted = self.accepted or [0] * self.window
        self.tokens_per_pass = self.tokens_per_pass or [0] * (self.window + 2)

    @property
    def step_ratio(self) -> float:
        """Plain forward passes / SJD forward passes (> 1: fewer passes)."""
        return self.plain_steps / max(self.forward_steps, 1)

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens a row gains per pass (over every row-pass)."""
        n = sum(self.tokens_per_pass)
        return sum(k * c for k, c in enumerate(self.tokens_per_pass)) / max(n, 1)

    @property
    def acceptance(self) -> list[float]:
        """P(draft at offset j accepted | checked), per offset (NaN where none was checked)."""
        return [a / t if t else float("nan") for a, t in zip(self.accepted, self.tested)]

    def summary(self) -> dict:
        return {
            "window": self.window,
            "forward_steps": self.forward_steps,
            "plain_steps": self.plain_steps,
            "step_ratio": self.step_ratio,
            "tokens_per_step": self.tokens_per_step,
            "mean_row_steps": sum(self.row_steps) / max(len(self.row_steps), 1),
            "acceptance_first": self.acceptance[0] if self.window else float("nan"),
            "acceptance": self.acceptance,
            "tokens_per_pass": list(self.tokens_per_pass),
        }


# ---- public entry point ----------------------------------------------------------------------------------------
@torch.inference_mode()
def jacobi_generate(
    engine,
    prompt_ids: list[list[int]],
    sampling: SamplingParams,
    window: int = DEFAULT_WINDOW,
    init: str = "last",
    stats: JacobiStats | None = None,
    couple: bool = True,
    copy_left: float = DEFAULT_COPY_LEFT,
    copy_up: float = DEFAULT_COPY_UP,
    _rule: str = "speculative",
) -> Rollout:
    """SJD with ``engine`` (a :class:`rollout.engines.torch_engine.TorchEngine`): same contract as its ``generate``.

    P prompts -> Rollout of ``P * sampling.n`` rows in prompt order: completion_ids int64 [P*n, N] visual LM ids,
    logprobs float32 [P*n, N] sampler logprobs. ``timings`` adds ``jacobi_forward_steps``, ``jacobi_plain_steps``
    and ``jacobi_tokens_per_step``; pass ``stats`` to collect the full counters (acceptance per window offset).
    """
    if window < 1:
        raise ValueError(f"jacobi window must be >= 1, got {window}")
    if init not in INITS:
        raise ValueError(f"unknown jacobi init {init!r}; known: {list(INITS)}")
    if not (0 <= copy_left and 0 <= copy_up and copy_left + copy_up < 1):
        raise ValueError(f"copy_left and copy_up must be >= 0 with a sum < 1, got {copy_left} and {copy_up}")
    if _rule not in RULES:
        raise ValueError(f"unknown acceptance rule {_rule!r}; known: {list(RULES)}")
    t0 = time.perf_counter()
    own = JacobiStats(window)
    prompts = engine._check_prompts(prompt_ids)
    n = sampling.n
    B = len(prompts) * n
    uncond = engine._uncond_prompts(prompts, sampling) if sampling.use_cfg else None
    seed = None if sampling.greedy else resolve_seed(sampling.seed)
    chunk = engine.max_batch_rows or B
    codes, logps = [], []
    for start in range(0, B, chunk):
        rows = torch.arange(start, min(start + chunk, B))
        c, lp = _JacobiBatch(engine, sampling, window, init, _rule, own, couple, copy_left, copy_up).run(
            [prompts[int(r) // n] for r in rows], None if uncond is None else [uncond[int(r) // n] for r in rows],
            None if seed is None else [seed + int(r) for r in rows]
        )
        codes.append(c)
        logps.append(lp)
    if stats is not None:
        _merge(stats, own)
    return Rollout(
        prompt_ids=[list(prompts[r // n]) for r in range(B)],
        completion_ids=torch.cat(codes).cpu() + engine.layout.visual_offset,
        logprobs=torch.cat(logps).float().cpu(),
        images=None,
        weight_version=engine.weight_version,
        timings={
            "generate": time.perf_counter() - t0,
            "jacobi_forward_steps": float(own.forward_steps),
            "jacobi_plain_steps": float(own.plain_steps),
            "jacobi_tokens_per_step": own.tokens_per_step,
        },
    )


def _merge(into: JacobiStats, new: JacobiStats) -> None:
    if into.window != new.window:
        raise ValueError(f"cannot merge stats of window {new.window} into window {into.window}")
    into.forward_steps += new.forward_steps
    into.plain_steps += new.plain_steps
    into.row_steps += new.row_steps
    into.tested = [a + b for a, b in zip(into.tested, new.tested)]
    into.accepted = [a + b for a, b in zip(into.accepted, new.accepted)]
    into.tokens_per_pass = [a + b for a, b in zip(into.tokens_per_pass, new.tokens_per_pass)]


# ---- one batch chunk ---------------------------------------------------------------------------------------------
class _JacobiBatch:
    """State of one chunk of ``b`` samples (``R = b`` or ``2b`` cache rows) while SJD runs; see the module docstring.

    Per active cond row: ``acc`` [b] accepted count, ``drafts`` [b, w] codes for positions ``acc .. acc + w - 1``,
    ``q`` [b, w, C] their proposal log-probs (None when greedy), ``out`` / ``out_lp`` [b, N + W + 1] tokens and
    sampler logprobs (positions >= acc are scratch). Per cache row: ``plen`` prompt length, ``pad`` left padding,
    ``vlen`` end of the valid run of physical cache columns.
    """

    def __init__(self, engine, sampling: SamplingParams, window: int, init: str, rule: str, stats: JacobiStats,
                 couple: bool = True, copy_left: float = 0.0, copy_up: float = 0.0):
        self.engine, self.sampling, self.W, self.init, self.rule, self.stats = engine, sampling, window, init, rule, stats
        self.couple, self.copy_left, self.copy_up = couple, float(copy_left), float(copy_up)
        self.config = engine.decoder.config
        self.dev = engine.device
        self.N = engine.layout.n_image_tokens
        self.C = engine.layout.codebook_size
        self.greedy = sampling.greedy

    # -- randomness: per row, fixed count per pass, so a row's stream does not depend on its batch
    def _uniforms(self, k: int) -> torch.Tensor:
        """float32 [b_active, k] in [0, 1) from the active rows' own generators."""
        u = torch.stack([torch.rand(k, generator=self.gens[i], dtype=torch.float64) for i in self.active.tolist()])
        return u.to(device=self.dev, dtype=torch.float32).clamp_(max=1.0 - 2**-24)

    def _draw(self, q: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        """Codes [b, w] drawn from proposal log-probs q [b, w, C] (argmax when greedy)."""
        if self.greedy:
            return q.argmax(-1)
        b, w, C = q.shape
        codes, _ = sample_from_logprobs(q.reshape(b * w, C), u.reshape(b * w))
        return codes.view(b, w)

    def _neighbour_weights(self, gw: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row weights of the left / above point masses, [b, 1] each: ``copy_left`` (``copy_up``) times the
        rate at which this row's accepted codes so far repeated their left (upper) neighbour (0 before any).
        Only accepted codes enter, so the proposal stays fixed before its draft is drawn."""
        n = self.out.shape[1]
        t = torch.arange(n, device=self.out.device)
        done = t[None] < self.acc[:, None]  # [b, n] accepted positions

        def rate(lag: int) -> torch.Tensor:
            if lag >= n:
                return torch.zeros(len(self.acc), 1, device=self.out.device)
            same = (self.out[:, lag:] == self.out[:, :-lag]) & done[:, lag:]
            seen = done[:, lag:].sum(-1, keepdim=True)
            return same.sum(-1, keepdim=True) / (seen + 1)

        return self.copy_left * rate(1), self.copy_up * rate(gw)

    def _redraft(self, q, fresh, old_d, old_q, prev, u):
        """Drafts for the next window, position by position: (codes [b, w], their proposal log-probs [b, w, C]).

        q [b, w, C]: this pass's target at each position (the base proposal); fresh [b, w]: no earlier draft there;
        old_d [b, w] / old_q [b, w, C]: the earlier draft and its proposal (ignored where fresh); prev [b]: the code
        before the window; u [b, >= 2w] uniforms.

        Neighbour prior: the proposal becomes ``(1 - a - b) q + a * delta(left code) + b * delta(code above)``,
        with ``a`` / ``b`` from :meth:`_neighbour_weights` (the left code is the new token or the draft just drawn,
        the code above comes from the accepted prefix or the drafts). Image tokens repeat their neighbours
        (backgrounds, flat regions), and ``q`` at the first re-drafted position was computed after a refused draft,
        so it often misses; on an image that does not repeat (or a random model) the weights fall towards 0.
        Coupling (``couple``): keep the earlier draft with probability min(1, q(x) / q_old(x)), else draw from
        the residual max(0, q - q_old): a maximal coupling, so the new draft is still distributed as ``q`` given
        everything before it, and drafts stop changing once their proposals settle. Each draft uses its own
        uniforms, so the speculative test of the next pass stays exact.
        """
        b, w, C = q.shape
        rows = torch.arange(b, device=q.device)
        drafts = torch.empty(b, w, dtype=torch.long, device=q.device)
        if self.copy_left > 0 or self.copy_up > 0:
            q = q.clone()
        gw = self.engine.layout.grid[1]
        seq = self.out.clone()  # accepted codes, then the drafts as they are drawn
        prior = self.copy_left > 0 or self.copy_up > 0
        if prior:
            lam_left, lam_up = self._neighbour_weights(gw)  # [b, 1] each
        for i in range(w):
            qi = q[:, i]
            pos = self.acc + i
            if prior:
                probs = qi.exp() * (1 - lam_left - lam_up)
                up = pos >= gw
                above = torch.where(up, seq.gather(1, (pos - gw).clamp(min=0)[:, None])[:, 0], prev)
                probs[rows, prev] += lam_left[:, 0]
                probs[rows, above] += lam_up[:, 0]  # first grid row: nothing above, the left code instead
                qi = q[:, i] = probs.log()
            if self.greedy:
                x = qi.argmax(-1)
            else:
                x, _ = sample_from_logprobs(qi, u[:, 2 * i])
                if self.couple:
                    xo = old_d[:, i]
                    lq_old = old_q[:, i]
                    keep = ~fresh[:, i] & (torch.log(u[:, 2 * i + 1]) < qi.gather(-1, xo[:, None])[:, 0]
                                           - lq_old.gather(-1, xo[:, None])[:, 0])
                    swap = ~fresh[:, i] & ~keep
                    if bool(swap.any()):
                        target = qi[swap].exp()
                        resid = (target - lq_old[swap].exp()).clamp_(min=0)
                        empty = resid.sum(-1) <= 0  # only by rounding (then keeping was certain)
                        resid[empty] = target[empty]
                        x[swap], _ = sample_from_logprobs(resid.log(), u[swap, 2 * i])
                    x = torch.where(keep, xo, x)
            drafts[:, i] = x
            seq.scatter_(1, pos[:, None], x[:, None])
            prev = x
        return drafts, (None if self.greedy else q)

    def _logits(self, ids, mask, pos, keep: int) -> torch.Tensor:
        """Forward through the cache; logits over the visual codes for the last ``keep`` positions, [R, keep, C]."""
        eng, vs = self.engine, self.engine.layout.visual_slice
        if not eng.visual_head:
            out = eng.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=self.cache,
                            use_cache=True, logits_to_keep=keep)
            return out.logits[:, -keep:, vs]
        return eng.family.visual_logits(eng.model, eng._hidden(ids, mask, pos, self.cache, keep))

    def _mask(self, T: int, q: int) -> torch.Tensor:
        """Attention mask for ``q`` new columns appended at physical column ``T``.

        Valid keys of row r: its run ``[pad_r, vlen_r)`` of cached columns and the new columns up to the query
        (causal), except prompt padding. A 4D additive mask [R, 1, q, T + q] for sdpa/eager (transformers then
        uses it as is), else the 2-D [R, T + q] form for transformers to combine with causality.
        """
        cols = torch.arange(T + q, device=self.dev)
        key_ok = (cols >= self.pad[:, None]) & ((cols < self.vlen[:, None]) | (cols >= T))  # [R, T + q]
        if self.config._attn_implementation not in ("sdpa", "eager"):
            return key_ok.long()
        causal = cols[None, :] <= (T + torch.arange(q, device=self.dev))[:, None]  # [q, T + q]
        allowed = key_ok[:, None, :] & causal[None]
        dtype = next(self.engine.decoder.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.dev).masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None]

    def _select(self, keep: torch.Tensor) -> None:
        """Keep only the cond rows ``keep`` (indices into the active rows) and their uncond partners."""
        b = self.acc.numel()
        cache_rows = torch.cat([keep, keep + b]) if self.cfg else keep
        select_rows(self.cache, cache_rows)
        for name in ("acc", "drafts", "q", "out", "out_lp", "steps", "active"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, v[keep.to(v.device)])
        for name in ("plen", "pad", "vlen", "committed"):
            setattr(self, name, getattr(self, name)[cache_rows])

    # -- the loop
    def run(self, prompts: list[list[int]], uncond: list[list[int]] | None, seeds: list[int] | None):
        """prompts: b lists of ids (one per sample), uncond: their b unconditional prompts (None: no CFG)
        -> (codes int64 [b, N], sampler logprobs float32 [b, N])."""
        dev, N, C, W, sp = self.dev, self.N, self.C, self.W, self.sampling
        b = len(prompts)
        self.cfg = uncond is not None
        seqs = prompts + (list(uncond) if self.cfg else [])
        Lp = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), Lp), self.engine.pad_token_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, Lp - len(s) :] = torch.tensor(s)
        self.plen = torch.tensor([len(s) for s in seqs], device=dev)
        self.pad = Lp - self.plen
        self.vlen = torch.zeros_like(self.plen)  # nothing cached yet
        self.committed = ids.to(dev)  # the whole prompt block goes in with the first pass
        self.cache = preallocated_cache(self.config, Lp + N + W, strict=True)
        self.gens = None
        if seeds is not None:
            self.gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        self.active = torch.arange(b)  # index into gens / final outputs
        self.acc = torch.zeros(b, dtype=torch.long, device=dev)
        self.steps = torch.zeros(b, dtype=torch.long, device=dev)
        self.out = torch.zeros(b, N + W + 1, dtype=torch.long, device=dev)
        self.out_lp = torch.zeros(b, N + W + 1, dtype=torch.float32, device=dev)
        final_codes = torch.zeros(b, N, dtype=torch.long, device=dev)
        final_lp = torch.zeros(b, N, dtype=torch.float32, device=dev)

        # first drafts: nothing computed yet, so the proposal is uniform over the codebook
        w = min(W, N)
        self.q = None if self.greedy else torch.full((b, w, C), -math.log(C), device=dev)
        u0 = None if self.greedy else self._uniforms(W)[:, :w]
        self.drafts = self._draw(self.q, u0) if not self.greedy else torch.zeros(b, w, dtype=torch.long, device=dev)
        self.stats.plain_steps += N

        while self.acc.numel():
            b, w = self.acc.numel(), self.drafts.shape[1]
            T = self.cache.get_seq_length()
            m = self.committed.shape[1]
            # -- one forward: committed tokens + drafts, for every cache row
            draft_ids = self.drafts + self.engine.layout.visual_offset
            inp = torch.cat([self.committed, torch.cat([draft_ids, draft_ids]) if self.cfg else draft_ids], 1)
            acc_r = torch.cat([self.acc, self.acc]) if self.cfg else self.acc
            if T == 0:  # prompt block: position 0 at each row's first real token
                committed_pos = (torch.arange(m, device=dev)[None] - self.pad[:, None]).clamp(min=0)
            else:  # the last accepted visual token, index acc - 1
                committed_pos = (self.plen + acc_r - 1)[:, None]
            draft_pos = (self.plen + acc_r)[:, None] + torch.arange(w, device=dev)
            mask = self._mask(T, m + w)
            logits = self._logits(inp, mask, torch.cat([committed_pos, draft_pos], 1), keep=w + 1)
            self.stats.forward_steps += 1
            self.steps += 1
            cond, unc = (logits[:b], logits[b:]) if self.cfg else (logits, None)
            p = final_logprobs(cond, unc, sp)  # [b, w + 1, C]: targets at positions acc .. acc + w

            # -- scan: leading run of accepted drafts
            u = None if self.greedy else self._uniforms(3 * W + 1)
            offs = torch.arange(w, device=dev)
            in_range = self.acc[:, None] + offs < N  # [b, w]
            lp_d = p[:, :w].gather(-1, self.drafts[..., None]).squeeze(-1)  # [b, w]
            if self.greedy:
                ok = self.drafts == p[:, :w].argmax(-1)
            elif self.rule == "always":
                ok = torch.ones_like(in_range)
            else:
                lq_d = self.q.gather(-1, self.drafts[..., None]).squeeze(-1)
                ok = torch.log(u[:, :w]) < lp_d - lq_d
            ok &= in_range
            na = ok.long().cumprod(-1).sum(-1)  # [b] accepted drafts
            need = self.acc + na < N  # a new token at position acc + na
            rows = torch.arange(b, device=dev)
            p_new = p[rows, na]  # [b, C]
            if self.greedy:
                new = p_new.argmax(-1)
            else:
                target = p_new.exp()
                if self.rule == "speculative":
                    q_new = torch.zeros_like(target)
                    rejected = na < w  # a draft was checked and refused (vs: every draft passed -> bonus from p)
                    q_new[rejected] = self.q[rows[rejected], na[rejected]].exp()
                    resid = (target - q_new).clamp_(min=0)
                    # the residual is empty only by rounding (p == q makes rejection impossible): fall back to p
                    empty = resid.sum(-1) <= 0
                    resid[empty] = target[empty]
                    target = resid
                new, _ = sample_from_logprobs(target.log(), u[:, W])
            lp_new = p_new.gather(-1, new[:, None]).squeeze(-1)

            # -- record: drafts 0..na-1 then the new token at na (later columns are scratch, rewritten later)
            vals = torch.cat([self.drafts, self.drafts.new_zeros(b, 1)], 1).scatter_(1, na[:, None], new[:, None])
            lvals = torch.cat([lp_d, lp_d.new_zeros(b, 1)], 1).scatter_(1, na[:, None], lp_new[:, None])
            cols_out = self.acc[:, None] + torch.arange(w + 1, device=dev)
            self.out.scatter_(1, cols_out, vals)
            self.out_lp.scatter_(1, cols_out, lvals)
            gained = na + need.long()
            self._count(ok, na, in_range, gained)

            # -- cache: keep committed + accepted drafts of each row, left-aligned after its valid run
            na_r = torch.cat([na, na]) if self.cfg else na
            dst = self.vlen.clone()
            self.vlen = self.vlen + m + na_r
            compact(self.cache, T, m + w, dst, int(self.vlen.max()))
            self.acc = self.acc + gained

            # -- finished rows leave
            done = self.acc >= N
            if bool(done.any()):
                idx = self.active[done.cpu()].to(dev)
                final_codes[idx] = self.out[done, :N]
                final_lp[idx] = self.out_lp[done, :N]
                self.stats.row_steps += self.steps[done].tolist()
                keep = (~done).nonzero().squeeze(-1)
                p, na, u = p[keep], na[keep], (None if u is None else u[keep])
                self._select(keep)
                if not self.acc.numel():
                    break
                crop(self.cache, int(self.vlen.max()))
            b = self.acc.numel()

            # -- next window: re-draft what follows the new token from this pass's p, new positions from init
            w_next = min(W, int((N - self.acc).max()))
            src = na[:, None] + 1 + torch.arange(w_next, device=dev)  # index into this pass's p [b, w + 1, C]
            fresh = src >= w  # no draft there yet (src == w: p exists, but no draft was proposed)
            rows = torch.arange(b, device=dev)[:, None]
            q_next = p[rows, src.clamp(max=w)]  # [b, w_next, C]; init "last": fresh positions take p at w
            if self.init == "uniform" and bool(fresh.any()):
                q_next[fresh & (src > w)] = -math.log(C)
            old = src.clamp(max=w - 1)
            prev = self.out.gather(1, (self.acc - 1)[:, None])[:, 0]
            self.drafts, self.q = self._redraft(q_next, fresh, self.drafts[rows, old],
                                                None if self.q is None else self.q[rows, old], prev,
                                                None if u is None else u[:, W + 1 :])
            last = self.out.gather(1, (self.acc - 1)[:, None]) + self.engine.layout.visual_offset
            self.committed = torch.cat([last, last]) if self.cfg else last

        self.cache = None
        return final_codes, final_lp

    def _count(self, ok, na, in_range, gained) -> None:
        w = ok.shape[1]
        offs = torch.arange(w, device=ok.device)
        tested = (offs[None] <= na[:, None]) & in_range
        accepted = offs[None] < na[:, None]
        t, a = tested.sum(0).tolist(), accepted.sum(0).tolist()
        for j in range(w):
            self.stats.tested[j] += t[j]
            self.stats.accepted[j] += a[j]
        for k in gained.tolist():
            self.stats.tokens_per_pass[k] += 1
