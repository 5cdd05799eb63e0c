"""Image tokenizers: the ImageTokenizer protocol, its registry and ``load_image_tokenizer``.

A saved tokenizer is a directory with ``image_tokenizer.json`` whose ``kind`` names a registered class; that
class's ``from_pretrained(path)`` reads the rest.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path

from argrpo.models.image_tokenizers.base import IMAGE_TOKENIZERS, ImageTokenizer, register_image_tokenizer

CONFIG_NAME = "image_tokenizer.json"

__all__ = ["IMAGE_TOKENIZERS", "ImageTokenizer", "register_image_tokenizer", "load_image_tokenizer",
           "import_builtin_tokenizers"]


def import_builtin_tokenizers() -> None:
    """Import every module of this package so the built-in tokenizers (vq, cosmos, ...) register themselves."""
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}")


def load_image_tokenizer(path: str | Path):
    """Directory with ``image_tokenizer.json`` ({"kind": ...}) -> the registered tokenizer class, loaded."""
    path = Path(path)
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (not a saved image tokenizer directory)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON: {e}") from e
    kind = cfg.get("kind") if isinstance(cfg, dict) else None
    if not isinstance(kind, str):
        raise ValueError(f"{cfg_path}: missing string key 'kind'")
    import_builtin_tokenizers()
    if kind not in IMAGE_TOKENIZERS:
        raise ValueError(f"{cfg_path}: unknown image tokenizer kind {kind!r}; registered: {sorted(IMAGE_TOKENIZERS)}")
    return IMAGE_TOKENIZERS[kind].from_pretrained(path)
