"""Human-preference rewards: HPSv2 (open_clip ViT-H-14 fine-tuned) and PickScore (a transformers CLIPModel).

Both load local weights only; neither package's runtime (which downloads at import or first call) is needed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from argrpo.rewards.base import Reward, RewardOutput, register_reward, to_pil
from argrpo.rewards.clip import OpenClip, _device, resolve_dtype


@register_reward("hps")
class HPSv2(Reward):
    """HPSv2: the cosine similarity of image and prompt embeddings of the HPS fine-tuned ViT-H-14 (as its
    reference scorer computes it, without the logit scale).

    ``checkpoint``: the HPS state dict (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` read with
    ``weights_only=True``, or a safetensors conversion). ``model``/``model_cfg`` override the architecture
    (tests use a tiny open_clip config).
    """

    name = "hps"

    def __init__(self, checkpoint: str, model: str = "ViT-H-14", model_cfg: Mapping | None = None,
                 device: str = "auto", dtype: Any = "float32", batch_size: int = 16, name: str | None = None):
        super().__init__(name)
        if not checkpoint:
            raise ValueError("hps needs checkpoint=<local path to the HPSv2 state dict>")
        self.clip = OpenClip(model, os.fspath(checkpoint), model_cfg, device, dtype, batch_size)

    def score(self, prompts, images, **metadata):
        img = self.clip.image_features(images)  # [B, D]
        txt = self.clip.text_features(prompts)  # [B, D]
        return RewardOutput((img * txt).sum(-1).tolist())


@register_reward("pickscore")
class PickScore(Reward):
    """PickScore: ``exp(logit_scale) * cos(image, prompt)`` with a transformers ``CLIPModel`` and its processor
    (``path``: a local directory holding both, e.g. a snapshot of yuvalkirstain/PickScore_v1 whose processor files
    come from laion/CLIP-ViT-H-14-laion2B-s32B-b79K; ``processor_path`` when they are apart)."""

    name = "pickscore"

    def __init__(self, path: str, processor_path: str | None = None, device: str = "auto", dtype: Any = "float32",
                 batch_size: int = 16, max_length: int = 77, name: str | None = None):
        super().__init__(name)
        import torch
        from transformers import CLIPModel, CLIPProcessor

        self.device = _device(device)
        self.dtype = resolve_dtype(dtype)
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        self.processor = CLIPProcessor.from_pretrained(processor_path or path)
        self.model = CLIPModel.from_pretrained(path).to(self.device, self.dtype).eval().requires_grad_(False)
        self._torch = torch

    @staticmethod
    def _features(out):
        # transformers 5 returns a pooled model output from get_*_features; older versions a tensor.
        return out if hasattr(out, "norm") else out.pooler_output

    def embed(self, prompts, images):
        """-> image ``[B, D]`` and text ``[B, D]`` embeddings, L2-normalised, float32."""
        torch = self._torch
        imgs, txts = [], []
        with torch.inference_mode():
            for i in range(0, len(prompts), self.batch_size):
                px = self.processor(images=to_pil(images[i:i + self.batch_size]), return_tensors="pt")
                tok = self.processor(text=list(prompts[i:i + self.batch_size]), padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                imgs.append(self._features(self.model.get_image_features(
                    pixel_values=px["pixel_values"].to(self.device, self.dtype))).float())
                txts.append(self._features(self.model.get_text_features(
                    input_ids=tok["input_ids"].to(self.device),
                    attention_mask=tok["attention_mask"].to(self.device))).float())
        norm = torch.nn.functional.normalize
        return norm(torch.cat(imgs), dim=-1).cpu(), norm(torch.cat(txts), dim=-1).cpu()

    def score(self, prompts, images, **metadata):
        img, txt = self.embed(prompts, images)
        scale = self.model.logit_scale.detach().float().exp().cpu()
        cos = (img * txt).sum(-1)
        return RewardOutput((scale * cos).tolist(), {"cosine": cos.tolist()})
