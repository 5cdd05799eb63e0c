"""GenEval's correctness rules over a pluggable detector, as a scorer and as two rewards.

The rules follow the GenEval benchmark (Ghosh et al. 2023, evaluation/evaluate_images.py):

- boxes of a class are sorted by confidence, kept above 0.3 (0.9 when the prompt's tag is ``counting``), at most 16
  per class, then optionally greedy NMS (``max_overlap``; 1.0 = off, GenEval's default) with GenEval's inclusive
  pixel IoU;
- ``include`` clauses are ANDed: clause ``{"class", "count"}`` needs at least ``count`` boxes, and colour and position
  are judged on the ``count`` most confident of them only;
- colour: every judged box must have the requested colour (a detector-given colour, else zero-shot CLIP on the crop);
- position ``[relation, j]``: every judged box must stand in ``relation`` to every judged box of include clause ``j``,
  which must itself have been met. Centres are compared after shrinking each axis' offset by
  ``0.1 x (sum of both boxes' sizes on that axis)``; a relation holds when the shrunk offset, divided by the length of
  the raw offset, exceeds 0.5 in its direction;
- ``exclude`` clauses ``{"class", "count"}`` fail when ``count`` or more boxes of the class are kept.

``geneval`` gives 1.0 when every rule holds, else 0.0. ``geneval_dense`` gives the fraction of checks met (a count,
colour and position check per include clause, one per exclude clause), a denser signal for RL; for it a position
check is judged whenever both clauses found enough boxes, even when a colour check failed (the binary verdict is the
same either way, since every check must hold).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from argrpo.jsonl import parse_json
from argrpo.rewards.base import Reward, RewardError, RewardOutput, register_reward
from argrpo.rewards.detectors.base import DETECTORS, Detection

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
# GenEval's six tags; the rules read the tag (counting uses a stricter confidence threshold)
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

# (image uint8 [H, W, 3], boxes [K] of (x0, y0, x1, y1), class name) -> K colour names
ColorFn = Callable[[np.ndarray, Sequence[Sequence[float]], str], list[str]]


@dataclass
class GenEvalRules:
    """GenEval's thresholds (its defaults)."""

    threshold: float = field(default=0.3, metadata={"help": "box confidence needed (strictly above)"})
    counting_threshold: float = field(default=0.9, metadata={"help": "box confidence needed on 'counting' prompts"})
    max_objects: int = field(default=16, metadata={"help": "most boxes kept per class"})
    max_overlap: float = field(default=1.0, metadata={"help": "NMS IoU threshold; 1.0 disables NMS"})
    position_threshold: float = field(default=0.1, metadata={"help": "position margin, times the boxes' sizes"})


# --------------------------------------------------------------------------------------------------- spec


def parse_spec(meta: Mapping | str, where: str = "metadata") -> dict:
    """Validate one GenEval row (a dict or its JSON string) and return it as a dict; errors name ``where``."""
    if isinstance(meta, (str, bytes)):
        meta = parse_json(meta, where, ValueError, obj=False)
    if not isinstance(meta, Mapping):
        raise ValueError(f"{where}: expected a GenEval dict with 'include', got {type(meta).__name__}")
    include = meta.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError(f"{where}: 'include' must be a non-empty list of clauses")
    for i, req in enumerate(include):
        w = f"{where}: include[{i}]"
        _check_clause(req, w)
        if "color" in req and req["color"] not in COLORS:
            raise ValueError(f"{w}: colour {req['color']!r} is not one of {list(COLORS)}")
        if "position" in req:
            pos = req["position"]
            if (not isinstance(pos, (list, tuple)) or len(pos) != 2 or pos[0] not in RELATIONS
                    or not isinstance(pos[1], int) or not 0 <= pos[1] < i):
                raise ValueError(f"{w}: 'position' must be [relation, j] with relation in {list(RELATIONS)} "
                                 f"and j an earlier include index, got {pos!r}")
    exclude = meta.get("exclude", [])
    if not isinstance(exclude, list):
        raise ValueError(f"{where}: 'exclude' must be a list of clauses")
    for i, req in enumerate(exclude):
        _check_clause(req, f"{where}: exclude[{i}]")
    return dict(meta)


