"""The ImageTokenizer contract and a registry of implementations."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


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


IMAGE_TOKENIZERS: dict[str, type] = {}


def register_image_tokenizer(name: str):
    """Class decorator; ``name`` is written to ``image_tokenizer.json`` so ``load_image_tokenizer`` finds the class."""

    def deco(cls):
        if name in IMAGE_TOKENIZERS:
            raise ValueError(f"image tokenizer {name!r} is already registered")
        IMAGE_TOKENIZERS[name] = cls
        cls.kind = name
        return cls

    return deco
