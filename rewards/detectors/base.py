"""The detector contract shared by the GenEval-style scorer and its detectors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


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


DETECTORS: dict[str, type] = {}


def register_detector(name: str):
    def deco(cls):
        if name in DETECTORS:
            raise ValueError(f"detector {name!r} is already registered")
        DETECTORS[name] = cls
        return cls

    return deco
