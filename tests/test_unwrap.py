"""unwrap_model: every wrapper a policy can be in (DDP-style .module, torch.compile, peft) is removed, in any
nesting; keep_peft stops at the peft model."""

from __future__ import annotations

import torch
from argrpo.models.unwrap import unwrap_model
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM


class ModuleWrapper(torch.nn.Module):
    """What DDP and accelerate's wrappers look like from outside: the model is ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def tiny_lm():
    cfg = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    return Qwen2ForCausalLM(cfg)


def test_every_wrapper_in_any_nesting():
    hf = tiny_lm()
    peft = get_peft_model(hf, LoraConfig(r=2, target_modules=["q_proj"]))
    compiled = torch.compile(peft)  # wrapping only: nothing is compiled until it is called
    wrapped = ModuleWrapper(compiled)
    assert unwrap_model(hf) is hf
    assert unwrap_model(peft) is hf
    assert unwrap_model(wrapped) is hf
    assert unwrap_model(torch.compile(ModuleWrapper(hf))) is hf
    # the LoRA layers stay inside the unwrapped model
    assert any("lora_A" in name for name, _ in unwrap_model(wrapped).named_parameters())


def test_keep_peft_stops_at_the_peft_model():
    hf = tiny_lm()
    peft = get_peft_model(hf, LoraConfig(r=2, target_modules=["q_proj"]))
    assert unwrap_model(ModuleWrapper(torch.compile(peft)), keep_peft=True) is peft
    assert unwrap_model(ModuleWrapper(hf), keep_peft=True) is hf
