"""Image-caption pairs as a ``datasets.Dataset``, from files on disk or rendered from the shapes world.

Sources (``CaptionSource.kind``):

- ``imagefolder``: a folder of images with captions, either in ``metadata.jsonl`` / ``metadata.csv`` (columns
  ``file_name`` and the caption column, Hugging Face's imagefolder convention) or in a ``<image stem>.txt`` sidecar.
- ``jsonl`` / ``parquet``: one row per image with an image path (relative to the file's folder or absolute) and
  a caption.
- ``shapes``: GenEval-schema scene specs of the shapes world (``data.shapes``), rendered when they are encoded.

Rows never hold pixels: file rows hold ``image_path`` (absolute) and ``image_sha`` (a content hash, so the token
cache notices an edited image); rendered rows hold ``spec`` (JSON), ``render_seed`` and ``world`` (the renderer's settings). :func:`load_images` turns
a batch of either kind into ``uint8 [B, H, W, 3]``. Every row is checked when the source is read; a missing
caption or image file raises :class:`CaptionDataError` naming the file and the row.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from argrpo.errors import UserFileError
from argrpo.jsonl import read_jsonl
from argrpo.registry import Registry

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
CAPTION_STYLES = ("prompt", "mixed")


class CaptionDataError(UserFileError):
    """A bad row or file in image-caption data; the message names the file and the row."""


# data.kind -> the reader of that source into a datasets.Dataset (each is registered where it is defined below)
CAPTION_SOURCES: Registry[Callable[[CaptionSource], Any]] = Registry("caption source")


@dataclass
class CaptionSource:
    """Where image-caption pairs come from."""

    kind: str = field(default="shapes", metadata={"help": "a registered caption source: imagefolder, jsonl, parquet or "
                                                          "shapes"})
    path: str | None = field(
        default=None, metadata={"help": "image folder, or the .jsonl / .parquet file (not used for shapes)"}
    )
    image_column: str = field(default="image", metadata={"help": "column holding the image path (jsonl/parquet)"})
    caption_column: str = field(default="caption", metadata={"help": "column holding the caption"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N rows (None = all)"})
    shapes_split: str = field(default="train", metadata={"help": "shapes world split the specs come from"})
    shapes_n: int = field(default=20000, metadata={"help": "number of rendered shapes images"})
    shapes_seed: int = field(default=0, metadata={"help": "seed of the shapes specs and their renders"})
    shapes_world: dict = field(
        default_factory=dict, metadata={"help": "ShapesWorld settings (shapes, colors, sizes, ...); {} = defaults"}
    )
    shapes_captions: str = field(
        default="prompt",
        metadata={
            "help": "'prompt': each image captioned with its GenEval-style prompt; 'mixed': a mixture of full, "
            "partial and generic captions that are all true of the image (broad pretraining data)"
        },
    )
    shapes_mixed_full: float = field(
        default=0.5, metadata={"help": "'mixed' captions: fraction of rows that keep the full prompt"}
    )
    shapes_mixed_detailed: float = field(
        default=0.25,
        metadata={"help": "'mixed' captions: fraction of rows captioned with every object's rendered colour; the "
                          "rest get a partial caption"},
    )

    def __post_init__(self):
        CAPTION_SOURCES.lookup(self.kind, where="data.kind")
        if self.kind != "shapes" and not self.path:
            raise ValueError(f"data.path is required for data.kind={self.kind!r}")
        if self.shapes_captions not in CAPTION_STYLES:
            raise ValueError(f"data.shapes_captions must be one of {list(CAPTION_STYLES)}, got {self.shapes_captions!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"data.limit must be >= 1, got {self.limit}")
        if self.shapes_n < 1:
            raise ValueError(f"data.shapes_n must be >= 1, got {self.shapes_n}")
        fracs = (self.shapes_mixed_full, self.shapes_mixed_detailed)
        if min(fracs) < 0 or sum(fracs) > 1:
            raise ValueError(f"data.shapes_mixed_full + shapes_mixed_detailed must be fractions summing to <= 1, "
                             f"got {fracs}")


# ---- reading sources -------------------------------------------------------------------------------------------
def _sha_file(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_row(source: Path, row: int, caption, image, base: Path) -> tuple[str, str, str]:
    """Validate one row; returns (caption, absolute image path, content hash)."""
    if caption is None or not isinstance(caption, str):
        raise CaptionDataError(f"{source}: row {row}: missing caption (got {caption!r})")
    if image is None or not isinstance(image, str) or not image.strip():
        raise CaptionDataError(f"{source}: row {row}: missing image path (got {image!r})")
    path = Path(image)
    if not path.is_absolute():
        path = base / path
    if not path.is_file():
        raise CaptionDataError(f"{source}: row {row}: image file {image!r} not found (looked at {path})")
    return caption, str(path.resolve()), _sha_file(path)


def _table_file(src: CaptionSource) -> Path:
    path = Path(src.path)
    if not path.is_file():
        raise CaptionDataError(f"{path}: data file not found")
    return path


@CAPTION_SOURCES.register("jsonl")
def _jsonl_dataset(src: CaptionSource):
    path = _table_file(src)
    rows = [row for _, row in read_jsonl(path, CaptionDataError)]
    return _file_dataset(src, path, [(r.get(src.caption_column), r.get(src.image_column)) for r in rows])


@CAPTION_SOURCES.register("parquet")
def _parquet_dataset(src: CaptionSource):
    import datasets

    path = _table_file(src)
    table = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    for col in (src.caption_column, src.image_column):
        if col not in table.column_names:
            raise CaptionDataError(f"{path}: no column {col!r}; columns: {table.column_names}")
    return _file_dataset(src, path, list(zip(table[src.caption_column], table[src.image_column])))


@CAPTION_SOURCES.register("imagefolder")
def _folder_dataset(src: CaptionSource):
    return _file_dataset(src, *_folder_rows(src))


def _folder_rows(src: CaptionSource) -> tuple[Path, list[tuple]]:
    folder = Path(src.path)
    if not folder.is_dir():
        raise CaptionDataError(f"{folder}: image folder not found")
    meta_jsonl, meta_csv = folder / "metadata.jsonl", folder / "metadata.csv"
    if meta_jsonl.is_file():
        rows = [row for _, row in read_jsonl(meta_jsonl, CaptionDataError)]
        return meta_jsonl, [(r.get(src.caption_column), r.get("file_name")) for r in rows]
    if meta_csv.is_file():
        with open(meta_csv, newline="") as f:
            rows = list(csv.DictReader(f))
        return meta_csv, [(r.get(src.caption_column), r.get("file_name")) for r in rows]
    # Sidecar captions: every image needs a .txt of the same stem.
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise CaptionDataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) and no metadata.jsonl/csv")
    pairs = []
    for i, img in enumerate(images):
        txt = img.with_suffix(".txt")
        if not txt.is_file():
            raise CaptionDataError(f"{folder}: row {i}: missing caption file {txt} for image {img}")
        pairs.append((txt.read_text().strip(), str(img)))
    return folder, pairs


def load_caption_dataset(src: CaptionSource):
    """Read and check a source -> ``datasets.Dataset``.

    Columns: file sources ``caption, image_path, image_sha``; shapes ``caption, spec, render_seed, world``
    (``world``: the ShapesWorld settings as JSON).
    """
    return CAPTION_SOURCES.lookup(src.kind)(src)


def _file_dataset(src: CaptionSource, origin: Path, pairs: list[tuple]):
    """``(caption, image reference)`` rows read from ``origin`` -> the checked dataset of a file source."""
    import datasets

    if src.limit is not None:
        pairs = pairs[: src.limit]
    if not pairs:
        raise CaptionDataError(f"{origin}: no rows")
    base = origin if origin.is_dir() else origin.parent
    cols: dict[str, list] = {"caption": [], "image_path": [], "image_sha": []}
    for i, (caption, image) in enumerate(pairs):
        caption, path, sha = _check_row(origin, i, caption, image, base)
        cols["caption"].append(caption)
        cols["image_path"].append(path)
        cols["image_sha"].append(sha)
    return datasets.Dataset.from_dict(cols)


# ---- the shapes world ------------------------------------------------------------------------------------------
def _noun(item: dict, with_color: bool = True) -> str:
    """'a red circle' from a GenEval include entry (count 1)."""
    words = f"{item['color']} {item['class']}" if with_color and item.get("color") else item["class"]
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def partial_captions(spec: dict) -> list[str]:
    """Captions that are true of an image rendered from ``spec`` but say less than its prompt.

    Web captions under-describe images; pretraining on them teaches the image prior and the vocabulary without
    tying every image to one phrasing. Only statements implied by the spec are produced (a subset of the
    objects, a colour or the relation left out; never a wrong count).
    """
    from argrpo.data.shapes import NUMBER_WORDS, PLURALS

    items = spec.get("include", [])
    out = ["a photo"]
    singles = [it for it in items if int(it.get("count", 1)) == 1]
    for it in singles:
        out.append(f"a photo of {_noun(it)}")
        if it.get("color"):
            out.append(f"a photo of {_noun(it, with_color=False)}")
    if len(singles) == 2:
        a, b = singles
        out.append(f"a photo of {_noun(a, False)} and {_noun(b, False)}")
        if a.get("color") or b.get("color"):
            out.append(f"a photo of {_noun(a)} and {_noun(b)}")
    for it in items:
        n = int(it.get("count", 1))
        if n > 1:
            plural = PLURALS.get(it["class"], it["class"] + "s")
            out.append(f"a photo of {plural}")
            out.append(f"a photo of {NUMBER_WORDS.get(n, str(n))} {plural}")
    return [c for c in dict.fromkeys(out) if c != spec.get("prompt")]


def detailed_caption(spec: dict, record: dict, heldout_pairs=frozenset()) -> str:
    """The prompt of ``spec`` with the rendered colour of every single object filled in (GenEval phrasing).

    Prompts leave most colours free; naming the colours the renderer chose gives colour-binding supervision on
    every image, not only on the colour-tagged ones. A (colour, class) pair in ``heldout_pairs`` stays unnamed.
    """
    from argrpo.data.shapes import prompt_for

    include = [dict(it) for it in spec["include"]]
    for it_index, it in enumerate(include):
        colors = {o["color"] for o in record["objects"] if o["include"] == it_index}
        # several objects of one clause in different colours: leave the colour out
        if len(colors) == 1 and (color := colors.pop(), it["class"]) not in heldout_pairs:
            it["color"] = color
    return prompt_for({**spec, "include": include})


def heldout_prompts(world) -> frozenset[str]:
    """Every prompt of the world's held-out split (no training caption may equal one)."""
    from argrpo.data.shapes import TAGS, spec_from_key

    return frozenset(spec_from_key(t, k)["prompt"] for t in TAGS for k in world.split_compositions("heldout", t))


