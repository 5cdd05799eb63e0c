"""The exact detector of the shapes world: colour segmentation, connected components, shape check at blob size.

The world's look lives here too (the palette, the shape rasters, :class:`ShapesLook`): the renderer in
``data.shapes`` draws with the same rasters the detector compares against, and data/ imports rewards/, never the
reverse.

1. Segmentation: each pixel is read as a mix of the background and one of the world's colours; it takes that
   colour when the mix is at least half colour and lies within ``color_tolerance`` of the mixing line, so the soft
   edges of blurred or generated images are cut at their 50% level (blobs keep their drawn size) and never form
   fringe blobs of an in-between colour. Noise specks and one-pixel spurs are then dropped, noise holes filled.
2. Connected components (4-neighbour) of equal labels, for a whole batch at once in torch: minimum parent
   over horizontal and vertical runs, with pointer jumping.
3. Each blob of plausible size and squareness is compared with every class's ideal raster drawn into the blob's own
   box (:func:`shape_mask`, the renderer's own rasters; also into the square frames around it, as blur fades
   apexes and corners first); the best class wins and the IoU becomes the score, linearly from
   ``iou_low`` (score 0) to ``iou_high`` (score 1). Classifying by fill ratio alone was measured to let an
   untrained model score 54% and random codes a perfect two_object: the check at the blob's own size is the point.

Calibration (bench/shapes_world.py): clean renders score 1.0; gaussian blur sigma 0.7 plus noise std 8 still
scores above 0.9 (GenEval's counting threshold), gaussian blur sigma 1.0 plus noise std 8 keeps 99% of objects above 0.8; the closest
confusion between two classes at any plausible size (a 15 px square read as a circle) has IoU 0.83, below
``iou_low``, so one class never passes for another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from argrpo.rewards.detectors.base import Detection, register_detector

# GenEval's ten colour names, as flat RGB values chosen far apart from each other and from the background
# (closest pair: orange-yellow, 85 apart), so nearest-palette segmentation tolerates blur and noise.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 225, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 225),
    "purple": (140, 60, 190),
    "pink": (245, 150, 200),
    "brown": (130, 80, 30),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
BACKGROUND = (128, 128, 128)

# ---- shape rasteriser ----------------------------------------------------------------------------------------------
def _grid_uv(w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates normalised to [0, 1] across the box: u [1, w], v [h, 1]."""
    u = (np.arange(w, dtype=np.float64) + 0.5) / w
    v = (np.arange(h, dtype=np.float64) + 0.5) / h
    return u[None, :], v[:, None]


def _circle(w, h):
    u, v = _grid_uv(w, h)
    return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25


def _square(w, h):
    return np.ones((h, w), dtype=bool)


def _triangle(w, h):
    # Apex up; widened by half a pixel so the two apex pixels exist and the mask touches all four box sides
    # at every size (the detector compares blobs with this raster drawn into the blob's own box).
    u, v = _grid_uv(w, h)
    return np.abs(u - 0.5) <= v / 2 + 0.5 / w


def _diamond(w, h):
    u, v = _grid_uv(w, h)
    return np.abs(u - 0.5) + np.abs(v - 0.5) <= 0.5 + 0.5 / max(w, h)


def _cross(w, h):
    u, v = _grid_uv(w, h)
    return (np.abs(u - 0.5) <= 1 / 6 + 1e-9) | (np.abs(v - 0.5) <= 1 / 6 + 1e-9)


SHAPE_MASKS = {"circle": _circle, "square": _square, "triangle": _triangle, "diamond": _diamond, "cross": _cross}


def shape_mask(shape: str, w: int, h: int | None = None) -> np.ndarray:
    """Ideal raster of ``shape`` filling a ``w`` x ``h`` box -> bool [h, w]."""
    if shape not in SHAPE_MASKS:
        raise KeyError(f"unknown shape {shape!r}; known: {sorted(SHAPE_MASKS)}")
    return SHAPE_MASKS[shape](int(w), int(h if h is not None else w))


