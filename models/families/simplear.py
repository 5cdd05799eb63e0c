"""The shared-vocabulary family (SimpleAR, the shapes world, any HF causal LM extended with a visual codebook).

Visual code ``k`` is vocabulary row ``visual_offset + k`` of the LM itself: its embedding is a row of the text
embedding, its logit a row of ``lm_head`` (only the rows ``[visual_offset, visual_end)`` are ever multiplied).
Checkpoints are Hugging Face causal-LM directories plus argrpo.json (``models.policy``); a released SimpleAR
directory without argrpo.json loads with the ``simplear`` layout preset.
"""

from __future__ import annotations

import torch.nn.functional as F
from argrpo.models.families.base import ModelFamily, unwrap_model

# logit transforms the visual head does not model (the learner refuses them rather than score a different head)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


class SharedVocabFamily(ModelFamily):
    name = "simplear"
    model_types = ()  # the fallback for any causal LM (see families.detect)
    vllm = True

    def decoder(self, model):
        hf = unwrap_model(model)
        return hf.get_decoder() if hasattr(hf, "get_decoder") else hf.model

    def decoder_inputs(self, model, ids):
        return {"input_ids": ids}

    def visual_logits(self, model, hidden):
        hf = unwrap_model(model)
        head = hf.get_output_embeddings()
        vs = self.layout.visual_slice
        bias = head.bias[vs] if getattr(head, "bias", None) is not None else None
        logits = F.linear(hidden, head.weight[vs], bias)  # a row slice of W is a view: no copy of the head
        cap = getattr(hf.config, "final_logit_softcapping", None)
        if cap:
            import torch

            logits = torch.tanh(logits / cap) * cap
        return logits

    def visual_head_rows(self, model):
        """(weight [C, H], bias [C] or None): views of the LM head's visual rows (the learner multiplies only
        these, in chunks; see grpo.logprobs)."""
        head = unwrap_model(model).get_output_embeddings()
        vs = self.layout.visual_slice
        return head.weight[vs], (head.bias[vs] if getattr(head, "bias", None) is not None else None)

    def check_scoring(self, model):
        hf = unwrap_model(model)
        cfg = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
        for key in _LOGIT_TRANSFORMS:
            value = getattr(cfg, key, None)
            if value not in (None, 1, 1.0):
                raise NotImplementedError(
                    f"{type(hf).__name__}: config.{key}={value!r} transforms the logits; the visual head supports "
                    f"plain linear heads only (Qwen2, Llama)"
                )

    def uncond_prompt_ids(self, tokenizer, prompt_ids):
        # one unconditional prompt for every row: the template around the empty caption
        return self.encode_prompts(tokenizer, [self.layout.uncond_caption])[0]

    def check_vocab(self, model, what: str) -> None:
        vocab = unwrap_model(model).get_input_embeddings().weight.shape[0]
        if vocab < self.layout.visual_end:
            raise ValueError(f"{what}: the model's vocabulary {vocab} < layout visual_end {self.layout.visual_end}")

    @classmethod
    def load(cls, path, meta, expected=None, device="cpu", dtype=None, trainable=False, layout_kwargs=None):
        from argrpo.models.policy import _load_shared_vocab

        loaded = _load_shared_vocab(path, meta, expected, device, dtype, trainable, layout_kwargs)
        loaded.family = cls(loaded.layout)
        return loaded