def _check_clause(req: Any, where: str) -> None:
    if not isinstance(req, Mapping):
        raise ValueError(f"{where}: expected a dict, got {req!r}")
    if not isinstance(req.get("class"), str) or not req["class"]:
        raise ValueError(f"{where}: missing 'class'")
    count = req.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"{where}: 'count' must be a positive integer, got {count!r}")


def spec_classes(spec: Mapping) -> list[str]:
    """The class names a detector must look for, in first-mention order."""
    names = [r["class"] for r in spec.get("include", [])] + [r["class"] for r in spec.get("exclude", [])]
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------------------------------- geometry


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU with GenEval's inclusive pixel convention (a box covers x1 - x0 + 1 pixels)."""

    def area(x0, y0, x1, y1):
        return max(x1 - x0 + 1, 0) * max(y1 - y0 + 1, 0)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a[:4]) + area(*b[:4]) - inter
    return inter / union if union else 0.0


def relative_position(box_a: Sequence[float], box_b: Sequence[float], margin: float = 0.1) -> set[str]:
    """Relations of box A to box B: a subset of {"left of", "right of", "above", "below"} (y grows downwards)."""
    a = np.asarray(box_a[:4], dtype=np.float64).reshape(2, 2)
    b = np.asarray(box_b[:4], dtype=np.float64).reshape(2, 2)
    offset = a.mean(axis=0) - b.mean(axis=0)
    size_a, size_b = np.abs(a[1] - a[0]), np.abs(b[1] - b[0])
    shrunk = np.maximum(np.abs(offset) - margin * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def select_detections(detections: Sequence[Detection], spec: Mapping, rules: GenEvalRules) -> dict[str, list[Detection]]:
    """Per class: sort by confidence, keep those above the tag's threshold, cap at ``max_objects``, greedy NMS."""
    threshold = rules.counting_threshold if spec.get("tag") == "counting" else rules.threshold
    by_class: dict[str, list[Detection]] = {}
    for d in detections:
        by_class.setdefault(d.label, []).append(d)
    kept: dict[str, list[Detection]] = {}
    for label, dets in by_class.items():
        order = sorted(dets, key=lambda d: -float(d.score))
        order = [d for d in order if float(d.score) > threshold][: rules.max_objects]
        out = []
        while order:
            best = order.pop(0)
            out.append(best)
            if rules.max_overlap < 1:
                order = [d for d in order if box_iou(best.box, d.box) < rules.max_overlap]
        if out:
            kept[label] = out
    return kept


# --------------------------------------------------------------------------------------------------- scoring


def score_image(spec: Mapping | str, detections: Sequence[Detection], image: np.ndarray | None = None,
                color_fn: ColorFn | None = None, rules: GenEvalRules | None = None) -> tuple[bool, dict]:
    """Judge one image. ``detections``: every box the detector proposed (any class, any confidence).

    A colour clause on boxes without ``Detection.color`` needs ``image`` (uint8 ``[H, W, 3]``) and ``color_fn``.
    Returns ``(correct, details)``; details: ``tag``, ``checks`` (one ``{"clause", "kind", "ok"}`` per check),
    ``fraction`` (of checks met), ``reasons`` (why it failed, GenEval's wording), ``detected`` ({class: [[x0, y0, x1,
    y1, score], ...]} of the kept boxes) and ``colors`` ({include index: colours of the judged boxes}).
    """
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    rules = rules or GenEvalRules()
    kept = select_detections(detections, spec, rules)
    checks: list[dict] = []
    reasons: list[str] = []
    colors_seen: dict[int, list[str]] = {}
    found: list[list[Detection] | None] = []  # judged boxes per include clause, None when the count failed
    color_ok: list[bool] = []

    def check(clause: str, kind: str, ok: bool, reason: str = "") -> bool:
        checks.append({"clause": clause, "kind": kind, "ok": bool(ok)})
        if not ok and reason:
            reasons.append(reason)
        return ok

    for i, req in enumerate(spec["include"]):
        cls, count, clause = req["class"], req["count"], f"include[{i}]"
        boxes = kept.get(cls, [])[:count]
        has_count = check(clause, "count", len(boxes) >= count, f"expected {cls}>={count}, found {len(boxes)}")
        found.append(boxes if has_count else None)
        ok_color = True
        if "color" in req:
            if has_count:
                colors = _colors_of(boxes, cls, image, color_fn)
                colors_seen[i] = colors
                n_ok = colors.count(req["color"])
                ok_color = check(clause, "color", n_ok >= count,
                                 f"expected {req['color']} {cls}>={count}, found {n_ok} {req['color']}; and "
                                 + ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors))
            else:
                ok_color = check(clause, "color", False)
        color_ok.append(has_count and ok_color)
        if "position" in req:
            rel, j = req["position"]
            target = found[j]
            if not has_count:
                check(clause, "position", False)
            elif target is None:
                check(clause, "position", False, f"no target for {cls} to be {rel}")
            else:
                ok_pos, seen = True, set()
                for obj in boxes:
                    for tgt in target:
                        seen = relative_position(obj.box, tgt.box, rules.position_threshold)
                        if rel not in seen:
                            ok_pos = False
                            break
                    if not ok_pos:
                        break
                check(clause, "position", ok_pos, f"expected {cls} {rel} target, found {' and '.join(sorted(seen))} "
                                                  f"target")
    for i, req in enumerate(spec.get("exclude", [])):
        cls, n = req["class"], len(kept.get(req["class"], []))
        check(f"exclude[{i}]", "exclude", n < req["count"], f"expected {cls}<{req['count']}, found {n}")
    # GenEval treats a position target whose own colour failed as unmatched; that clause already failed, so the
    # verdict below (every check holds) is GenEval's.
    correct = all(c["ok"] for c in checks)
    details = {
        "tag": spec.get("tag"),
        "correct": correct,
        "fraction": sum(c["ok"] for c in checks) / len(checks),
        "checks": checks,
        "reasons": reasons,
        "colors": colors_seen,
        "detected": {k: [[*map(float, d.box), float(d.score)] for d in v] for k, v in kept.items()},
    }
    return correct, details


def _colors_of(boxes: Sequence[Detection], cls: str, image: np.ndarray | None, color_fn: ColorFn | None) -> list[str]:
    colors = [d.color for d in boxes]
    missing = [k for k, c in enumerate(colors) if c is None]
    if missing:
        if color_fn is None or image is None:
            raise ValueError(f"a colour clause on {cls!r} needs box colours: the detector gave none, so pass the "
                             f"image and a colour classifier (rewards.colors.ColorClassifier)")
        guessed = color_fn(image, [boxes[k].box for k in missing], cls)
        for k, c in zip(missing, guessed):
            colors[k] = c
    return colors


def score_batch(specs: Sequence[Mapping | str], detections: Sequence[Sequence[Detection]],
                images: Sequence[np.ndarray] | None = None, color_fn: ColorFn | None = None,
                rules: GenEvalRules | None = None) -> list[tuple[bool, dict]]:
    """:func:`score_image` over a batch; ``specs[i]`` may be a dict or JSON string (errors name the row)."""
    if len(specs) != len(detections):
        raise ValueError(f"{len(specs)} specs but {len(detections)} detection lists")
    if images is not None and len(images) != len(specs):
        raise ValueError(f"{len(specs)} specs but {len(images)} images")
    out = []
    for i, (spec, dets) in enumerate(zip(specs, detections)):
        spec = parse_spec(spec, f"metadata row {i}")
        out.append(score_image(spec, dets, None if images is None else images[i], color_fn, rules))
    return out


# --------------------------------------------------------------------------------------------------- rewards


def build_detector(spec: str | Callable, **kwargs: Any):
    """A registered detector name (its built-in module is imported on demand), ``package.module:Class``, or an
    already-built detector."""
    if callable(spec) and not isinstance(spec, str) and not isinstance(spec, type):
        if kwargs:
            raise ValueError("detector is already built; drop detector_kwargs")
        return spec
    if isinstance(spec, type):
        return spec(**kwargs)
    return DETECTORS.lookup(spec)(**kwargs)


