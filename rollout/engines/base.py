"""The RolloutEngine contract and a registry of engines."""

from __future__ import annotations

from typing import Protocol

import torch

from rollout.types import Rollout, SamplingParams


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
