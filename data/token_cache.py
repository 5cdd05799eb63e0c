"""Encode every image of a caption dataset once into an Arrow dataset of codes, and reuse it on later runs.

The cache key is a hash of (the image tokenizer's saved weights and config, the source data's content hash, this
module's format version), so a retrained tokenizer or edited data re-encodes and anything else is a cache hit.
A cache directory is written next to its siblings under a temporary name and renamed when complete, so an
interrupted encode never leaves a half-written cache that a later run would trust.

Layout: ``<cache_dir>/codes-<key>/`` (``datasets.save_to_disk``) with ``argrpo_cache.json`` describing it.
Columns: ``caption`` (str), ``codes`` (int32 list of length h*w, raster order), plus any ``keep_columns``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from argrpo.data.captions import load_images, source_fingerprint

CACHE_FORMAT = 1
MARKER = "argrpo_cache.json"


def tokenizer_fingerprint(image_tokenizer) -> str:
    """Hash of what ``save_pretrained`` writes (weights + config): the identity of an image tokenizer."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(image_tokenizer).__qualname__.encode())
    with tempfile.TemporaryDirectory(prefix="argrpo-tokfp-") as tmp:
        image_tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                h.update(str(path.relative_to(tmp)).encode())
                h.update(path.read_bytes())
    return h.hexdigest()


def cache_key(image_tokenizer, captions, tokenizer_fp: str | None = None, source_fp: str | None = None) -> str:
    tok = tokenizer_fp or tokenizer_fingerprint(image_tokenizer)
    src = source_fp or source_fingerprint(captions)
    return hashlib.blake2b(f"{CACHE_FORMAT}:{tok}:{src}".encode(), digest_size=12).hexdigest()


def _encode_batch(batch: dict, image_tokenizer, image_size) -> dict:
    images = load_images(batch, image_size)  # uint8 [B, H, W, 3]
    with torch.inference_mode():
        codes = image_tokenizer.encode(images)  # int [B, h, w]
    codes = torch.as_tensor(codes).reshape(len(images), -1).to(torch.int32)
    return {"codes": codes.numpy()}


def build_token_cache(
    captions,
    image_tokenizer,
    cache_dir: str | Path,
    batch_size: int = 256,
    keep_columns: tuple[str, ...] = (),
    tokenizer_fp: str | None = None,
):
    """Caption dataset -> cached ``datasets.Dataset`` with ``caption`` and ``codes`` (int32 [h*w] per row).

    A cache hit loads ``<cache_dir>/codes-<key>`` without touching the image tokenizer's ``encode``.
    """
    import datasets

    cache_dir = Path(cache_dir)
    key = cache_key(image_tokenizer, captions, tokenizer_fp=tokenizer_fp)
    final = cache_dir / f"codes-{key}"
    if (final / MARKER).is_file():
        ds = datasets.load_from_disk(str(final))
        meta = json.loads((final / MARKER).read_text())
        if meta.get("rows") == len(ds) == len(captions):
            return ds
        # A marker that disagrees with the data (hand-edited dir): rebuild rather than trust it.
    cache_dir.mkdir(parents=True, exist_ok=True)
    n_tokens = int(image_tokenizer.grid[0] * image_tokenizer.grid[1])
    keep = ["caption", *keep_columns]
    drop = [c for c in captions.column_names if c not in keep]
    features = datasets.Features(
        {
            **{c: captions.features[c] for c in keep},
            "codes": datasets.Sequence(datasets.Value("int32"), length=n_tokens),
        }
    )
    encoded = captions.map(
        _encode_batch,
        batched=True,
        batch_size=batch_size,
        remove_columns=drop,
        features=features,
        fn_kwargs={"image_tokenizer": image_tokenizer, "image_size": tuple(image_tokenizer.image_size)},
        new_fingerprint=key,
        keep_in_memory=True,
        desc="encoding images",
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".codes-{key}-", dir=cache_dir))
    try:
        encoded.save_to_disk(str(tmp / "data"))
        (tmp / "data" / MARKER).write_text(
            json.dumps({"key": key, "rows": len(encoded), "n_tokens": n_tokens, "format": CACHE_FORMAT}, indent=2)
        )
        if final.exists():  # a stale/incomplete dir of the same key
            shutil.rmtree(final)
        os.replace(tmp / "data", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(final))
