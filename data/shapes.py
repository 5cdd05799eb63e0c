"""The shapes world: GenEval-schema prompts about coloured shapes, and a deterministic renderer for them.

Images are 64x64 RGB: flat-coloured shapes on a neutral grey background. Every shape's box sits on a grid of
8x8-pixel cells and measures a whole number of cells (16 or 24 px by default), and shapes keep at least one empty
cell between their boxes. So every 8x8 patch is "background plus one colour under one of a finite set of masks":
a small factorised (mask x colour) codebook encodes rendered images losslessly, and connected components of one
colour are exactly the objects. (Measured on a free-placement prototype: a k-means patch VQ kept 99% of pixels
right yet flipped the detector's verdict on about 30% of images.)

Prompts follow GenEval's schema and phrasing for its six tags::

    single_object  {"include": [{"class": "circle", "count": 1}]}                       a photo of a circle
    two_object     {"include": [{"class": "circle", ...}, {"class": "square", ...}]}    a photo of a circle and a square
    counting       include count 2-4, exclude count+1                                   a photo of three triangles
    colors         {"include": [{"class": "square", "count": 1, "color": "blue"}]}      a photo of a blue square
    position       second object {"position": ["left of", 0]} relative to the first     a photo of a square left of a circle
    color_attr     two objects, each with a colour                                      a photo of a red circle and a blue square

The held-out split holds compositions that never appear as a training prompt (``ShapesWorld.is_heldout``): some
colour-shape pairs (in ``colors`` and ``color_attr``), one single-object class, one count per class, one order of
some pairs of classes and one relation per ordered pair. Objects whose colour a prompt leaves free may take any
colour in both splits, so every (mask, colour) patch is seen in training images.

Placement is random by default; ``ShapesWorld(object_order="named")`` hands the same places out so that the objects
of a prompt without a position clause appear in raster order in the order the prompt names them (see
``_in_named_order`` for why a policy with a factored head needs that to bind two colours).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from itertools import permutations, product
from pathlib import Path

import numpy as np

# GenEval's geometry, shared with the scorer so renders satisfy positions exactly as they are judged; the palette
# and the shape rasters, shared with the exact detector so objects are drawn exactly as they are recognised
from argrpo.rewards.detectors.base import Detection
from argrpo.rewards.detectors.shapes import PALETTE, ShapesLook, shape_mask
from argrpo.rewards.geneval import RELATIONS, TAGS, parse_spec, relative_position

SPLITS = ("train", "heldout")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
COUNTS = tuple(NUMBER_WORDS)
OBJECT_ORDERS = ("random", "named")

PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "cross": "crosses"}


def record_detections(record: dict) -> list[Detection]:
    """The renderer's record as perfect detections (score 1), to judge renders against specs with GenEval's rules
    (``rewards.geneval.score_image``)."""
    return [Detection(o["class"], 1.0, tuple(o["box"]), o["color"]) for o in record["objects"]]


# ---- prompts -------------------------------------------------------------------------------------------------------
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(req: dict) -> str:
    words = ([req["color"]] if "color" in req else []) + [req["class"]]
    count = int(req["count"])
    if count == 1:
        return f"{_article(words[0])} {' '.join(words)}"
    return " ".join([NUMBER_WORDS.get(count, str(count))] + words[:-1] + [PLURALS.get(words[-1], words[-1] + "s")])


def prompt_for(spec: dict) -> str:
    """GenEval's phrasing: "a photo of " + objects joined by "and", or "<B> <relation> <A>" for a positioned B."""
    inc = spec["include"]
    if len(inc) == 2 and "position" in inc[1]:
        return f"a photo of {_noun_phrase(inc[1])} {inc[1]['position'][0]} {_noun_phrase(inc[0])}"
    return "a photo of " + " and ".join(_noun_phrase(r) for r in inc)


def _obj(cls: str, count: int = 1, color: str | None = None, position=None) -> dict:
    d = {"class": cls, "count": count}
    if color is not None:
        d["color"] = color
    if position is not None:
        d["position"] = list(position)
    return d


