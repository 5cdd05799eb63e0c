"""The ImageTokenizer contract and a registry of implementations."""

from __future__ import annotations

import pkgutil
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from argrpo.registry import Registry


@runtime_checkable
class ImageTokenizer(Protocol):
    """Images <-> discrete code grids.

    encode: images uint8 [B, H, W, 3] (numpy or torch) -> codes int64 [B, h, w]
    decode: codes int [B, h, w] -> images uint8 [B, H, W, 3] (torch, CPU)

    Optional: ``code_features() -> float [codebook_size, F]``, a vector per code that places similar codes near each
    other (what ``policy.visual_init: codebook`` initialises a new model's visual rows from).
    """

    codebook_size: int
    grid: tuple[int, int]
    image_size: tuple[int, int]

    def encode(self, images) -> torch.Tensor: ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor: ...

    def save_pretrained(self, path: str | Path) -> None: ...


def _builtin_modules() -> list[str]:
    """Every module of this package but this one: each registers its tokenizer (vq, cosmos, ...) on import."""
    from argrpo.models import image_tokenizers

    names = sorted(m.name for m in pkgutil.iter_modules(image_tokenizers.__path__) if m.name != "base")
    return [f"{image_tokenizers.__name__}.{n}" for n in names]


IMAGE_TOKENIZERS: Registry[type] = Registry("image tokenizer kind", builtins=_builtin_modules)


def register_image_tokenizer(name: str):
    """Class decorator; ``name`` is written to ``image_tokenizer.json`` so ``load_image_tokenizer`` finds the class."""

    def deco(cls):
        IMAGE_TOKENIZERS.add(name, cls)
        cls.kind = name
        return cls

    return deco