class GenEvalReward(Reward):
    """GenEval correctness of each image from its GenEval row (metadata key ``metadata``).

    ``images``: B uint8 ``[H, W, 3]``; ``metadata``: B GenEval dicts or JSON strings (None -> score None).
    Extras: ``correct`` and ``fraction`` per sample, and ``tag/<tag>`` (correctness, None for other tags) for
    per-tag accuracy in logs.
    """

    name = "geneval"

    def __init__(self, detector: str | Callable = "shapes", detector_kwargs: dict | None = None,
                 color_classifier: Any = None, dense: bool = False, metadata_key: str = "metadata",
                 rules: GenEvalRules | Mapping | None = None, name: str | None = None):
        super().__init__(name or ("geneval_dense" if dense else "geneval"))
        self.detector = build_detector(detector, **(detector_kwargs or {}))
        self._color_spec = color_classifier
        self._color_fn: ColorFn | None = color_classifier if callable(color_classifier) else None
        self.dense = dense
        self.metadata_key = metadata_key
        self.rules = GenEvalRules(**rules) if isinstance(rules, Mapping) else (rules or GenEvalRules())

    def color_fn(self) -> ColorFn:
        """The crop colour classifier, built on first need (only colour clauses on colourless boxes need it)."""
        if self._color_fn is None:
            from argrpo.rewards.colors import ColorClassifier

            kwargs = self._color_spec if isinstance(self._color_spec, Mapping) else {}
            self._color_fn = ColorClassifier(**kwargs)
        return self._color_fn

    def judge(self, images: list[np.ndarray], metadata: Sequence[Any]) -> list[tuple[bool, dict] | None]:
        """Detect and judge each image; None where its metadata is None."""
        specs = [None if m is None else parse_spec(m, f"{self.metadata_key} row {i}") for i, m in enumerate(metadata)]
        idx = [i for i, s in enumerate(specs) if s is not None]
        results: list[tuple[bool, dict] | None] = [None] * len(specs)
        if not idx:
            return results
        batch = [images[i] for i in idx]
        if len({im.shape for im in batch}) == 1:
            batch = np.stack(batch)  # the detector protocol's uint8 [B, H, W, 3] when sizes agree
        dets = self.detector(batch, [spec_classes(specs[i]) for i in idx])
        if len(dets) != len(idx):
            raise RewardError(f"detector {self.detector!r} returned {len(dets)} detection lists for {len(idx)} images")
        lazy = _LazyColor(self)
        for k, i in enumerate(idx):
            results[i] = score_image(specs[i], dets[k], images[i], lazy, self.rules)
        return results

    def score(self, prompts, images, **metadata) -> RewardOutput:
        if self.metadata_key not in metadata:
            raise ValueError(f"needs the GenEval rows as metadata key {self.metadata_key!r} "
                             f"(got keys {sorted(metadata)})")
        results = self.judge(images, metadata[self.metadata_key])
        scores: list[float | None] = []
        extras: dict[str, list[float | None]] = {"correct": [], "fraction": []}
        tags = sorted({r[1]["tag"] for r in results if r is not None and r[1]["tag"]})
        for t in tags:
            extras[f"tag/{t}"] = []
        for r in results:
            if r is None:
                scores.append(None)
                for v in extras.values():
                    v.append(None)
                continue
            correct, det = r
            scores.append(det["fraction"] if self.dense else float(correct))
            extras["correct"].append(float(correct))
            extras["fraction"].append(det["fraction"])
            for t in tags:
                extras[f"tag/{t}"].append(float(correct) if det["tag"] == t else None)
        return RewardOutput(scores, extras)


class _LazyColor:
    """Defers building the CLIP colour classifier until a colour is actually needed."""

    def __init__(self, reward: GenEvalReward):
        self.reward = reward

    def __call__(self, image, boxes, cls):
        return self.reward.color_fn()(image, boxes, cls)


@register_reward("geneval")
def _geneval(**kwargs) -> GenEvalReward:
    return GenEvalReward(**kwargs)


@register_reward("geneval_dense")
def _geneval_dense(**kwargs) -> GenEvalReward:
    return GenEvalReward(dense=True, **kwargs)
