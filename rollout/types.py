"""Typed values that cross the rollout boundary: sampling settings and a batch of rollouts."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch


@dataclass
class SamplingParams:
    """How visual tokens are sampled.

    Only visual ids are ever sampled, so every sample is exactly ``layout.n_image_tokens`` tokens.
    CFG combines log-probabilities as ``lu + cfg_scale * (lc - lu)`` (no CFG when ``cfg_scale == 1``).
    The sampler logprob of a token is its log-probability under the final distribution it was drawn from
    (after temperature, CFG, top-k/top-p).
    """

    temperature: float = field(default=1.0, metadata={"help": "softmax temperature; 0 means greedy"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely visual tokens (0 = all)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (1.0 = off)"})
    cfg_scale: float = field(default=1.0, metadata={"help": "classifier-free guidance scale (1.0 = off)"})
    negative_prompt: str | None = field(
        default=None, metadata={"help": "caption for the unconditional branch (default: the layout's empty caption)"}
    )
    seed: int | None = field(default=None, metadata={"help": "base seed; sample i of a call uses seed + i"})
    n: int = field(default=1, metadata={"help": "samples per prompt"})
    jacobi: bool = field(default=False, metadata={"help": "speculative Jacobi decoding (same distribution)"})

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def use_cfg(self) -> bool:
        return self.cfg_scale != 1.0

    def with_(self, **kw) -> SamplingParams:
        return replace(self, **kw)


@dataclass
class Rollout:
    """A batch of B = P*G samples, in prompt order (the G samples of prompt p are rows p*G .. p*G+G-1).

    prompt_ids: list of B token-id lists (conditional prompt, unpadded)
    completion_ids: int64 [B, N] LM ids (all visual)
    logprobs: float32 [B, N] sampler logprobs of the completion tokens
    images: uint8 [B, H, W, 3] or None when not decoded
    weight_version: version of the weights that produced the samples
    """

    prompt_ids: list[list[int]]
    completion_ids: torch.Tensor
    logprobs: torch.Tensor
    images: np.ndarray | None = None
    weight_version: int = 0
    timings: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @staticmethod
    def concat(parts: list[Rollout]) -> Rollout:
        if not parts:
            raise ValueError("no rollouts to concatenate")
        images = None
        if all(p.images is not None for p in parts):
            images = np.concatenate([p.images for p in parts])
        timings: dict = {}
        for p in parts:
            for k, v in p.timings.items():
                timings[k] = max(timings.get(k, 0.0), v)  # parts run in parallel: wall time is the slowest
        return Rollout(
            prompt_ids=[ids for p in parts for ids in p.prompt_ids],
            completion_ids=torch.cat([p.completion_ids for p in parts]),
            logprobs=torch.cat([p.logprobs for p in parts]),
            images=images,
            weight_version=min(p.weight_version for p in parts),
            timings=timings,
        )
