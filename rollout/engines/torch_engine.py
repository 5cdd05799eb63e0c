"""The built-in PyTorch rollout engine: batched, KV-cached, fixed-length visual-token sampling.

The model family (``models.families``) says how image codes are embedded and scored; this module never asks
which family it runs. Per call (``B = P * n`` samples, ``N = layout.n_image_tokens``):

1. Prefill once per distinct prompt (plus each distinct unconditional prompt when CFG is on), left-padded to a common
   length with an attention mask and position ids that start at 0 on each row's first real token.
2. Expand the KV cache to ``B`` conditional rows (+ ``B`` unconditional rows with CFG): the cond and uncond
   branches advance in the same forward pass, ``[2B, 1]`` tokens per step.
3. Each step computes the family's visual logits for the last position only (shared vocabulary: the visual rows
   of the output embedding, ``hidden @ W[visual].T``: ``C`` instead of ``V`` outputs), then samples with
   :mod:`rollout.sampling`. ``N`` tokens take ``N`` forward passes (the prefill yields the first).

Sampling is seeded per sample (``seed + row``), so results do not depend on batch size or chunking.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from argrpo.models.families import family_for_layout, unwrap_model
from argrpo.models.layout import TokenLayout
from argrpo.rollout.engines.base import register_engine
from argrpo.rollout.engines.kv_cache import preallocated_cache
from argrpo.rollout.sampling import draw_uniforms, resolve_seed, sample_step
from argrpo.rollout.types import Rollout, SamplingParams

_GQA_DECODE_ATTENTION = "argrpo_sdpa_gqa_decode"


def _sdpa_gqa_decode(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention, except one-query steps with a padding mask read the grouped K/V in place.

    transformers repeats K/V to every query head whenever a mask is given (``repeat_kv``: a copy of the whole
    cache per layer per step, measured 24% of a decode step at 8 heads / 4 KV heads). With one query position the
    ``H / KV`` query heads that share a KV head can stand in the query-length axis instead: ``[B, H, 1, D] ->
    [B, KV, H/KV, D]`` against the un-repeated ``[B, KV, T, D]`` cache, the mask broadcast over them (head ``h``
    reads KV head ``h // (H/KV)``, repeat_kv's pairing). Measured 17% less time per layer than SDPA's own
    ``enable_gqa`` on CPU (bench/NOTES.md). Anything else goes to transformers' own function, so this is a drop-in
    replacement.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if (attention_mask is None or groups == 1 or query.shape[2] != 1 or kwargs.get("cache") is not None
            or key.shape[1] * groups != query.shape[1]):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    B, H, _, D = query.shape
    out = F.scaled_dot_product_attention(
        query.reshape(B, key.shape[1], groups, D), key, value, attn_mask=attention_mask,
        dropout_p=dropout if module.training else 0.0, scale=scaling,
    )  # [B, KV, H/KV, D]: contiguous, already in [B, 1, H, D] order
    return out.reshape(B, 1, H, D), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_GQA_DECODE_ATTENTION, _sdpa_gqa_decode)


class _decode_attention:
    """Route a model's SDPA attention through :func:`_sdpa_gqa_decode` for the duration of a decode loop."""

    def __init__(self, config):
        self.config = config
        self.before = config._attn_implementation

    def __enter__(self):
        if self.before == "sdpa":
            _register_attention()
            self.config._attn_implementation = _GQA_DECODE_ATTENTION

    def __exit__(self, *exc):
        self.config._attn_implementation = self.before


def column_major_linears(module) -> int:
    """Store the weight of every CPU ``nn.Linear`` under ``module`` column-major, in place (values unchanged).

    ``F.linear(x, W)`` computes ``x @ W.T``; with ``W`` stored column-major, ``W.T`` is a plain row-major matrix
    and the GEMM runs without a transposed operand: measured 20-30% faster on the decode shapes of the bench
    model on one CPU thread (bench/NOTES.md). Later ``load_state_dict`` copies keep the layout. Only for a model
    that nothing else trains or saves (an optimizer or safetensors would see non-contiguous weights). Returns
    the number of weights re-laid.
    """
    n = 0
    for m in module.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, torch.nn.Linear) and w is not None and w.dim() == 2 and w.device.type == "cpu" \
                and w.is_contiguous() and min(w.shape) > 1:
            m.weight.data = w.data.t().contiguous().t()
            n += 1
    return n


