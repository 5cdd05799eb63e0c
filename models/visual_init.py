"""How a new policy's visual rows (input embeddings and LM-head rows of the codebook) start.

A model trained from scratch otherwise starts every visual code as an unrelated random vector, and must discover
from argrpo.data that, say, the 18 codes painting a red patch share "red". Image tokenizers know that structure: a VQ
codebook has a vector per code, an FSQ code is a point on a grid of levels, and the shapes world's factorised VQ is
literally (mask, colour). ``codebook`` init projects the tokenizer's per-code features through one random matrix,
so codes that share a feature start with shared components. With additive features (one-hot factors, FSQ digits)
the head's logit for code (m, c) starts as ``h . u_m + h . v_c``: raising one colour raises it under every mask,
which is what lets a colour word learnt on squares apply to circles. Measured on the shapes world (bench/NOTES.md,
"Pretrain and SFT"): the loss of 1,700 random-start steps in 1,000.

Registry: ``VISUAL_INITS[name](model, layout, image_tokenizer, generator)``; a policy config names one in
``policy.visual_init``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def random_init(model, layout, image_tokenizer, generator: torch.Generator) -> None:
    """Keep the architecture's own random initialisation."""


def codebook_init(model, layout, image_tokenizer, generator: torch.Generator) -> None:
    """Visual embedding and LM-head rows := the tokenizer's code features [K, F] @ a Gaussian [F, hidden], rescaled
    to the model's ``initializer_range`` (so the rows are as large as the random ones they replace)."""
    features = getattr(image_tokenizer, "code_features", None)
    if features is None:
        raise ValueError(f"policy.visual_init='codebook': the {type(image_tokenizer).__name__} image tokenizer "
                         "offers no code_features(); use policy.visual_init: random")
    feats = features().float()  # [K, F]
    if feats.shape[0] != layout.codebook_size:
        raise ValueError(f"code_features() has {feats.shape[0]} rows, the layout's codebook {layout.codebook_size}")
    hidden = model.get_input_embeddings().weight.shape[1]
    proj = torch.randn(feats.shape[1], hidden, generator=generator)
    rows = feats @ proj  # [K, hidden]
    std = float(getattr(model.config, "initializer_range", 0.02))
    rows = rows * (std / rows.std().clamp_min(1e-12))
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        embed[layout.visual_slice] = rows.to(embed.dtype)
        if head.data_ptr() != embed.data_ptr():  # tied weights share the rows just written
            head[layout.visual_slice] = rows.to(head.dtype)


# name -> fn(model, layout, image_tokenizer, generator); add an entry to offer another init
VISUAL_INITS: dict[str, Callable] = {"random": random_init, "codebook": codebook_init}


def check_name(name: str) -> None:
    """Fail, naming the config key and the choices, unless ``name`` is a registered init."""
    if name not in VISUAL_INITS:
        raise ValueError(f"policy.visual_init: unknown {name!r}; known: {sorted(VISUAL_INITS)}")


def init_visual_rows(model, layout, image_tokenizer, name: str, seed: int) -> None:
    """Apply the registered init ``name`` (deterministic in ``seed``)."""
    check_name(name)
    VISUAL_INITS[name](model, layout, image_tokenizer, torch.Generator().manual_seed(int(seed)))
