"""Janus-Pro (transformers ``JanusForConditionalGeneration``, model_type ``janus``), loaded as shipped.

Janus keeps its image vocabulary apart from the text one: an image code enters through
``model.generation_embeddings`` then ``model.generation_aligner``, and its logits come from
``model.generation_head`` (an MLP onto the codebook), never from ``lm_head``. argrpo still writes a sampled image
as LM ids ``visual_offset + code`` (``visual_offset`` = the text embedding's row count, so no text id collides);
only this family turns such ids into embeddings. An image is ``vision_config.num_image_tokens`` codes (576 = 24 x 24
at 384 px for Janus-Pro-1B / -7B), decoded by the checkpoint's own ``JanusVQVAE``.

Prompt (the processor's image-generation prompt, Janus-Pro's conversation format): BOS, then
``<|User|>: {caption}\\n\\n<|Assistant|>:``, then ``<begin_of_image>``. The unconditional prompt of CFG is the same
prompt with every token except BOS and ``<begin_of_image>`` replaced by the pad id (transformers' own
``generate(generation_mode="image")`` does exactly this). The BOI id is read from the tokenizer: transformers drops
``generation_config.json``'s ``generation_kwargs`` (which holds it) on load.
"""

from __future__ import annotations

import torch
from argrpo.models.families.base import CheckpointVQTokenizer, ModelFamily, load_shipped, unwrap_model
from argrpo.models.layout import TokenLayout

BOI_TOKEN = "<begin_of_image>"
PROMPT_TEMPLATE = "<|User|>: {caption}\n\n<|Assistant|>:"
# the language model's projections; the SigLIP understanding tower has modules of the same names, never adapted


class JanusImageDecoder(CheckpointVQTokenizer):
    """The checkpoint's ``JanusVQVAE`` as an image tokenizer (codes are a flat [B, h * w] to it)."""

    def _encode(self, pixels):
        return self.vqmodel.encode(pixels).image_tokens

    def _decode(self, codes):
        return self.vqmodel.decode(codes.flatten(1))


def janus_layout(config, tokenizer) -> TokenLayout:
    """The TokenLayout of a Janus checkpoint from its config and tokenizer."""
    text = config.text_config
    n_img = int(config.vision_config.num_image_tokens)
    side = int(round(n_img ** 0.5))
    if side * side != n_img:
        raise ValueError(f"Janus vision_config.num_image_tokens {n_img} is not a square grid")
    vq = config.vq_config
    upsample = 2 ** (len(vq.channel_multiplier) - 1)
    return TokenLayout(
        name="janus",
        text_vocab_size=len(tokenizer),
        visual_offset=max(int(text.vocab_size), len(tokenizer)),
        codebook_size=int(vq.num_embeddings),
        grid=(side, side),
        image_size=(side * upsample, side * upsample),
        special_tokens=(BOI_TOKEN,),
        prompt_template=PROMPT_TEMPLATE,
        uncond_caption="",
    )


class JanusFamily(ModelFamily):
    name = "janus"
    model_types = ("janus",)
    vllm = False
    lora_module = "language_model"  # not the vision tower

    def decoder(self, model):
        return unwrap_model(model).model.language_model

    def decoder_inputs(self, model, ids):
        """Text ids through the text embedding, visual ids through generation_embeddings + generation_aligner."""
        inner = unwrap_model(model).model
        off = self.layout.visual_offset
        visual = ids >= off
        if bool(visual.all()):
            return {"inputs_embeds": inner.generation_aligner(inner.generation_embeddings(ids - off))}
        text = inner.language_model.get_input_embeddings()(ids.clamp(max=off - 1))
        if not bool(visual.any()):
            return {"inputs_embeds": text}
        img = inner.generation_aligner(inner.generation_embeddings((ids - off).clamp(min=0)))
        return {"inputs_embeds": torch.where(visual[..., None], img.to(text.dtype), text)}

    def visual_logits(self, model, hidden):
        return unwrap_model(model).model.generation_head(hidden)

    def text_logits(self, model, hidden):
        head = unwrap_model(model).lm_head
        return torch.nn.functional.linear(hidden, head.weight[: self.layout.text_vocab_size])

    def _ids(self, tokenizer) -> tuple[int, int, int]:
        boi = tokenizer.convert_tokens_to_ids(BOI_TOKEN)
        if boi is None or boi == tokenizer.unk_token_id:
            raise ValueError(f"Janus tokenizer has no {BOI_TOKEN} token")
        if tokenizer.bos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("Janus tokenizer needs a BOS and a pad token")
        return int(tokenizer.bos_token_id), int(boi), int(tokenizer.pad_token_id)

    def encode_prompts(self, tokenizer, captions):
        bos, boi, _ = self._ids(tokenizer)
        texts = [self.layout.format_prompt(c) for c in captions]
        out = []
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            out.append([bos] + list(ids) + [boi])
        return out

    def uncond_prompt_ids(self, tokenizer, prompt_ids):
        bos, boi, pad = self._ids(tokenizer)
        return [t if t in (bos, boi) else pad for t in prompt_ids]

    def check_vocab(self, model, what: str) -> None:
        n = unwrap_model(model).model.generation_embeddings.num_embeddings
        if n != self.layout.codebook_size:
            raise ValueError(f"{what}: generation_embeddings has {n} codes, the layout {self.layout.codebook_size}")

    def image_decoder(self, model):
        return JanusImageDecoder(unwrap_model(model).model.vqmodel, self.layout)

    def rollout_model(self, model):
        """Drop the understanding tower (SigLIP encoder + aligner): image generation never runs it. Its names are
        recorded so full-weight pushes that still carry those tensors load without complaint."""
        inner = unwrap_model(model).model
        inner.vision_model = None
        inner.aligner = None
        unwrap_model(model)._argrpo_dropped = ("model.vision_model.", "model.aligner.")
        return model

    @classmethod
    def load(cls, path, meta, expected=None, device="cpu", dtype=None, trainable=False, layout_kwargs=None):
        from argrpo.models.policy import LoadedPolicy
        from transformers import JanusForConditionalGeneration

        path, tokenizer, model = load_shipped(cls, JanusForConditionalGeneration, path, meta, expected, dtype, trainable)
        layout = janus_layout(unwrap_model(model).config, tokenizer)
        if isinstance(expected, TokenLayout):
            expected.check_compatible(layout, what=f"checkpoint {path}")
        model.to(device)
        if not trainable:
            model.eval()
        return LoadedPolicy(model=model, tokenizer=tokenizer, layout=layout, image_tokenizer_path=None, path=path,
                            family=cls(layout))