@dataclass(frozen=True)
class ShapesLook:
    """How the shapes world's objects look: classes, colours, box sizes and background (``data.shapes.ShapesWorld``
    adds the canvas and placement). It is all the exact detector needs to know about the world."""

    shapes: tuple[str, ...] = field(
        default=("circle", "square", "triangle"),
        metadata={"help": f"object classes (at least 3), from {sorted(SHAPE_MASKS)}"},
    )
    colors: tuple[str, ...] = field(
        default=("red", "orange", "yellow", "green", "blue", "purple"),
        metadata={"help": f"object colours (at least 6), GenEval's names: {list(PALETTE)}"},
    )
    sizes: tuple[int, ...] = field(default=(16, 24), metadata={"help": "object box sides in pixels (in a ShapesWorld: "
                                                                      "multiples of its cell)"})
    background: tuple[int, int, int] = field(default=BACKGROUND, metadata={"help": "background RGB"})

    def __post_init__(self):
        name = type(self).__name__
        for key in ("shapes", "colors", "sizes", "background"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        bad = [s for s in self.shapes if s not in SHAPE_MASKS]
        if bad or len(set(self.shapes)) != len(self.shapes) or len(self.shapes) < 3:
            raise ValueError(f"{name}.shapes: need >= 3 distinct shapes from {sorted(SHAPE_MASKS)}, "
                             f"got {list(self.shapes)}")
        bad = [c for c in self.colors if c not in PALETTE]
        if bad or len(set(self.colors)) != len(self.colors) or len(self.colors) < max(6, len(self.shapes)):
            raise ValueError(f"{name}.colors: need >= max(6, n_shapes) distinct colours from {list(PALETTE)}, "
                             f"got {list(self.colors)}")
        if not self.sizes or any(not isinstance(s, int) or s <= 0 for s in self.sizes):
            raise ValueError(f"{name}.sizes: need positive whole pixel sizes, got {list(self.sizes)}")
        if len(self.background) != 3 or any(not 0 <= c <= 255 for c in self.background):
            raise ValueError(f"{name}.background: expected an RGB triple, got {self.background}")
        if tuple(self.background) in {PALETTE[c] for c in self.colors}:
            raise ValueError(f"{name}.background must differ from every object colour")

    @property
    def palette(self) -> dict[str, tuple[int, int, int]]:
        return {c: PALETTE[c] for c in self.colors}



def _as_images(images) -> np.ndarray:
    """uint8 [B, H, W, 3] from numpy, torch or a list of PIL images / arrays."""
    if isinstance(images, torch.Tensor):
        x = images.detach().cpu().numpy()
    elif isinstance(images, (list, tuple)):
        x = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    else:
        x = np.asarray(images)
    if x.ndim == 3 and x.shape[-1] == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"shapes detector: expected images [B, H, W, 3], got shape {x.shape}")
    if x.dtype != np.uint8:
        raise ValueError(f"shapes detector: expected uint8 images, got {x.dtype}")
    return x


