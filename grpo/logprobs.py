"""The learner's log-probabilities, normalised over the visual slice at the sampler's temperature.

TRL's ``GRPOTrainer`` scores completions with ``model(input_ids, attention_mask, labels=..., fused_lm_head=True)``
and reads ``.log_probs`` / ``.entropy`` ``[B, L-1]`` (TRL patches ``forward`` with a chunked head over the FULL
vocabulary). The sampler draws only visual ids from ``softmax(logits[visual] / T)``; a learner that normalises over
all ids reports a different distribution (an importance ratio near 0.5 at step 0, measured), so KL, clipping and the
importance correction would all be wrong.

Two fixes were measured to work: a frozen ``-1e9`` lm_head bias outside the slice, or a head that multiplies only
the slice's rows. We take the second (:func:`install_visual_head`): it adds no parameter (nothing to strip from
checkpoints or weight syncs, no bias to keep frozen, no tied-weight surprises), and it computes ``C`` instead of
``V`` logits per token (SimpleAR: 64,000 of ~215,000 ids, about 3.4x fewer head FLOPs). The price is relying on
how TRL calls the model, which ``tests/test_grpo_trl_pin.py`` pins: TRL's own scoring path must return exactly the
visual-slice log-softmax computed from plain logits.

The head runs in chunks of rows under activation checkpointing, so no ``[B*N, C]`` float32 block is kept for the
backward pass (SimpleAR: 4,096 tokens x 64,000 codes per image would be 1 GB).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from argrpo.models.families import family_for_layout
from argrpo.models.layout import TokenLayout
from torch.utils.checkpoint import checkpoint
from transformers.utils import ModelOutput

# Rows per chunk are chosen so one chunk's float32 logits hold about this many elements (64 MB).
CHUNK_ELEMENTS = 1 << 24


@dataclass
class VisualHeadOutput(ModelOutput):
    """What the patched forward returns with ``fused_lm_head=True`` (the fields TRL reads).

    log_probs: float32 [B, L-1] log-probability of each next-token label (0 where the label is -100).
    entropy: float32 [B, L-1] entropy of the visual next-token distribution (0 where the label is -100).
    loss: mean negative log-likelihood of the scored labels.
    """

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def _chunk_logprobs(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, codes: torch.Tensor,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _logprobs_entropy(F.linear(h, weight, bias), codes, temperature)


def _logprobs_entropy(logits: torch.Tensor, codes: torch.Tensor, temperature: float):
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, codes.unsqueeze(-1)).squeeze(-1) - logz
    probs = torch.softmax(logits, dim=-1)
    entropy = logz - (probs * logits).sum(-1)
    return logp, entropy


def visual_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    codes: torch.Tensor,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities and entropies under ``softmax(hidden @ weight.T / T)``.

    hidden: [M, H]; weight: [C, H] (the visual rows of the LM head, a view); codes: int64 [M] in 0..C-1
    -> (logp float32 [M], entropy float32 [M]). Differentiable in ``hidden`` and ``weight``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to score samples, got {temperature}")
    rows = max(1, chunk_elements // max(1, weight.shape[0]))
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _in_chunks(lambda h, c: _chunk_logprobs(h, weight, bias, c, float(temperature)), hidden, codes, rows,
                      need_grad)


def _in_chunks(fn, hidden: torch.Tensor, codes: torch.Tensor, rows: int, need_grad: bool):
    """``fn(hidden [m, H], codes [m]) -> (logp [m], entropy [m])`` over chunks of ``rows`` rows, each under activation
    checkpointing when gradients flow (so no chunk's logits outlive it) -> concatenated float32 [M], [M]."""
    logps, ents = [], []
    for s in range(0, hidden.shape[0], rows):
        args = (hidden[s : s + rows], codes[s : s + rows])
        lp, ent = checkpoint(fn, *args, use_reentrant=False) if need_grad else fn(*args)
        logps.append(lp)
        ents.append(ent)
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logps), torch.cat(ents)


