"""Model families: one small interface per released model family (``base.ModelFamily``), registered by name.

A checkpoint names its family: argrpo.json's ``family`` when argrpo wrote it, else config.json's ``model_type``
(a family loads its own ``model_types`` as shipped), else the shared-vocabulary family (SimpleAR and the shapes
world). The checkpoint's own metadata decides; a preset or family name in a run config is only checked against it.
"""

from __future__ import annotations

import json
from pathlib import Path

from argrpo.models.families.base import ModelFamily, unwrap_model
from argrpo.models.families.emu3 import Emu3Family
from argrpo.models.families.extended import ExtendedFamily
from argrpo.models.families.janus import JanusFamily
from argrpo.models.families.simplear import SharedVocabFamily
from argrpo.registry import Registry

FAMILIES: Registry[type[ModelFamily]] = Registry("model family")


def register_family(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Register a family class under ``cls.name``; a second class of the same name or model_type is an error."""
    # a family of the same name is refused by FAMILIES.add, as a duplicate name
    taken = {t: f.name for f in FAMILIES.values() for t in f.model_types if f.name != cls.name}
    clash = [t for t in cls.model_types if t in taken]
    if clash:
        raise ValueError(f"model family {cls.name!r}: model_type {clash[0]!r} already belongs to {taken[clash[0]]!r}")
    return FAMILIES.add(cls.name, cls)


register_family(SharedVocabFamily)
register_family(JanusFamily)
register_family(Emu3Family)
register_family(ExtendedFamily)
DEFAULT_FAMILY = SharedVocabFamily.name


def get_family(name: str) -> type[ModelFamily]:
    """The family class registered as ``name``; an unknown name raises ``KeyError`` listing the registered ones."""
    return FAMILIES.lookup(name)


def family_of_model_type(model_type: str | None) -> type[ModelFamily]:
    for cls in FAMILIES.values():
        if model_type in cls.model_types:
            return cls
    return FAMILIES[DEFAULT_FAMILY]


def detect_family(path: str | Path, meta: dict | None = None) -> type[ModelFamily]:
    """The family class of a checkpoint directory: argrpo.json ``family``, else config.json ``model_type`` (for a
    LoRA directory, its base's), else the shared-vocabulary family."""
    path = Path(path)
    if meta and meta.get("family"):
        return get_family(meta["family"])
    config = path / "config.json"
    if not config.is_file() and meta and meta.get("base_model"):
        config = Path(meta["base_model"]) / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except json.JSONDecodeError as e:
            raise ValueError(f"{config}: not valid JSON: {e}") from e
        return family_of_model_type(model_type)
    return FAMILIES[DEFAULT_FAMILY]


def family_for_layout(layout) -> ModelFamily:
    """The family to use with a bare ``TokenLayout`` (tests, benchmarks, a model built from a size preset): the
    shared-vocabulary family. A ``ModelFamily`` passes through."""
    if isinstance(layout, ModelFamily):
        return layout
    return FAMILIES[DEFAULT_FAMILY](layout)


def check_engine(family: ModelFamily, engine: str) -> None:
    """Fail before anything starts when ``engine`` cannot generate ``family``."""
    if engine == "vllm" and not family.vllm:
        raise ValueError(
            f"rollout.engine 'vllm' cannot generate the {family.name!r} model family (its image tokens use their own "
            f"embedding and head, which vLLM does not serve); use rollout.engine: torch"
        )


__all__ = ["FAMILIES", "Emu3Family", "ExtendedFamily", "JanusFamily", "ModelFamily", "SharedVocabFamily",
           "check_engine", "detect_family", "family_for_layout", "get_family", "register_family", "unwrap_model"]
