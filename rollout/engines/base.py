"""The RolloutEngine contract and a registry of engines."""

from __future__ import annotations

from typing import Protocol

import torch
from argrpo.rollout.types import Rollout, SamplingParams


class RolloutEngine(Protocol):
    """Samples visual tokens for prompts; knows nothing of images (decoding is the worker's job).

    generate: prompt_ids (P lists of ids) -> Rollout with P * sampling.n rows (images=None), prompt order.
    load_weights: full state dict or LoRA adapter tensors (``adapter=True``), tagged with a version.
    """

    weight_version: int

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams) -> Rollout: ...

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int, adapter: bool = False) -> None: ...


ENGINES: dict[str, type] = {}


def register_engine(name: str):
    def deco(cls):
        if name in ENGINES:
            raise ValueError(f"rollout engine {name!r} is already registered")
        ENGINES[name] = cls
        return cls

    return deco


def encode_prompts(tokenizer, layout, captions: list[str]) -> list[list[int]]:
    """Captions -> prompt token ids through the layout's template (which carries its own special tokens).

    ``add_special_tokens=False`` so no tokenizer adds a BOS/EOS around the template.
    """
    texts = [layout.format_prompt(c) for c in captions]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