@CAPTION_SOURCES.register("shapes")
def _shapes_dataset(src: CaptionSource):
    import datasets
    from argrpo.data.shapes import ShapesWorld, render_seed

    world = ShapesWorld(**src.shapes_world)
    n = src.shapes_n if src.limit is None else min(src.shapes_n, src.limit)
    specs = world.make_specs(src.shapes_split, n, seed=src.shapes_seed)
    rng = random.Random(f"captions:{src.shapes_seed}")
    heldout = heldout_prompts(world) if src.shapes_captions == "mixed" else frozenset()
    world_json = json.dumps(src.shapes_world, sort_keys=True)
    cols: dict[str, list] = {"caption": [], "spec": [], "render_seed": [], "world": []}
    for i, spec in enumerate(specs):
        caption = spec["prompt"]
        if src.shapes_captions == "mixed":
            # Derived captions must not leak held-out compositions into training (the held-out score measures
            # generalisation to them), so a derived caption equal to a held-out prompt falls back to the prompt.
            u = rng.random()
            if u >= src.shapes_mixed_full + src.shapes_mixed_detailed:
                derived = rng.choice(partial_captions(spec) or [caption])
            elif u >= src.shapes_mixed_full:
                record = world.render(spec, render_seed(src.shapes_seed, i))[1]
                derived = detailed_caption(spec, record, world.heldout_pairs)
            else:
                derived = caption
            if src.shapes_split == "heldout" or derived not in heldout:
                caption = derived
        cols["caption"].append(caption)
        cols["spec"].append(json.dumps(spec, sort_keys=True))
        cols["render_seed"].append(render_seed(src.shapes_seed, i))
        cols["world"].append(world_json)
    return datasets.Dataset.from_dict(cols)


