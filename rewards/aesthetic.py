"""The LAION aesthetic predictor v2: an MLP over L2-normalised CLIP ViT-L/14 image embeddings.

The head's public state dict (``sac+logos+ava1-l14-linearMSE.pth``) has keys ``layers.{0,2,4,6,7}.{weight,bias}``:
Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16),
Linear(16, 1) — no activations between the linears, as published.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from argrpo.rewards.base import Reward, RewardOutput, register_reward
from argrpo.rewards.clip import OpenClip, load_state_dict_file


def aesthetic_head(embed_dim: int = 768):
    """The predictor MLP ``[B, embed_dim] -> [B, 1]``, laid out so the public state dict loads strictly."""
    import torch.nn as nn

    class AestheticHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(
                nn.Linear(embed_dim, 1024), nn.Dropout(0.2),
                nn.Linear(1024, 128), nn.Dropout(0.2),
                nn.Linear(128, 64), nn.Dropout(0.1),
                nn.Linear(64, 16),
                nn.Linear(16, 1),
            )

        def forward(self, x):
            return self.layers(x)

    return AestheticHead()


@register_reward("aesthetic")
class AestheticScore(Reward):
    """LAION aesthetic score (about 1-10 with the real weights) of each image; the prompt is ignored.

    ``head``: the predictor's state dict (``.pth`` read with ``weights_only=True``, or safetensors). The CLIP image
    tower is open_clip ``ViT-L-14`` with OpenAI weights (the predictor was trained on those embeddings);
    ``clip_model``/``clip_pretrained``/``clip_cfg`` override it.
    """

    name = "aesthetic"

    def __init__(self, head: str, clip_model: str = "ViT-L-14", clip_pretrained: str | None = "openai",
                 clip_cfg: Mapping | None = None, device: str = "auto", dtype: Any = "float32",
                 batch_size: int = 32, name: str | None = None):
        super().__init__(name)
        if not head:
            raise ValueError("aesthetic needs head=<local path to the aesthetic predictor state dict>")
        self.clip = OpenClip(clip_model, clip_pretrained, clip_cfg, device, dtype, batch_size)
        sd = load_state_dict_file(os.fspath(head))
        if "layers.0.weight" not in sd:
            raise ValueError(f"aesthetic head {head!r}: no 'layers.0.weight' key; expected the LAION predictor "
                             f"state dict (keys {sorted(sd)[:4]}...)")
        self.head = aesthetic_head(int(sd["layers.0.weight"].shape[1]))
        self.head.load_state_dict(sd, strict=True)
        self.head.eval().requires_grad_(False)

    def score(self, prompts, images, **metadata):
        import torch

        feats = self.clip.image_features(images)  # [B, D], L2-normalised
        if feats.shape[-1] != self.head.layers[0].in_features:
            raise ValueError(f"CLIP embeddings have {feats.shape[-1]} dims but the aesthetic head expects "
                             f"{self.head.layers[0].in_features} (use CLIP ViT-L/14)")
        with torch.inference_mode():
            return RewardOutput(self.head(feats).squeeze(-1).tolist())
