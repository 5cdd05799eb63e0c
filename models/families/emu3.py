"""Emu3 (transformers ``Emu3ForConditionalGeneration``, model_type ``emu3``), loaded as shipped.

Emu3 is a Llama-style LM whose vocabulary holds its 32,768 VQ codes as tokens named ``<|visual token NNNNNN|>``
(the model's ``vocabulary_map``). An image of ``h x w`` codes is the completion

    row 0: w codes, <|extra_200|> (end of row) ... row h-1: w codes, <|extra_200|>, then EOF, EOI, EOS

(``h * (w + 1) + 3`` tokens), exactly what ``Emu3Model.decode_image_tokens(tokens, h, w)`` reads (it drops the last
three, then each row's end-of-row token) and what the constraint function of transformers' Emu3 documentation
allows. Row ends and the final three are forced (``ExtendedFamily``): no log-prob, no KL, no loss.

Prompt: the processor's generation prompt (``Emu3Processor(text, return_for_image_generation=True)``): BOS, the
caption, ``<|image start|>``, ``"{h}*{w}"`` and ``<|image token|>``. CFG's unconditional branch is the same prompt
around a negative prompt (the layout's ``uncond_caption`` or ``SamplingParams.negative_prompt``), as Emu3's own
generation script builds it. Codes decode with the checkpoint's ``Emu3VQVAE``.

The grid: ``policy.layout_options`` ``grid`` ([h, w]) or ``image_size`` ([H, W], divided by the VQ's downsampling),
else argrpo.json's, else the processor's default ``image_area`` (720 x 720 px: 90 x 90 codes). argrpo's visual ids
lie past the LM vocabulary (the tokenizer itself holds the visual tokens) and are mapped to the visual tokens.
"""

from __future__ import annotations

import torch
from argrpo.models.families.base import CheckpointVQTokenizer, load_shipped, unwrap_model
from argrpo.models.families.extended import ExtendedFamily, ExtendedSpec
from argrpo.models.layout import TokenLayout

VISUAL_TOKEN_FORMAT = "<|visual token {code:06d}|>"
ROW_END = "<|extra_200|>"
# the processor's defaults (Emu3ProcessorKwargs): a square image of this many pixels
DEFAULT_IMAGE_AREA = 518400
# the language model's projections; Emu3VQVAE's attention blocks have q_proj/k_proj/v_proj too, never adapted


def _special(tokenizer, attr: str, default: str) -> str:
    return getattr(tokenizer, attr, None) or default


def emu3_tokens(tokenizer) -> dict[str, str]:
    """Emu3's special tokens by role (named tokenizer attributes, with the released tokenizer's names as defaults)."""
    return {
        "boi": _special(tokenizer, "boi_token", "<|image start|>"),
        "eoi": _special(tokenizer, "eoi_token", "<|image end|>"),
        "wrapper": _special(tokenizer, "image_wrapper_token", "<|image token|>"),
        "eof": _special(tokenizer, "eof_token", "<|extra_201|>"),
        "eos": tokenizer.eos_token or "<|extra_204|>",
    }