def _neighbours(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, H, W] -> its 4 neighbours [4, B, H, W] (-2 beyond the border)."""
    p = torch.nn.functional.pad(labels, (1, 1, 1, 1), value=-2)
    return torch.stack([p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]])


def _despeckle(labels: torch.Tensor) -> torch.Tensor:
    """Drop labelled pixels with at most one same-label 4-neighbour (noise specks and one-pixel spurs, which
    would stretch a blob's box), then fill unlabelled pixels that 3 or 4 neighbours agree on (noise holes).
    The rasters of the world's shapes have no such pixels, so clean renders are unchanged."""
    same = (_neighbours(labels) == labels).sum(0)
    labels = torch.where((labels >= 0) & (same <= 1), -1, labels)
    nb = _neighbours(labels)
    # a label held by 3 of the 4 neighbours is the upper or the lower neighbour's
    for cand in (nb[0], nb[1]):
        votes = (nb == cand).sum(0)
        labels = torch.where((labels < 0) & (cand >= 0) & (votes >= 3), cand, labels)
    return labels


def _run_ids(labels: torch.Tensor) -> torch.Tensor:
    """labels [..., L] -> id of each element's run of equal labels along the last axis, unique over the tensor."""
    start = torch.ones_like(labels, dtype=torch.bool)
    start[..., 1:] = labels[..., 1:] != labels[..., :-1]
    return start.flatten().cumsum(0).view(labels.shape) - 1


def connected_components(labels: torch.Tensor) -> torch.Tensor:
    """labels int [B, H, W] (-1 = none) -> component id int64 [B, H, W]: the smallest flat index (over the whole
    batch) of its 4-connected component of equal labels, -1 where unlabelled.

    Each round takes the minimum parent over every horizontal run of equal labels, then over every vertical run,
    then jumps pointers (a parent always lies in the same component). Convex blobs settle in two or three rounds.
    """
    b, h, w = labels.shape
    n = b * h * w
    rows = _run_ids(labels).flatten()
    cols = _run_ids(labels.transpose(1, 2)).transpose(1, 2).flatten()
    parent = torch.arange(n, dtype=torch.long)
    n_rows, n_cols = int(rows[-1]) + 1, int(cols[-1]) + 1
    while True:
        best = parent
        for run, k in ((rows, n_rows), (cols, n_cols)):
            low = torch.full((k,), n, dtype=torch.long).scatter_reduce(0, run, best, reduce="amin")
            best = low[run]
        for _ in range(2):
            best = best[best]
        if torch.equal(best, parent):
            break
        parent = best
    return torch.where(labels >= 0, parent.view(b, h, w), -1)


@register_detector("shapes")
class ShapesDetector:
    """Detections of the shapes world's classes, each with its exact palette colour.

    Args:
        world: the look of the world whose colours, classes and sizes are expected (a ``ShapesLook``, or the
            ``data.shapes.ShapesWorld`` that extends it; default: ``ShapesLook()``, the default world's look).
        color_tolerance: max RGB distance of a pixel from the background-to-colour segment of its colour.
        iou_low / iou_high: IoU with the ideal shape mapped to score 0 / 1 (linear in between).
        size_tolerance: accepted box sides are [min(sizes) * (1 - tol), max(sizes) * (1 + tol)].
        min_aspect: smallest accepted short-side / long-side ratio of a blob's box (every class is drawn square).
        min_score: blobs scoring at or below this are not reported.
    """

    def __init__(self, world: ShapesLook | None = None, color_tolerance: float = 48.0, iou_low: float = 0.85,
                 iou_high: float = 0.95, size_tolerance: float = 0.25, min_aspect: float = 0.8,
                 min_score: float = 0.0):
        self.world = world or ShapesLook()
        if not 0 < iou_low < iou_high <= 1:
            raise ValueError(f"ShapesDetector: need 0 < iou_low < iou_high <= 1, got {iou_low}, {iou_high}")
        self.color_tolerance = float(color_tolerance)
        self.iou_low, self.iou_high = float(iou_low), float(iou_high)
        self.min_side = min(self.world.sizes) * (1 - size_tolerance)
        self.max_side = max(self.world.sizes) * (1 + size_tolerance)
        self.min_aspect = float(min_aspect)
        self.min_score = float(min_score)
        self.color_names = list(self.world.colors)
        self._bg = torch.tensor(self.world.background, dtype=torch.float32)
        self._dirs = torch.tensor(list(self.world.palette.values()), dtype=torch.float32) - self._bg  # [C, 3]
        self._dir_sq = (self._dirs**2).sum(1)
        self._ideal: dict[tuple[str, int, int], np.ndarray] = {}

    # ---- stages ----------------------------------------------------------------------------------------------------
    def segment(self, images) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> colour label int64 [B, H, W]: index into ``world.colors``, or -1.

        A pixel is read as a mix ``bg + a * (colour - bg)``: it takes the colour whose background-to-colour
        segment lies nearest (distance <= ``color_tolerance``) when at least half of it is that colour (a >= 0.5).
        A blurred edge is cut at its 50% level, so blobs keep their drawn size instead of eroding; background,
        and colours far from every segment, get -1.
        """
        x = torch.as_tensor(_as_images(images)).float()
        v = x.reshape(-1, 3) - self._bg  # [P, 3]
        dot = v @ self._dirs.T  # [P, C]
        a = (dot / self._dir_sq).clamp(0, 1)
        resid_sq = (v**2).sum(1, keepdim=True) - 2 * a * dot + a**2 * self._dir_sq  # |v - a d|^2, [P, C]
        dist_sq, lab = resid_sq.min(1)
        frac = a.gather(1, lab[:, None])[:, 0]
        lab = torch.where((dist_sq <= self.color_tolerance**2) & (frac >= 0.5), lab, -1)
        return _despeckle(lab.view(x.shape[:3]))

    def _ideal_mask(self, cls: str, w: int, h: int) -> np.ndarray:
        key = (cls, w, h)
        if key not in self._ideal:
            self._ideal[key] = shape_mask(cls, w, h)
        return self._ideal[key]

    def classify(self, blob: np.ndarray) -> tuple[str, float, dict[str, float]]:
        """A blob's mask cropped to its box, bool [h, w] -> (best class, its IoU, best IoU of every class).

        Every class is drawn in a square box, and blur fades apexes and sharp corners first, so besides the blob's
        own box the ideal is drawn in each square frame of side max(h, w) or max(h, w) + 1 that contains the box
        (the drawn box, give or take the pixels that faded); the best fit counts.
        """
        h, w = blob.shape
        n_blob = int(blob.sum())
        frames = [(0, 0, w, h)]
        for side in (max(h, w), max(h, w) + 1):
            frames += [(dx, dy, side, side) for dy in range(side - h + 1) for dx in range(side - w + 1)
                       if (side, side) != (w, h) or (dx, dy) != (0, 0)]
        ious = {}
        for cls in self.world.shapes:
            best = 0.0
            for dx, dy, fw, fh in frames:
                ideal = self._ideal_mask(cls, fw, fh)
                inter = int(np.count_nonzero(ideal[dy:dy + h, dx:dx + w] & blob))
                best = max(best, inter / (n_blob + int(ideal.sum()) - inter))
            ious[cls] = best
        best = max(ious, key=ious.get)
        return best, ious[best], ious

    def score(self, iou: float) -> float:
        return float(np.clip((iou - self.iou_low) / (self.iou_high - self.iou_low), 0.0, 1.0))

    # ---- detection -------------------------------------------------------------------------------------------------
    def detect(self, images) -> list[list[Detection]]:
        """uint8 [B, H, W, 3] -> per image, one Detection per plausible blob (any class), most confident first."""
        x = _as_images(images)
        b, h, w = x.shape[:3]
        labels = self.segment(x)
        comp = connected_components(labels)
        valid = comp >= 0
        roots, inverse = torch.unique(comp[valid], return_inverse=True)
        k = len(roots)
        out: list[list[Detection]] = [[] for _ in range(b)]
        if k == 0:
            return out
        bi, yi, xi = valid.nonzero(as_tuple=True)

        def reduce(v, how):
            init = torch.full((k,), h * w if how == "amin" else -1, dtype=torch.long)
            return init.scatter_reduce(0, inverse, v, reduce=how)

        x0, x1 = reduce(xi, "amin"), reduce(xi, "amax") + 1
        y0, y1 = reduce(yi, "amin"), reduce(yi, "amax") + 1
        img_of = roots // (h * w)
        col_of = labels.view(-1)[roots]
        bw, bh = x1 - x0, y1 - y0
        short, long = torch.minimum(bw, bh).float(), torch.maximum(bw, bh).float()
        keep = (short >= self.min_side) & (long <= self.max_side) & (short / long >= self.min_aspect)
        comp_np = comp.numpy()
        for j in keep.nonzero().flatten().tolist():
            i = int(img_of[j])
            bx0, by0, bx1, by1 = int(x0[j]), int(y0[j]), int(x1[j]), int(y1[j])
            blob = comp_np[i, by0:by1, bx0:bx1] == int(roots[j])
            cls, iou, _ = self.classify(blob)
            s = self.score(iou)
            if s > self.min_score:
                out[i].append(Detection(cls, s, (float(bx0), float(by0), float(bx1), float(by1)),
                                        self.color_names[int(col_of[j])]))
        for dets in out:
            dets.sort(key=lambda d: -d.score)
        return out

    def __call__(self, images, classes: list[list[str]] | None = None) -> list[list[Detection]]:
        """Detector protocol: detections of the classes asked for in each image (all classes when None)."""
        dets = self.detect(images)
        if classes is None:
            return dets
        if len(classes) != len(dets):
            raise ValueError(f"shapes detector: {len(dets)} images but {len(classes)} class lists")
        return [[d for d in ds if d.label in set(cs)] for ds, cs in zip(dets, classes)]