def spec_from_key(tag: str, key: tuple) -> dict:
    """A composition key (see ``ShapesWorld.compositions``) -> GenEval spec dict with its prompt."""
    if tag == "single_object":
        include = [_obj(key[0])]
    elif tag == "two_object":
        include = [_obj(key[0]), _obj(key[1])]
    elif tag == "counting":
        include = [_obj(key[0], key[1])]
    elif tag == "colors":
        include = [_obj(key[1], color=key[0])]
    elif tag == "position":
        subject, rel, reference = key
        include = [_obj(reference), _obj(subject, position=(rel, 0))]
    elif tag == "color_attr":
        (ca, a), (cb, b) = key
        include = [_obj(a, color=ca), _obj(b, color=cb)]
    else:
        raise ValueError(f"unknown tag {tag!r}; known: {list(TAGS)}")
    spec = {"tag": tag, "include": include}
    if tag == "counting":
        spec["exclude"] = [{"class": key[0], "count": key[1] + 1}]
    spec["prompt"] = prompt_for(spec)
    return spec


# ---- the world -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapesWorld(ShapesLook):
    """What exists in the shapes world and how it is drawn: its look (classes, colours, sizes, background; what the
    exact detector knows) plus the canvas and how objects are placed on it.

    Classes and colours set the prompt space; ``sizes`` must be whole multiples of ``cell`` (the image tokenizer's
    patch) so each patch holds one colour under one mask. Same settings + same seed => identical specs and images.
    """

    image_size: int = field(default=64, metadata={"help": "square image side in pixels"})
    cell: int = field(default=8, metadata={"help": "placement grid step in pixels (= image tokenizer patch size)"})
    gap: int = field(default=1, metadata={"help": "empty cells kept between object boxes (so blobs never merge)"})
    object_order: str = field(
        default="random",
        metadata={"help": "where the objects of a prompt without a position clause go: 'random' (any free place) or "
                          "'named' (the same places, handed out so that the object named first starts first in "
                          f"the image tokens' raster order); one of {list(OBJECT_ORDERS)}"},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.image_size % self.cell:
            raise ValueError(f"ShapesWorld: image_size {self.image_size} is not a multiple of cell {self.cell}")
        if any(s % self.cell or s > self.image_size for s in self.sizes):
            raise ValueError(f"ShapesWorld.sizes: need positive multiples of cell {self.cell} that fit the image, "
                             f"got {list(self.sizes)}")
        if self.object_order not in OBJECT_ORDERS:
            raise ValueError(f"ShapesWorld.object_order: unknown {self.object_order!r}; known: {list(OBJECT_ORDERS)}")
        # The densest prompt (4 objects) must always fit, else rendering could fail at random.
        side = (max(self.sizes) // self.cell + self.gap) * 2 - self.gap
        if side > self.grid_cells:
            raise ValueError(f"ShapesWorld: four {max(self.sizes)}px objects with gap {self.gap} do not fit "
                             f"a {self.image_size}px image")

    # ---- basic facts ----------------------------------------------------------------------------------------------
    @property
    def grid_cells(self) -> int:
        return self.image_size // self.cell

    def vocabulary(self) -> list[str]:
        """Every word a prompt of this world can contain (for a word-level text tokenizer), in a fixed order."""
        words = ["a", "an", "photo", "of", "and"]
        words += [w for r in RELATIONS for w in r.split()]
        words += [NUMBER_WORDS[c] for c in COUNTS]
        words += list(self.colors) + list(self.shapes) + [PLURALS[s] for s in self.shapes]
        return list(dict.fromkeys(words))

    # ---- compositions and splits ----------------------------------------------------------------------------------
    @cached_property
    def heldout_pairs(self) -> frozenset[tuple[str, str]]:
        """(colour, shape) pairs never named together in a training prompt: one per shape, distinct colours."""
        n = len(self.colors)
        return frozenset((self.colors[(2 * i + 1) % n], s) for i, s in enumerate(self.shapes))

    def compositions(self, tag: str) -> list[tuple]:
        """Every composition key of ``tag`` in a fixed order (see ``spec_from_key`` for their meaning)."""
        s, c = self.shapes, self.colors
        if tag == "single_object":
            return [(x,) for x in s]
        if tag == "two_object":
            return list(permutations(s, 2))
        if tag == "counting":
            return list(product(s, COUNTS))
        if tag == "colors":
            return list(product(c, s))
        if tag == "position":
            return [(b, rel, a) for (b, a) in permutations(s, 2) for rel in RELATIONS]
        if tag == "color_attr":
            objs = list(product(c, s))
            # GenEval's color_attr pairs always differ in both class and colour.
            return [(x, y) for x in objs for y in objs if x[1] != y[1] and x[0] != y[0]]
        raise ValueError(f"unknown tag {tag!r}; known: {list(TAGS)}")

    def is_heldout(self, tag: str, key: tuple) -> bool:
        """Whether composition ``key`` of ``tag`` belongs to the held-out split. Held out: the last class alone
        (single_object); one order of each pair of neighbouring classes (two_object); one count per class
        (counting); the ``heldout_pairs`` (colors, and color_attr when either object is one); one relation per
        ordered pair of classes (position). Every word and every class keeps training prompts of each tag."""
        s = self.shapes
        if tag == "single_object":
            return key[0] == s[-1]
        if tag == "two_object":
            # One order of each pair (the training set keeps the other).
            return (s.index(key[0]) - s.index(key[1])) % len(s) == 1
        if tag == "counting":
            return key[1] == COUNTS[s.index(key[0]) % len(COUNTS)]
        if tag == "colors":
            return tuple(key) in self.heldout_pairs
        if tag == "position":
            b, rel, a = key
            k = list(permutations(s, 2)).index((b, a))
            return rel == RELATIONS[k % len(RELATIONS)]
        if tag == "color_attr":
            return tuple(key[0]) in self.heldout_pairs or tuple(key[1]) in self.heldout_pairs
        raise ValueError(f"unknown tag {tag!r}; known: {list(TAGS)}")

    def split_compositions(self, split: str, tag: str) -> list[tuple]:
        """The compositions of ``tag`` in ``split`` ("train" or "heldout"), in ``compositions`` order."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {list(SPLITS)}")
        want = split == "heldout"
        return [k for k in self.compositions(tag) if self.is_heldout(tag, k) == want]

    def make_specs(self, split: str, n: int, seed: int, tags=TAGS) -> list[dict]:
        """``n`` GenEval-schema specs of ``split``, tags balanced (cycled in ``tags`` order, then shuffled), each
        composition drawn uniformly from its tag's part of the split. Deterministic in (settings, split, n, seed)."""
        tags = tuple(tags)
        for t in tags:
            if t not in TAGS:
                raise ValueError(f"unknown tag {t!r}; known: {list(TAGS)}")
        rng = np.random.default_rng([int(seed), SPLITS.index(split) if split in SPLITS else 99, 1])
        pools = {t: self.split_compositions(split, t) for t in tags}
        order = [tags[i % len(tags)] for i in range(int(n))]
        rng.shuffle(order)
        return [spec_from_key(t, pools[t][int(rng.integers(len(pools[t])))]) for t in order]

    def prompt_set(self, split: str, per_tag: int, seed: int = 0) -> list[dict]:
        """A prompt set with ``per_tag`` rows per tag that spreads each tag's compositions evenly: every one of
        them appears before any repeats (tags with fewer compositions than ``per_tag`` repeat them in turn)."""
        rng = np.random.default_rng([int(seed), SPLITS.index(split), 2])
        rows = []
        for tag in TAGS:
            keys = self.split_compositions(split, tag)
            order = rng.permutation(len(keys))
            rows += [spec_from_key(tag, keys[order[i % len(keys)]]) for i in range(per_tag)]
        return rows

    # ---- rendering ------------------------------------------------------------------------------------------------
    def _check_spec(self, spec: dict) -> None:
        """GenEval's clause schema (the scorer's own check), then what this world can draw."""
        name = f"spec {spec.get('prompt', '')!r}"
        inc = parse_spec(spec, name)["include"]
        for i, req in enumerate(inc):
            where = f"{name} include[{i}]"
            if req["class"] not in self.shapes:
                raise ValueError(f"{where}: class {req['class']!r} is not one of {list(self.shapes)}")
            if "color" in req and req["color"] not in self.colors:
                raise ValueError(f"{where}: color {req['color']!r} is not one of {list(self.colors)}")
            if req["count"] > max(COUNTS):
                raise ValueError(f"{where}: count must be an int in 1..{max(COUNTS)}, got {req['count']!r}")
        if sum(r["count"] for r in inc) > max(COUNTS):
            raise ValueError(f"{name}: more than {max(COUNTS)} objects")

    def _valid_cells(self, size_c: int, placed, constraints) -> list[tuple[int, int]]:
        """Top-left cells where a ``size_c``-cell box keeps ``gap`` empty cells to every placed box and satisfies
        every (relation, target box) constraint exclusively (no other relation holds, so a wrong-relation
        prompt is judged wrong)."""
        g, out = self.gap, []
        for r in range(self.grid_cells - size_c + 1):
            for c in range(self.grid_cells - size_c + 1):
                ok = all(c + size_c + g <= pc or pc + ps + g <= c or r + size_c + g <= pr or pr + ps + g <= r
                         for pr, pc, ps in placed)
                if ok and constraints:
                    box = self._box(r, c, size_c)
                    ok = all(relative_position(box, tb) == {rel} for rel, tb in constraints)
                if ok:
                    out.append((r, c))
        return out

    def _box(self, r: int, c: int, size_c: int) -> tuple[int, int, int, int]:
        k = self.cell
        return (c * k, r * k, (c + size_c) * k, (r + size_c) * k)

    def render(self, spec: dict, seed: int) -> tuple[np.ndarray, dict]:
        """Draw exactly the objects ``spec`` includes -> (image uint8 [H, W, 3], record).

        Free colours, sizes and placements are random but deterministic in ``seed``. ``record["objects"]`` lists
        each object's class, colour, box (x0, y0, x1, y1), box in cells and the include entry it came from.
        """
        self._check_spec(spec)
        rng = np.random.default_rng([int(seed), 3])
        wanted = [(i, req) for i, req in enumerate(spec["include"]) for _ in range(req["count"])]
        for _attempt in range(200):
            objects, placed = [], []
            for i, req in wanted:
                size = int(rng.choice(self.sizes))
                size_c = size // self.cell
                constraints = []
                if "position" in req:
                    rel, target = req["position"]
                    constraints = [(rel, o["box"]) for o in objects if o["include"] == target]
                cells = self._valid_cells(size_c, placed, constraints)
                if not cells:
                    break
                r, c = cells[int(rng.integers(len(cells)))]
                color = req.get("color") or self.colors[int(rng.integers(len(self.colors)))]
                placed.append((r, c, size_c))
                objects.append({"class": req["class"], "color": color, "box": self._box(r, c, size_c),
                                "cells": (r, c, size_c), "include": i})
            else:
                if self.object_order == "named" and not any("position" in req for req in spec["include"]):
                    objects = _in_named_order(objects)
                return self._draw(objects), {"objects": objects, "seed": int(seed)}
        raise RuntimeError(f"could not place the objects of {spec.get('prompt')!r} (seed {seed})")

    def _draw(self, objects) -> np.ndarray:
        img = np.empty((self.image_size, self.image_size, 3), dtype=np.uint8)
        img[:] = self.background
        for o in objects:
            x0, y0, x1, y1 = o["box"]
            mask = shape_mask(o["class"], x1 - x0, y1 - y0)
            img[y0:y1, x0:x1][mask] = PALETTE[o["color"]]
        return img

    def sample(self, split: str, n: int, seed: int, tags=TAGS) -> tuple[list[dict], np.ndarray, list[dict]]:
        """``n`` specs of ``split`` and their renders -> (specs, images uint8 [n, H, W, 3], records)."""
        specs = self.make_specs(split, n, seed, tags)
        images = np.empty((len(specs), self.image_size, self.image_size, 3), dtype=np.uint8)
        records = []
        for j, spec in enumerate(specs):
            images[j], rec = self.render(spec, render_seed(seed, j))
            records.append(rec)
        return specs, images, records

    def build_dataset(self, split: str, n: int, seed: int, tags=TAGS):
        """A ``datasets.Dataset`` of ``n`` rendered rows: prompt, tag, metadata (GenEval spec as JSON, one string
        per row so Arrow never fills missing keys), seed (the render seed), image (PIL, 64x64 RGB)."""
        import datasets
        from PIL import Image

        specs = self.make_specs(split, n, seed, tags)
        seeds = [render_seed(seed, j) for j in range(len(specs))]

        def rows():
            for spec, s in zip(specs, seeds):
                img, _ = self.render(spec, s)
                yield {"prompt": spec["prompt"], "tag": spec["tag"], "metadata": json.dumps(spec), "seed": s,
                       "image": Image.fromarray(img)}

        features = datasets.Features({
            "prompt": datasets.Value("string"), "tag": datasets.Value("string"),
            "metadata": datasets.Value("string"), "seed": datasets.Value("int64"), "image": datasets.Image(),
        })
        return datasets.Dataset.from_list(list(rows()), features=features)


def _in_named_order(objects: list[dict]) -> list[dict]:
    """The same boxes, handed to the objects in the order they are named: the first box in raster order (top row,
    then left column) goes to the first object. An object's first image token is its box's top row, so the
    policy then draws the named objects in turn; with random order the first token of a two-object image is either
    object, and a head whose logits add a mask part and a colour part samples that token's shape and colour
    independently, binding the colours of "a red circle and a blue square" half the time at best."""
    places = sorted(((o["box"], o["cells"]) for o in objects), key=lambda place: place[1][:2])
    return [{**o, "box": box, "cells": cells} for o, (box, cells) in zip(objects, places)]


def render_seed(seed: int, index: int) -> int:
    """Render seed of row ``index`` in a sample drawn with ``seed`` (kept apart from the spec draw)."""
    return int(seed) * 1_000_003 + int(index)


# ---- perturbations (for checking that a judge says "wrong" when it should) ----------------------------------------
PERTURB_KINDS = ("class", "color", "count", "position")


def perturb_spec(world: ShapesWorld, spec: dict, rng: np.random.Generator, kind: str | None = None) -> dict:
    """A spec that an image rendered from ``spec`` does NOT satisfy: one wrong colour, count, class or relation.

    ``kind``: which of ``PERTURB_KINDS`` to change (None: one the spec has, drawn from ``rng``). A changed class is
    one the spec does not name, so the image cannot hold it; a changed relation is wrong because renders satisfy
    their relation exclusively.
    """
    spec = json.loads(json.dumps({k: v for k, v in spec.items() if k != "prompt"}))
    inc = spec["include"]
    kinds = ["class"]
    if any("color" in r for r in inc):
        kinds.append("color")
    if spec["tag"] == "counting":
        kinds.append("count")
    if any("position" in r for r in inc):
        kinds.append("position")
    if kind is None:
        kind = kinds[int(rng.integers(len(kinds)))]
    elif kind not in kinds:
        raise ValueError(f"perturb_spec: a {spec['tag']} spec has no {kind!r} to change; it has {kinds}")
    if kind == "class":
        i = int(rng.integers(len(inc)))
        named = {r["class"] for r in inc}
        inc[i]["class"] = str(rng.choice([s for s in world.shapes if s not in named]))
        for ex in spec.get("exclude", []):
            ex["class"] = inc[0]["class"]
    elif kind == "color":
        i = int(rng.choice([j for j, r in enumerate(inc) if "color" in r]))
        inc[i]["color"] = str(rng.choice([c for c in world.colors if c != inc[i]["color"]]))
    elif kind == "count":
        inc[0]["count"] = int(rng.choice([c for c in COUNTS if c != inc[0]["count"]]))
        spec["exclude"] = [{"class": inc[0]["class"], "count": inc[0]["count"] + 1}]
    else:
        i = next(j for j, r in enumerate(inc) if "position" in r)
        inc[i]["position"][0] = str(rng.choice([r for r in RELATIONS if r != inc[i]["position"][0]]))
    spec["prompt"] = prompt_for(spec)
    return spec


# ---- image corruptions (robustness checks) -------------------------------------------------------------------------
def blur_and_noise(images, blur_sigma: float = 0.0, noise_std: float = 0.0, seed: int = 0) -> np.ndarray:
    """Gaussian blur (sigma in pixels, reflect-padded) then additive Gaussian noise, clipped:
    uint8 [B, H, W, 3] -> uint8 [B, H, W, 3]. Mimics the soft edges and grain of generated images."""
    import torch

    x = torch.as_tensor(np.asarray(images)).float().permute(0, 3, 1, 2)
    if blur_sigma > 0:
        radius = max(1, math.ceil(3 * blur_sigma))
        t = torch.arange(-radius, radius + 1, dtype=torch.float32)
        k = torch.exp(-(t**2) / (2 * blur_sigma**2))
        k = k / k.sum()
        c = x.shape[1]
        x = torch.nn.functional.pad(x, (radius, radius, radius, radius), mode="reflect")
        x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
        x = torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    if noise_std > 0:
        g = torch.Generator().manual_seed(int(seed))
        x = x + noise_std * torch.randn(x.shape, generator=g)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ---- prompt sets on disk -------------------------------------------------------------------------------------------
def write_prompt_sets(directory: str | Path, world: ShapesWorld | None = None, train_per_tag: int = 200,
                      heldout_per_tag: int = 20, seed: int = 0) -> dict[str, Path]:
    """Write the default prompt sets as GenEval jsonl: ``train.jsonl`` and ``heldout.jsonl`` (held-out
    compositions only, every tag) -> {split: path}."""
    from argrpo.data.prompts import write_prompts

    world = world or ShapesWorld()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, per_tag in (("train", train_per_tag), ("heldout", heldout_per_tag)):
        out[split] = directory / f"{split}.jsonl"
        write_prompts(out[split], world.prompt_set(split, per_tag, seed))
    return out


def vocabulary(world: ShapesWorld | None = None) -> list[str]:
    """Every word a prompt of the (default) shapes world can contain."""
    return (world or ShapesWorld()).vocabulary()