# ---- pixels ----------------------------------------------------------------------------------------------------
def _load_file_image(path: str, size: tuple[int, int]) -> np.ndarray:
    """Centre-crop to the target aspect ratio, resize, RGB -> uint8 [H, W, 3]."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        h, w = size
        sw, sh = im.size
        scale = min(sw / w, sh / h)
        cw, ch = round(w * scale), round(h * scale)
        left, top = (sw - cw) // 2, (sh - ch) // 2
        im = im.crop((left, top, left + cw, top + ch))
        if im.size != (w, h):
            im = im.resize((w, h), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


def load_images(batch: dict, image_size: tuple[int, int]) -> np.ndarray:
    """A batch of rows (dict of columns, as ``datasets.map(batched=True)`` passes it) -> uint8 [B, H, W, 3]."""
    if "image_path" in batch:
        return np.stack([_load_file_image(p, image_size) for p in batch["image_path"]])
    if "spec" in batch:
        from argrpo.data.shapes import ShapesWorld

        worlds: dict[str, ShapesWorld] = {}
        images = []
        for spec, seed, settings in zip(batch["spec"], batch["render_seed"], batch["world"]):
            world = worlds.get(settings) or worlds.setdefault(settings, ShapesWorld(**json.loads(settings)))
            images.append(world.render(json.loads(spec), seed=int(seed))[0])
        out = np.stack(images).astype(np.uint8)
        if tuple(out.shape[1:3]) != tuple(image_size):
            raise CaptionDataError(
                f"shapes renders are {tuple(out.shape[1:3])} but the image tokenizer expects {tuple(image_size)}"
            )
        return out
    raise CaptionDataError(f"rows hold no images: columns {sorted(batch)}")


def source_fingerprint(ds) -> str:
    """A content hash of a caption dataset: captions, image hashes / specs and, for rendered rows, the renderer."""
    h = hashlib.blake2b(digest_size=16)
    cols = sorted(c for c in ds.column_names if c != "image_path")
    h.update(json.dumps(cols).encode())
    for col in cols:
        for v in ds[col]:
            h.update(json.dumps(v).encode())
            h.update(b"\0")
    if "spec" in ds.column_names:
        import argrpo.data.shapes as shapes_module

        # A changed renderer draws different pixels for the same spec, so its source is part of the data.
        h.update(Path(shapes_module.__file__).read_bytes())
    return h.hexdigest()
