"""Zero-shot CLIP colour of object crops, as GenEval judges colour.

For each class, a classifier is built from GenEval's prompt templates over its 10 colours: each template's text
embedding is L2-normalised, averaged per colour, and normalised again (CLIP zero-shot ensembling). A crop's colour
is the argmax of its normalised image embedding against those colour embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from argrpo.rewards.geneval import COLORS

GENEVAL_TEMPLATES = ("a photo of a {color} {cls}", "a photo of a {color}-colored {cls}", "a photo of a {color} object")


class ColorClassifier:
    """``(image uint8 [H, W, 3], boxes [K] of (x0, y0, x1, y1), class name) -> K colour names``.

    ``clip``: an :class:`rewards.clip.OpenClip` to share, else one is built from ``model``/``pretrained``/
    ``model_cfg`` (GenEval uses ViT-L-14 with OpenAI weights).
    """

    def __init__(self, model: str = "ViT-L-14", pretrained: str | None = "openai", model_cfg: Mapping | None = None,
                 device: str = "auto", dtype: Any = "float32", batch_size: int = 16,
                 templates: Sequence[str] = GENEVAL_TEMPLATES, colors: Sequence[str] = COLORS, clip: Any = None):
        if clip is None:
            from argrpo.rewards.clip import OpenClip

            clip = OpenClip(model, pretrained, model_cfg, device, dtype, batch_size)
        self.clip = clip
        self.templates = tuple(templates)
        self.colors = tuple(colors)
        self._classifiers: dict[str, Any] = {}

    def classifier(self, cls: str):
        """``[D, C]`` colour embeddings for class ``cls`` (cached)."""
        import torch

        if cls not in self._classifiers:
            texts = [t.format(color=color, cls=cls) for color in self.colors for t in self.templates]
            emb = self.clip.text_features(texts).view(len(self.colors), len(self.templates), -1)  # [C, T, D]
            self._classifiers[cls] = torch.nn.functional.normalize(emb.mean(1), dim=-1).T.contiguous()
        return self._classifiers[cls]

    def crops(self, image: np.ndarray, boxes: Sequence[Sequence[float]]) -> list[np.ndarray]:
        """Box crops of ``image``, clipped to it and at least one pixel wide (detectors may return slivers)."""
        h, w = image.shape[:2]
        out = []
        for box in boxes:
            x0, y0, x1, y1 = (int(round(float(v))) for v in box[:4])
            x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
            x1, y1 = min(max(x1, x0 + 1), w), min(max(y1, y0 + 1), h)
            out.append(np.ascontiguousarray(image[y0:y1, x0:x1]))
        return out

    def probabilities(self, image: np.ndarray, boxes: Sequence[Sequence[float]], cls: str):
        """``[K, C]`` softmax over colours (CLIP's logit scale of 100, as zero-shot classification uses)."""
        if not len(boxes):
            import torch

            return torch.zeros(0, len(self.colors))
        feats = self.clip.image_features(self.crops(image, boxes))  # [K, D]
        return (100.0 * feats @ self.classifier(cls)).softmax(-1)

    def __call__(self, image: np.ndarray, boxes: Sequence[Sequence[float]], cls: str) -> list[str]:
        probs = self.probabilities(image, boxes, cls)
        return [self.colors[int(k)] for k in probs.argmax(-1)]