def family_token_logprobs(family, model, hidden: torch.Tensor, codes: torch.Tensor, temperature: float = 1.0,
                          chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities and entropies of ``codes`` under ``softmax(family.visual_logits(hidden) / T)``.

    hidden: [M, H]; codes: int64 [M] in 0..C-1 -> (logp float32 [M], entropy float32 [M]), in chunks of rows under
    activation checkpointing. A shared-vocabulary head multiplies only the visual rows of the LM head
    (:func:`visual_token_logprobs`); another family's head (Janus's generation_head MLP) runs as the family says.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to score samples, got {temperature}")
    head = getattr(family, "visual_head_rows", None)
    if head is not None:
        weight, bias = head(model)
        return visual_token_logprobs(hidden, weight, codes, temperature, bias, chunk_elements)
    rows = max(1, chunk_elements // max(1, family.layout.codebook_size))
    need_grad = torch.is_grad_enabled()

    return _in_chunks(lambda h, c: _logprobs_entropy(family.visual_logits(model, h), c, float(temperature)), hidden,
                      codes, rows, need_grad)


def install_visual_head(model, layout, temperature: float, chunk_elements: int = CHUNK_ELEMENTS) -> None:
    """Patch ``model`` so ``model(..., labels=L, fused_lm_head=True)`` scores visual labels over the visual slice.

    ``model`` is the Hugging Face model (for a peft model, its ``get_base_model()``), usually after TRL added its
    own fused head; ``layout`` its ``ModelFamily`` (a bare ``TokenLayout``: the shared-vocabulary family). Calls
    without ``fused_lm_head=True`` (generation, plain forward) go to the previous forward untouched. A scored label
    outside the visual slice is an error: the sampler can never produce one. The family's forced tokens (Emu3's
    row ends) are not scored: log-prob and entropy 0 there, so no gradient reaches their logits (the trainer also
    leaves them out of TRL's loss mask).
    """
    if getattr(model, "_argrpo_visual_head", None) is not None:
        raise ValueError(f"{type(model).__name__} already has a visual head installed")
    family = family_for_layout(layout)
    layout = family.layout
    family.check_scoring(model)
    previous = model.forward
    offset, end = layout.visual_offset, layout.visual_end
    temp = float(temperature)
    decoder = family.decoder(model)
    forced = sorted(set(family.forced_tokens.values()))
    if any(offset <= t < end for t in forced):
        raise ValueError(f"{family!r}: a forced token lies inside the visual ids [{offset}, {end})")
    forced_ids = torch.tensor(forced, dtype=torch.long)

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head:
            for key, value in (("labels", labels), ("shift_labels", shift_labels),
                               ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[key] = value
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        kwargs.pop("output_router_logits", None)
        if args:
            kwargs["input_ids"], args = args[0], args[1:]
        if kwargs.get("input_ids") is not None:
            kwargs.update(family.decoder_inputs(self, kwargs.pop("input_ids")))
        hidden = decoder(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, shift_labels = hidden[:, :-1], labels[:, 1:]
        shift_labels = shift_labels.to(hidden.device)
        mask = shift_labels != -100
        if forced:
            mask &= ~torch.isin(shift_labels, forced_ids.to(shift_labels.device))
        ids = shift_labels[mask]
        if ids.numel() and (int(ids.min()) < offset or int(ids.max()) >= end):
            raise ValueError(
                f"visual head: a scored label lies outside the visual ids [{offset}, {end}); the completion must "
                f"hold image tokens only"
            )
        logp, ent = family_token_logprobs(family, self, hidden[mask], ids - offset, temp, chunk_elements)
        # masked_scatter keeps an all-masked micro-batch connected to the graph (a zero, not a backward error)
        log_probs = logp.new_zeros(mask.shape).masked_scatter(mask, logp)
        entropy = ent.new_zeros(mask.shape).masked_scatter(mask, ent)
        n = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return VisualHeadOutput(loss=-log_probs.sum() / n, log_probs=log_probs, entropy=entropy)

    model.forward = types.MethodType(forward, model)
    model._argrpo_visual_head = {"layout": layout, "family": family, "temperature": temp}


def reference_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int,
                       layout: TokenLayout, temperature: float) -> torch.Tensor:
    """Plain-logits reference for tests and checks (shared vocabulary): [B, L] ids -> float32 [B, n_completion]
    visual-slice logprobs."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits[:, -n_completion - 1 : -1, layout.visual_slice].float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    codes = input_ids[:, -n_completion:] - layout.visual_offset
    return logp.gather(-1, codes.unsqueeze(-1)).squeeze(-1)
