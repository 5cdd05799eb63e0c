"""OWLv2 open-vocabulary detection (transformers ``Owlv2ForObjectDetection``) with GenEval class names as queries.

Each predicted box takes the query with the highest sigmoid score among its image's own queries (OWL's
post-processing rule). Images in one batch may ask for different numbers of classes: the processor pads the query
lists with blank queries, and their logits are sliced off here so a blank can never win a box.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from argrpo.rewards.base import to_pil
from argrpo.rewards.detectors.base import Detection, register_detector


@register_detector("owlv2")
class Owlv2Detector:
    """``images``: B uint8 ``[H, W, 3]``; ``classes[i]``: class names for image i -> detections per image.

    ``path``: a local directory with the model and its processor (e.g. a snapshot of
    google/owlv2-base-patch16-ensemble). ``threshold`` drops boxes at or below that score early (the GenEval rules
    apply their own thresholds afterwards). ``query_template`` turns a class name into a text query.
    """

    def __init__(self, path: str, device: str = "auto", dtype: Any = "float32", threshold: float = 0.05,
                 query_template: str = "a photo of a {}", batch_size: int = 4, max_boxes: int = 100):
        import torch
        from argrpo.rewards.clip import _device, resolve_dtype
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        self.device = _device(device)
        self.dtype = resolve_dtype(dtype)
        self.processor = Owlv2Processor.from_pretrained(path)
        self.model = Owlv2ForObjectDetection.from_pretrained(path).to(self.device, self.dtype).eval()
        self.model.requires_grad_(False)
        self.threshold = float(threshold)
        self.query_template = query_template
        self.batch_size = int(batch_size)
        self.max_boxes = int(max_boxes)
        self._torch = torch

    def __repr__(self) -> str:
        return f"Owlv2Detector(threshold={self.threshold}, template={self.query_template!r})"

    def __call__(self, images, classes: Sequence[Sequence[str]]) -> list[list[Detection]]:
        images = list(images)
        if len(images) != len(classes):
            raise ValueError(f"owlv2: {len(images)} images but {len(classes)} class lists")
        out: list[list[Detection]] = []
        for i in range(0, len(images), self.batch_size):
            out.extend(self._batch(images[i:i + self.batch_size], classes[i:i + self.batch_size]))
        return out

    def _batch(self, images: list[np.ndarray], classes: Sequence[Sequence[str]]) -> list[list[Detection]]:
        torch = self._torch
        # an image with no classes still needs one query for the batch to be rectangular; it is sliced off below
        queries = [[self.query_template.format(c) for c in cls] or [" "] for cls in classes]
        # OWL's text tower has 16 positions; longer queries are cut rather than failing the batch
        inputs = self.processor(text=queries, images=to_pil(images), truncation=True, return_tensors="pt")
        with torch.inference_mode():
            res = self.model(input_ids=inputs["input_ids"].to(self.device),
                             attention_mask=inputs["attention_mask"].to(self.device),
                             pixel_values=inputs["pixel_values"].to(self.device, self.dtype))
        logits = res.logits.float().cpu()  # [B, P, Q_max]
        boxes = res.pred_boxes.float().cpu()  # [B, P, 4] (cx, cy, w, h) relative to the padded square
        dets = []
        for k, (img, cls) in enumerate(zip(images, classes)):
            n = len(cls)
            if n == 0:
                dets.append([])
                continue
            # argmax on logits, not on sigmoids: saturated sigmoids tie at 1.0 and would hide the winning query
            best, labels = logits[k, :, :n].max(-1)  # [P], [P]
            scores = torch.sigmoid(best)
            h, w = img.shape[:2]
            side = float(max(h, w))  # OWLv2 pads to a square at the bottom/right before resizing
            cx, cy, bw, bh = boxes[k].unbind(-1)
            xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * side
            xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
            xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
            order = scores.argsort(descending=True)
            order = order[scores[order] > self.threshold][: self.max_boxes]
            dets.append([Detection(cls[int(labels[j])], float(scores[j]), tuple(float(v) for v in xyxy[j]))
                         for j in order])
        return dets
