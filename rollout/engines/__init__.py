"""Rollout engines, registered by name: ``torch`` (built in) and ``vllm`` (needs vLLM).

Engines register themselves on import; :func:`get_engine` imports ``rollout.engines.<name>_engine`` on first use,
so a missing optional dependency (vLLM) only matters to whoever asks for that engine.
"""

from __future__ import annotations

from argrpo.rollout.engines.base import ENGINES, RolloutEngine, encode_prompts, register_engine


def get_engine(name: str) -> type:
    """The engine class registered as ``name``; an unknown name raises ``KeyError`` listing the known names."""
    return ENGINES.lookup(name)


__all__ = ["ENGINES", "RolloutEngine", "encode_prompts", "get_engine", "register_engine"]