def emu3_layout(config, tokenizer, grid=None, image_size=None, uncond_caption: str = "") -> TokenLayout:
    """The TokenLayout of an Emu3 checkpoint: ``grid`` (h, w) codes, or ``image_size`` (H, W) pixels, or the
    processor's default image area."""
    from transformers.models.emu3.modeling_emu3 import Emu3ImageVocabularyMapping

    mapping = Emu3ImageVocabularyMapping(config.vocabulary_map or {})
    codes = sorted(mapping.img2bpe)
    if not codes or codes != list(range(len(codes))):
        raise ValueError("Emu3 config: vocabulary_map must name visual tokens 0..C-1 (<|visual token NNNNNN|>)")
    factor = 2 ** (len(config.vq_config.channel_multiplier) - 1)
    if grid is None:
        if image_size is None:
            side = int(round(DEFAULT_IMAGE_AREA ** 0.5 / factor))
            grid = (side, side)
        else:
            if any(int(s) % factor for s in image_size):
                raise ValueError(f"Emu3: image_size {list(image_size)} is not a multiple of the VQ's {factor}x "
                                 f"downsampling")
            grid = (int(image_size[0]) // factor, int(image_size[1]) // factor)
    h, w = (int(g) for g in grid)
    tok = emu3_tokens(tokenizer)
    spec = ExtendedSpec(visual_token_format=VISUAL_TOKEN_FORMAT, row_end=ROW_END,
                        image_end=(tok["eof"], tok["eoi"], tok["eos"]), bos=True)
    template = "{caption}" + f"{tok['boi']}{h}*{w}{tok['wrapper']}"
    layout = Emu3Family.make_layout("emu3", tokenizer, int(config.text_config.vocab_size), spec, len(codes), (h, w),
                                    (h * factor, w * factor), prompt_template=template, uncond_caption=uncond_caption)
    return layout


class Emu3ImageDecoder(CheckpointVQTokenizer):
    """The checkpoint's ``Emu3VQVAE`` as an image tokenizer (its encode takes each image's size)."""

    def _encode(self, pixels):
        sizes = torch.tensor([list(pixels.shape[-2:])] * pixels.shape[0])
        return torch.stack(list(self.vqmodel.encode(pixels, sizes).image_tokens))  # B x [h, w]

    def _decode(self, codes):
        return self.vqmodel.decode(codes)


class Emu3Family(ExtendedFamily):
    name = "emu3"
    model_types = ("emu3",)
    vllm = False
    lora_module = "text_model"  # the VQ-VAE has q_proj/k_proj/v_proj too

    def decoder(self, model):
        return unwrap_model(model).model.text_model

    def to_lm_ids(self, completion_ids: torch.Tensor) -> torch.Tensor:
        """argrpo completion ids [B, T] -> Emu3's own token ids [B, T] (what ``decode_image_tokens`` reads)."""
        return self.lm_input_ids(torch.as_tensor(completion_ids))

    def image_decoder(self, model):
        return Emu3ImageDecoder(unwrap_model(model).model.vqmodel, self.layout)

    def rollout_model(self, model):
        """Drop the VQ-VAE's encoder: generation only decodes. Its names are recorded so full-weight pushes that
        still carry those tensors load without complaint."""
        unwrap_model(model).model.vqmodel.encoder = None
        unwrap_model(model)._argrpo_dropped = ("model.vqmodel.encoder.",)
        return model

    @classmethod
    def load(cls, path, meta, expected=None, device="cpu", dtype=None, trainable=False, layout_kwargs=None):
        from argrpo.models.policy import LoadedPolicy
        from transformers import Emu3ForConditionalGeneration

        path, tokenizer, model = load_shipped(cls, Emu3ForConditionalGeneration, path, meta, expected, dtype, trainable)
        opts = dict(layout_kwargs or {})
        saved = TokenLayout.from_dict(meta["layout"]) if meta else None
        grid = opts.pop("grid", None) or (saved.grid if saved is not None else None)
        image_size = opts.pop("image_size", None)
        uncond = opts.pop("uncond_caption", saved.uncond_caption if saved is not None else "")
        if opts:
            raise ValueError(f"Emu3 layout options: unknown {sorted(opts)}; valid: grid, image_size, uncond_caption")
        config = unwrap_model(model).config
        layout = emu3_layout(config, tokenizer, grid=None if image_size else grid, image_size=image_size,
                             uncond_caption=uncond)
        family = cls.resolve(layout, tokenizer, int(config.text_config.vocab_size))
        if isinstance(expected, TokenLayout):
            expected.check_compatible(family.layout, what=f"checkpoint {path}")
        model.to(device)
        if not trainable:
            model.eval()
        return LoadedPolicy(model=model, tokenizer=tokenizer, layout=family.layout, image_tokenizer_path=None,
                            path=path, family=family)


