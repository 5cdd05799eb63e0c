"""The detector contract shared by the GenEval-style scorer and its detectors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from argrpo.registry import Registry


@dataclass
class Detection:
    """One box. ``box`` is (x0, y0, x1, y1) in pixels; ``color`` is set by detectors that know it exactly
    (the shapes detector); otherwise the scorer classifies colour on the box crop (GenEval uses zero-shot CLIP)."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    color: str | None = None


class Detector(Protocol):
    """images uint8 [B, H, W, 3]; classes[i] = class names to look for in image i -> detections per image."""

    def __call__(self, images, classes: list[list[str]]) -> list[list[Detection]]: ...


DETECTORS: Registry[type] = Registry("detector", plugins=True, builtins={
    "shapes": "argrpo.rewards.detectors.shapes", "owlv2": "argrpo.rewards.detectors.owlv2"})
register_detector = DETECTORS.register
