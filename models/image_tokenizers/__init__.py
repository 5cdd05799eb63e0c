"""Image tokenizers: the ImageTokenizer protocol, its registry and ``load_image_tokenizer``.

A saved tokenizer is a directory with ``image_tokenizer.json`` whose ``kind`` names a registered class; that
class's ``from_pretrained(path)`` reads the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

from argrpo.errors import MissingFileError, UserFileError
from argrpo.models.image_tokenizers.base import IMAGE_TOKENIZERS, ImageTokenizer, register_image_tokenizer

CONFIG_NAME = "image_tokenizer.json"

__all__ = ["IMAGE_TOKENIZERS", "ImageTokenizer", "register_image_tokenizer", "load_image_tokenizer"]


def load_image_tokenizer(path: str | Path):
    """Directory with ``image_tokenizer.json`` ({"kind": ...}) -> the registered tokenizer class, loaded."""
    path = Path(path)
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise MissingFileError(f"{path}: no {CONFIG_NAME} (not a saved image tokenizer directory)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UserFileError(f"{cfg_path}: not valid JSON: {e}") from e
    kind = cfg.get("kind") if isinstance(cfg, dict) else None
    if not isinstance(kind, str):
        raise UserFileError(f"{cfg_path}: missing string key 'kind'")
    return IMAGE_TOKENIZERS.lookup(kind, where=str(cfg_path)).from_pretrained(path)
