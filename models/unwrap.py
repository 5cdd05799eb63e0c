"""The model under its wrappers, in one place: DDP / FSDP1 / accelerate (``.module``), ``torch.compile``
(``._orig_mod``) and peft (``.get_base_model()``)."""

from __future__ import annotations

import torch


def unwrap_model(model: torch.nn.Module, keep_peft: bool = False) -> torch.nn.Module:
    """The Hugging Face model under every wrapper (LoRA layers stay in place inside its submodules).

    ``keep_peft=True`` stops at a peft model instead (to ask whether the policy is LoRA, or to read its adapter).
    FSDP2 (``fully_shard``) wraps nothing: the module is its own class, sharded in place.
    """
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if not isinstance(inner, torch.nn.Module) and not keep_peft and hasattr(model, "get_base_model"):
            inner = model.get_base_model()
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner
