"""The RolloutEngine contract and a registry of engines."""

from __future__ import annotations

from typing import Protocol

import torch
from argrpo.registry import Registry
from argrpo.rollout.types import Rollout, SamplingParams


class RolloutEngine(Protocol):
    """Samples visual tokens for prompts; knows nothing of images (decoding is the worker's job).

    generate: prompt_ids (P lists of ids) -> Rollout with P * sampling.n rows (images=None), prompt order.
    load_weights: full state dict or LoRA adapter tensors (``adapter=True``), tagged with a version.
    """

    weight_version: int

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams) -> Rollout: ...

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int, adapter: bool = False) -> None: ...


# Each engine's module is imported when it is first asked for, so vLLM only matters to whoever asks for "vllm".
ENGINES: Registry[type] = Registry("rollout engine", builtins={
    "torch": "argrpo.rollout.engines.torch_engine", "vllm": "argrpo.rollout.engines.vllm_engine"})
register_engine = ENGINES.register


def encode_prompts(tokenizer, layout, captions: list[str]) -> list[list[int]]:
    """Captions -> prompt token ids as the family builds them (``ModelFamily.encode_prompts``).

    layout: a ``ModelFamily``, or a bare ``TokenLayout`` (the shared-vocabulary family: the layout's template).
    """
    from argrpo.models.families import family_for_layout

    return family_for_layout(layout).encode_prompts(tokenizer, captions)