def _unwrap(model):
    """(HF causal LM, is_peft): the model whose decoder and output embedding we call (LoRA layers stay inside)."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency; keep the engine usable without it anyway
        PeftModel = ()
    if PeftModel and isinstance(model, PeftModel):
        return model.get_base_model(), True
    return model, False


@register_engine("torch")
class TorchEngine:
    """KV-cached sampler for a Hugging Face causal LM (or a peft ``PeftModel`` around one).

    Args:
        model: the policy; moved to ``device`` and put in eval mode.
        layout: where the visual codebook sits in the vocabulary (a ``TokenLayout``, read as the shared-vocabulary
            family, or a ``models.families.ModelFamily``).
        device: torch device.
        tokenizer: text tokenizer; needed for CFG's unconditional/negative prompt unless ``uncond_prompt_ids``.
        uncond_prompt_ids: token ids of one unconditional prompt for every row (default: the family's
            unconditional prompt of each prompt).
        max_batch_rows: most samples per forward batch (CFG doubles the rows); larger calls run in chunks.
        visual_head: compute only the visual rows of the LM head (off: full head, then slice; same numbers; shared
            vocabulary only).
        pad_token_id: id placed in left padding (masked out, any valid id works).
        column_major_weights: re-lay the decoder's linear weights for faster CPU GEMMs (see
            :func:`column_major_linears`); only when the engine owns its model (a rollout worker that loaded it),
            never for a model a learner is training.
    """

    def __init__(
        self,
        model,
        layout: TokenLayout,
        device: str | torch.device = "cpu",
        tokenizer=None,
        uncond_prompt_ids: list[int] | None = None,
        max_batch_rows: int | None = None,
        visual_head: bool = True,
        pad_token_id: int | None = None,
        column_major_weights: bool = False,
        family=None,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.family = family if family is not None else family_for_layout(layout)
        self.layout = layout = self.family.layout
        self.tokenizer = tokenizer
        self.max_batch_rows = max_batch_rows
        self.visual_head = visual_head
        self.weight_version = 0
        _, self.is_peft = _unwrap(self.model)
        self.family.check_vocab(self.model, "TorchEngine")
        # prompts may hold any id the model embeds: text ids and, past them, visual ids
        self.vocab_size = max(layout.visual_end, unwrap_model(self.model).get_output_embeddings().weight.shape[0])
        self.decoder = self.family.decoder(self.model)
        if column_major_weights and self.device.type == "cpu":
            column_major_linears(self.decoder)  # the LM head stays (tied to the embeddings in some models)
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad_token_id) if pad_token_id is not None else 0
        self._uncond_ids = list(uncond_prompt_ids) if uncond_prompt_ids is not None else None

    # ---- public API ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams) -> Rollout:
        """P prompts (token ids) -> Rollout of ``P * sampling.n`` rows in prompt order (images=None).

        completion_ids: int64 [P*n, T] LM ids; logprobs: float32 [P*n, T] sampler logprobs. ``T`` is the family's
        ``completion_length``: the ``N`` sampled visual ids plus its forced tokens (placed, not sampled; logprob 0).
        Row ``r`` uses seed ``sampling.seed + r``.
        """
        if sampling.jacobi:
            if self.family.forced_tokens:
                raise NotImplementedError(f"Jacobi decoding does not place forced tokens ({self.family.name!r} "
                                          f"family); set sampling.jacobi: false")
            from argrpo.rollout.engines.jacobi import jacobi_generate

            return jacobi_generate(self, prompt_ids, sampling)
        t0 = time.perf_counter()
        prompts = self._check_prompts(prompt_ids)
        n, N = sampling.n, self.layout.n_image_tokens
        B = len(prompts) * n
        uncond = self._uncond_prompts(prompts, sampling) if sampling.use_cfg else None
        uniforms = None if sampling.greedy else draw_uniforms(resolve_seed(sampling.seed), B, N, self.device)
        chunk = self.max_batch_rows or B
        codes, logps = [], []
        for start in range(0, B, chunk):
            rows = torch.arange(start, min(start + chunk, B))
            c, lp = self._sample_rows(
                prompts, rows // n, uncond, sampling, None if uniforms is None else uniforms[rows.to(self.device)]
            )
            codes.append(c)
            logps.append(lp)
        completion = torch.cat(codes).cpu()
        return Rollout(
            prompt_ids=[list(prompts[r // n]) for r in range(B)],
            completion_ids=completion,
            logprobs=torch.cat(logps).float().cpu(),
            images=None,
            weight_version=self.weight_version,
            timings={"generate": time.perf_counter() - t0},
        )

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int, adapter: bool = False) -> None:
        """Load a full state dict, or LoRA adapter tensors (``adapter=True``, needs a PeftModel), then set the version.

        Full weights may leave out tied parameters (e.g. a tied ``lm_head.weight``); any other missing or
        unexpected key is an error naming the keys.
        """
        if adapter:
            if not self.is_peft:
                raise ValueError(
                    "adapter weights need an engine built around a peft PeftModel (models.policy.apply_lora); "
                    "send merged full weights to a plain model instead"
                )
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.model, state_dict)
            unexpected = list(getattr(result, "unexpected_keys", []) or [])
            if unexpected:
                raise ValueError(f"adapter weights have keys the model lacks: {unexpected[:5]}")
        else:
            target = self.model
            result = target.load_state_dict(state_dict, strict=False)
            tied = self._tied_keys()
            missing = [k for k in result.missing_keys if k not in tied]
            # parts a rollout copy dropped (models.families: ModelFamily.rollout_model) may still arrive
            dropped = getattr(unwrap_model(self.model), "_argrpo_dropped", ())
            unexpected = [k for k in result.unexpected_keys if not (dropped and k.startswith(dropped))]
            if missing or unexpected:
                raise ValueError(
                    f"full weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
        self.weight_version = int(version)

    # ---- internals -------------------------------------------------------------------------------------------
    def _tied_keys(self) -> set[str]:
        """Parameter names that share storage with another parameter (may be absent from a state dict)."""
        seen: dict[int, str] = {}
        tied = set()
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if p.data_ptr() in seen:
                tied.update({name, seen[p.data_ptr()]})
            else:
                seen[p.data_ptr()] = name
        return tied

    def _check_prompts(self, prompt_ids) -> list[list[int]]:
        if not prompt_ids:
            raise ValueError("no prompts given")
        out = []
        for i, ids in enumerate(prompt_ids):
            ids = [int(t) for t in ids]
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
            out.append(ids)
        return out

    def _uncond_prompts(self, prompts: list[list[int]], sampling: SamplingParams) -> list[list[int]]:
        """The unconditional prompt of each prompt [P] (a negative prompt or ``uncond_prompt_ids``: the same one
        for all)."""
        if sampling.negative_prompt is not None:
            if self.tokenizer is None:
                raise ValueError("a negative_prompt needs the engine's tokenizer (TorchEngine(tokenizer=...))")
            return [self.family.encode_prompts(self.tokenizer, [sampling.negative_prompt])[0]] * len(prompts)
        if self._uncond_ids is not None:
            return [self._uncond_ids] * len(prompts)
        if self.tokenizer is None:
            raise ValueError(
                "CFG needs the unconditional prompt: build TorchEngine with tokenizer= or uncond_prompt_ids="
            )
        return [self.family.uncond_prompt_ids(self.tokenizer, p) for p in prompts]

    def _hidden(self, ids, mask, pos, cache, keep: int) -> torch.Tensor:
        """Decoder hidden states of the last ``keep`` positions, [R, keep, H]."""
        return self.decoder(
            **self.family.decoder_inputs(self.model, ids), attention_mask=mask, position_ids=pos,
            past_key_values=cache, use_cache=True,
        ).last_hidden_state[:, -keep:]

    def _forward(self, ids, mask, pos, cache) -> torch.Tensor:
        """One forward step -> logits of the last position over the visual codes only, [R, C]."""
        if not self.visual_head:
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                logits_to_keep=1,
            )
            return out.logits[:, -1, self.layout.visual_slice]
        return self.family.visual_logits(self.model, self._hidden(ids, mask, pos, cache, 1)[:, -1])

    def _sample_rows(self, prompts, row_prompt, uncond, sampling, uniforms):
        """Sample the rows whose prompt indices are ``row_prompt`` [b] -> (LM ids [b, T], logprobs [b, T]).

        uncond: the unconditional prompt of each prompt [P], or None without CFG. uniforms: [b, N], one per sampled
        position. ``T = N`` plus the family's forced tokens, which are placed (logprob 0) and fed like samples.
        """
        config = self.decoder.config
        dev, N = self.device, self.family.completion_length
        forced = self.family.forced_tokens
        b = row_prompt.numel()
        distinct = torch.unique(row_prompt)
        seqs = [prompts[int(p)] for p in distinct]
        if uncond is not None:
            # one prefill row per distinct unconditional prompt (one in all for a shared-vocabulary model)
            uncond_rows: dict[tuple, int] = {}
            for p in distinct.tolist():
                uncond_rows.setdefault(tuple(uncond[p]), len(seqs) + len(uncond_rows))
            seqs += [list(u) for u in uncond_rows]
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), L, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, L - len(s) :] = torch.tensor(s)
            mask[i, L - len(s) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp_(min=0)
        ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)

        cache = preallocated_cache(config, L + N)
        logits = self._forward(ids, mask, pos, cache)
        # prefill rows -> sample rows: cond rows first, then (with CFG) each row's uncond prefill row
        select = torch.searchsorted(distinct, row_prompt)
        if uncond is not None:
            select = torch.cat([select, torch.tensor([uncond_rows[tuple(uncond[int(p)])] for p in row_prompt],
                                                     dtype=torch.long)])
        select = select.to(dev)
        cache.batch_select_indices(select)
        logits, mask, last_pos = logits[select], mask[select], pos[select, -1]
        full_mask = torch.cat([mask, mask.new_ones(len(select), N)], dim=1)
        if config._attn_implementation in ("sdpa", "eager", _GQA_DECODE_ATTENTION):
            # a ready 4D additive mask skips transformers' per-step mask construction (one query row per step)
            dtype = next(self.decoder.parameters()).dtype
            full_mask = torch.zeros(full_mask.shape, dtype=dtype, device=dev).masked_fill_(
                full_mask == 0, torch.finfo(dtype).min
            )[:, None, None, :]

        codes = torch.empty(b, N, dtype=torch.long, device=dev)
        logps = torch.zeros(b, N, dtype=torch.float32, device=dev)
        rows = len(select)
        j = 0  # sampled positions so far (the uniforms' column)
        with _decode_attention(config):
            for t in range(N):
                if t in forced:
                    codes[:, t] = forced[t]
                    tok = codes.new_full((rows,), forced[t])
                else:
                    cond, unc = (logits[:b], logits[b:]) if uncond is not None else (logits, None)
                    c, lp = sample_step(cond, unc, sampling, None if uniforms is None else uniforms[:, j])
                    j += 1
                    codes[:, t], logps[:, t] = c + self.layout.visual_offset, lp
                    tok = codes[:, t]
                    if uncond is not None:
                        tok = torch.cat([tok, tok])  # the uncond branch continues with the same image tokens
                if t == N - 1:
                    break
                step = (tok[:, None], full_mask[..., : L + t + 1], (last_pos + t + 1)[:, None], cache)
                if t + 1 in forced:  # the next token is placed: its logits are never read
                    self._hidden(*step, 1)
                else:
                    logits = self._forward(*step)
        return codes, logps
