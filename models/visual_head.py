"""What the LM head's visual rows may express: any vector per code ('free'), or only sums of the image
tokenizer's code factors ('factored').

A factorised tokenizer (the shapes world's VQ: one code per (mask, colour)) draws an object's first patch as one
token, so its shape and colour are sampled jointly from the head's logits ``h . W[k]``. A free head learns a
direction of its own for every (mask, colour) pair it was trained on, and a colour word then raises the pairs it
was named with: asked for a pair no caption named, such a policy draws the colour on another shape or the shape in
another colour. When ``W`` stays in the span of the code features ``F`` (``W = F @ P``), the logit of (m, c) is
``h . u_m + h . v_c`` for every ``h``: raising a colour raises it under every mask, so words learnt apart combine.
Measured on the shapes world (bench/NOTES.md, "A factored visual head"): projecting a free-head SFT policy's head onto
the span lifts held-out ``colors`` from 0.20 to 0.50 with no training.

'factored' keeps the head there by projected gradient descent: the rows are projected onto span(F) when training
begins and after every optimizer step (``W <- F F^+ W``; with tied embeddings the input rows follow). The head is
still a plain ``nn.Linear``, so checkpoints, LoRA and rollout engines see an ordinary model.

Registry: ``VISUAL_HEADS[name]`` -> a ``TrainerCallback`` factory ``(model, layout, image_tokenizer)``, or None for
no constraint; a stage config names one in ``visual_head``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

class FeatureSpanProjector:
    """Projects the head's visual rows ``W [K, hidden]`` onto the column span of ``F [K, D]`` in place.

    ``F^+`` is computed once; a call costs two ``[K, D] x [D, hidden]``-sized products, so large codebooks with
    few features (FSQ digits, VQ vectors) never form a ``K x K`` projector.
    """

    def __init__(self, model, layout, image_tokenizer):
        features = getattr(image_tokenizer, "code_features", None)
        if features is None:
            raise ValueError(f"visual_head='factored': the {type(image_tokenizer).__name__} image tokenizer offers "
                             "no code_features(); use visual_head: free")
        self.weight = model.get_output_embeddings().weight
        self.rows = layout.visual_slice
        feats = features().double()  # [K, D]
        if feats.shape[0] != layout.codebook_size:
            raise ValueError(f"code_features() has {feats.shape[0]} rows, the layout's codebook {layout.codebook_size}")
        self.features = feats.to(self.weight.device)
        self.pinv = torch.linalg.pinv(feats).to(self.weight.device)  # [D, K]

    @torch.no_grad()
    def __call__(self) -> float:
        """Project; returns the fraction of the rows' norm that lay outside the span (0 once projected)."""
        w = self.weight[self.rows].double()  # [K, hidden]
        projected = self.features @ (self.pinv @ w)
        removed = float((w - projected).norm() / w.norm().clamp_min(1e-12))
        self.weight[self.rows] = projected.to(self.weight.dtype)
        return removed


class FactoredHead(TrainerCallback):
    """Keeps the visual head rows in the span of the code features (see the module docstring)."""

    def __init__(self, model, layout, image_tokenizer):
        self.project = FeatureSpanProjector(model, layout, image_tokenizer)

    def on_train_begin(self, args, state, control, **kwargs):
        # a checkpoint trained with a free head starts here without the part of its rows a factored head cannot hold
        removed = self.project()
        if removed > 1e-6:
            logger.info("visual_head=factored: projected the head's visual rows onto the code features' span "
                        "(%.1f%% of their norm removed)", 100 * removed)

    def on_step_end(self, args, state, control, **kwargs):
        self.project()


# name -> TrainerCallback factory (model, layout, image_tokenizer), or None: no constraint
VISUAL_HEADS: dict[str, Callable | None] = {"free": None, "factored": FactoredHead}


def check_name(name: str) -> None:
    """Fail, naming the config key and the choices, unless ``name`` is a registered head."""
    if name not in VISUAL_HEADS:
        raise ValueError(f"visual_head: unknown {name!r}; known: {sorted(VISUAL_HEADS)}")


def visual_head_callbacks(name: str, model, layout, image_tokenizer) -> list[TrainerCallback]:
    """The callbacks that keep the head ``name`` asks for (none for 'free')."""
    check_name(name)
    factory = VISUAL_HEADS[name]
    return [] if factory is None else [factory(model, layout, image_tokenizer)]
