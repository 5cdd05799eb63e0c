"""Rollout engines, registered by name: ``torch`` (built in) and ``vllm`` (needs vLLM).

Engines register themselves on import; :func:`get_engine` imports ``rollout.engines.<name>_engine`` on first use,
so a missing optional dependency (vLLM) only matters to whoever asks for that engine.
"""

from __future__ import annotations

import importlib

from argrpo.rollout.engines.base import ENGINES, RolloutEngine, encode_prompts, register_engine


def get_engine(name: str) -> type:
    """The engine class registered as ``name``; raises ``KeyError`` listing the known names."""
    if name not in ENGINES:
        try:
            importlib.import_module(f"argrpo.rollout.engines.{name}_engine")
        except ModuleNotFoundError as e:
            if e.name != f"argrpo.rollout.engines.{name}_engine":
                raise ImportError(f"rollout engine {name!r} needs a package that is missing: {e.name}") from e
    if name not in ENGINES:
        raise KeyError(f"unknown rollout engine {name!r}; known: {sorted(set(ENGINES) | {'torch', 'vllm'})}")
    return ENGINES[name]


__all__ = ["ENGINES", "RolloutEngine", "encode_prompts", "get_engine", "register_engine"]
