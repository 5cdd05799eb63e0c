"""Any Hugging Face causal LM whose own vocabulary holds the visual codebook: the ``extended`` family.

Liquid (a Gemma whose vocabulary grows by 8,192 VQ codes), Lumina-mGPT, Anole and most research checkpoints are
plain causal LMs: visual code ``k`` is LM id ``lm_ids[k]`` (a contiguous range, or any mapping: a token-name
pattern such as Emu3's ``<|visual token {code:06d}|>``), and an image may carry forced tokens (an end-of-row token
after every row, end-of-image tokens after the last row) that the engine places without sampling.

Coordinates. argrpo's ids stay in one system (``models.families.base``): text ids, then ``codebook_size`` visual ids
from ``layout.visual_offset``. When the codes are a contiguous range past the tokenizer, those ARE the LM ids
(``direct``: nothing is mapped). Otherwise (codes interleaved with text ids, or tokens the tokenizer itself holds)
``visual_offset`` is placed past the LM vocabulary and :meth:`decoder_inputs` maps ``visual_offset + k`` to
``lm_ids[k]``; :meth:`visual_logits` multiplies only the LM head rows ``lm_ids`` (a view when contiguous).

Forced tokens get no log-prob, no KL and no loss: the sampler reports 0 for them, the learner's visual head scores
them as 0 (no gradient can reach a forced token's logit) and TRL's loss mask (``env_mask``) excludes them.

The family's settings live in ``layout.extra["extended"]`` (argrpo.json), see :class:`ExtendedSpec`; a checkpoint is
an HF causal-LM directory plus argrpo.json, loaded with ``AutoModelForCausalLM``. The image tokenizer is the
directory argrpo.json records (the built-in VQ or Cosmos) or ``spec.image_decoder``: a user's decoder by import path
(``package.module:factory``, called with the layout) or a TorchScript file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from argrpo.models.families.base import (
    ModelFamily,
    adapter_base,
    load_hf_weights,
    unit_to_uint8,
    unwrap_model,
)
from argrpo.models.layout import TokenLayout

SPEC_KEY = "extended"
RESOLVED_KEY = "resolved"  # the spec's token ids, resolved through the tokenizer


@dataclass
class ExtendedSpec:
    """How a vocabulary-extended causal LM lays out an image (stored as ``layout.extra["extended"]``).

    Attributes:
        visual_start: LM id of code 0 when the codes are the contiguous ids ``[visual_start, visual_start + C)``.
        visual_token_format: instead, a token name per code resolved through the tokenizer, e.g.
            ``"<|visual token {code:06d}|>"`` (any mapping, contiguous or not).
        row_end: token forced after every row of ``grid_w`` codes (None: none).
        image_end: tokens forced after the last row, in order (Emu3: end-of-frame, end-of-image, EOS).
        bos: prepend the tokenizer's BOS token to every prompt.
        image_decoder: a decoder by import path: ``package.module:factory`` (called with the layout), a Hugging
            Face module class (``transformers:Emu3VQVAE``, loaded from ``image_decoder_weights`` with
            ``from_pretrained`` and called as ``decode(codes [B, h, w]) -> float [B, 3, H, W]`` in [-1, 1]), or a
            TorchScript file (``codes -> float [B, 3, H, W]`` in [-1, 1]); None: the image tokenizer directory
            recorded in argrpo.json.
        image_decoder_weights: the Hugging Face module's directory.
    """

    visual_start: int | None = field(default=None, metadata={"help": "LM id of code 0 (contiguous codes)."})
    visual_token_format: str | None = field(default=None, metadata={
        "help": "Token name of code k, formatted with code=k (mapped codes), e.g. '<|visual token {code:06d}|>'."})
    row_end: str | None = field(default=None, metadata={"help": "Token forced after each row of codes."})
    image_end: tuple[str, ...] = field(default=(), metadata={"help": "Tokens forced after the last row."})
    bos: bool = field(default=False, metadata={"help": "Prepend the tokenizer's BOS token to prompts."})
    image_decoder: str | None = field(default=None, metadata={
        "help": "Decoder by import path 'package.module:factory', an HF module class 'package:Class' (with "
                "image_decoder_weights) or a TorchScript file; None: the checkpoint's image tokenizer directory."})
    image_decoder_weights: str | None = field(default=None, metadata={
        "help": "Directory of an HF module image_decoder (from_pretrained)."})

    def __post_init__(self):
        self.image_end = tuple(self.image_end)
        if (self.visual_start is None) == (self.visual_token_format is None):
            raise ValueError("extended family: give exactly one of visual_start (contiguous codes) or "
                             "visual_token_format (mapped codes)")
        if self.visual_token_format is not None and "{code" not in self.visual_token_format:
            raise ValueError(f"extended family: visual_token_format {self.visual_token_format!r} has no {{code}}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_end"] = list(self.image_end)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ExtendedSpec:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"extended family: unknown keys {sorted(unknown)}; valid keys: {sorted(known)}")
        return cls(**d)


def _token_id(tokenizer, token: str, what: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"{what}: the tokenizer has no token {token!r}")
    return int(tid)


def forced_positions(grid: tuple[int, int], row_end: int | None, image_end: list[int]) -> dict[int, int]:
    """{completion position: LM id} of an image laid out as rows of ``w`` codes, each followed by ``row_end`` (when
    given), then ``image_end``."""
    h, w = grid
    out: dict[int, int] = {}
    stride = w + (row_end is not None)
    if row_end is not None:
        out.update({r * stride + w: int(row_end) for r in range(h)})
    out.update({h * stride + i: int(t) for i, t in enumerate(image_end)})
    return out


class ExtendedFamily(ModelFamily):
    """A causal LM whose own vocabulary holds the codes (see the module docstring).

    Built from a layout whose ``extra["extended"]`` holds an :class:`ExtendedSpec`, plus ``lm_ids`` (int64 [C]: the
    LM id of each code) and the forced token ids, resolved once from the tokenizer by :meth:`resolve`.
    """

    name = "extended"
    model_types = ()  # only through argrpo.json's family or a config naming it
    vllm = False

    def __init__(self, layout: TokenLayout):
        super().__init__(layout)
        self.spec = ExtendedSpec.from_dict(layout.extra[SPEC_KEY])
        ids = layout.extra.get(RESOLVED_KEY)
        if ids is None:
            raise ValueError(f"layout {layout.name!r}: the extended family needs its token ids resolved "
                             f"(ExtendedFamily.resolve(layout, tokenizer))")
        C = layout.codebook_size
        if ids.get("lm_ids") is not None:
            self.lm_ids = torch.as_tensor(ids["lm_ids"], dtype=torch.long)
        else:
            self.lm_ids = torch.arange(C) + int(ids["visual_start"])
        if self.lm_ids.numel() != C:
            raise ValueError(f"extended family: {self.lm_ids.numel()} LM ids for {C} codes")
        start = int(self.lm_ids[0])
        self.contiguous = bool(torch.equal(self.lm_ids, torch.arange(C) + start))
        self.lm_rows = slice(start, start + C) if self.contiguous else self.lm_ids
        # direct: argrpo's visual ids are the LM's own ids
        self.direct = self.contiguous and start == layout.visual_offset
        self._forced = forced_positions(layout.grid, ids.get("row_end"), ids.get("image_end", []))
        self.bos_id = ids.get("bos")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.layout.name!r}, grid={self.layout.grid}, forced={len(self._forced)})"

    # ---- building ----------------------------------------------------------------------------------------------
    @classmethod
    def resolve(cls, layout: TokenLayout, tokenizer, vocab_size: int | None = None) -> ExtendedFamily:
        """The family of ``layout`` with its LM ids and forced tokens resolved through ``tokenizer`` (stored in
        ``layout.extra["resolved"]``, so ``ExtendedFamily(layout)`` rebuilds it from argrpo.json alone)."""
        spec = ExtendedSpec.from_dict(layout.extra[SPEC_KEY])
        what = f"layout {layout.name!r}"
        ids: dict = {"visual_start": spec.visual_start, "lm_ids": None}
        if spec.visual_token_format is not None:
            lm = [_token_id(tokenizer, spec.visual_token_format.format(code=k), what)
                  for k in range(layout.codebook_size)]
            if lm == list(range(lm[0], lm[0] + len(lm))):
                ids["visual_start"] = lm[0]
            else:
                ids["lm_ids"] = lm
        top = max(ids["lm_ids"] or [ids["visual_start"] + layout.codebook_size - 1])
        if vocab_size is not None and top >= vocab_size:
            raise ValueError(f"{what}: visual LM id {top} is past the model's vocabulary {vocab_size}")
        ids["row_end"] = _token_id(tokenizer, spec.row_end, what) if spec.row_end else None
        ids["image_end"] = [_token_id(tokenizer, t, what) for t in spec.image_end]
        ids["bos"] = None
        if spec.bos:
            if tokenizer.bos_token_id is None:
                raise ValueError(f"{what}: bos is on but the tokenizer has no BOS token")
            ids["bos"] = int(tokenizer.bos_token_id)
        return cls(replace(layout, extra={**layout.extra, RESOLVED_KEY: ids}))

    @classmethod
    def make_layout(cls, name: str, tokenizer, vocab_size: int, spec: ExtendedSpec, codebook_size: int, grid,
                    image_size, prompt_template: str = "{caption}", uncond_caption: str = "") -> TokenLayout:
        """A TokenLayout for ``spec`` (ids not yet resolved): direct ids when the codes are a contiguous range past
        the tokenizer, otherwise ids past the LM vocabulary that :meth:`decoder_inputs` maps."""
        n_text = len(tokenizer)
        direct = spec.visual_start is not None and spec.visual_start >= n_text
        offset = int(spec.visual_start) if direct else max(int(vocab_size), n_text)
        return TokenLayout(name=name, text_vocab_size=n_text, visual_offset=offset, codebook_size=int(codebook_size),
                           grid=tuple(grid), image_size=tuple(image_size), prompt_template=prompt_template,
                           uncond_caption=uncond_caption, extra={"family": cls.name, SPEC_KEY: spec.to_dict()})

    # ---- the network -------------------------------------------------------------------------------------------
    def decoder(self, model):
        hf = unwrap_model(model)
        return hf.get_decoder() if hasattr(hf, "get_decoder") else hf.model

    def lm_input_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """argrpo ids [...] -> the LM's own ids [...] (visual ids mapped through ``lm_ids``)."""
        if self.direct:
            return ids
        off = self.layout.visual_offset
        lm = self.lm_ids.to(ids.device)
        return torch.where(ids >= off, lm[(ids - off).clamp(0, lm.numel() - 1)], ids)

    def decoder_inputs(self, model, ids):
        return {"input_ids": self.lm_input_ids(ids)}

    def visual_head_rows(self, model):
        """(weight [C, H], bias [C] or None): the LM head's rows of the codes (a view when they are contiguous)."""
        head = unwrap_model(model).get_output_embeddings()
        rows = self.lm_rows
        if not self.contiguous:
            rows = rows.to(head.weight.device)
        bias = getattr(head, "bias", None)
        return head.weight[rows], (bias[rows] if bias is not None else None)

    def visual_logits(self, model, hidden):
        weight, bias = self.visual_head_rows(model)
        return F.linear(hidden, weight, bias)

    def check_scoring(self, model):
        from argrpo.models.families.simplear import SharedVocabFamily

        SharedVocabFamily.check_scoring(self, model)  # the same plain-linear-head requirement

    def check_vocab(self, model, what: str) -> None:
        rows = unwrap_model(model).get_output_embeddings().weight.shape[0]
        top = max([int(self.lm_ids.max()), *self._forced.values()])
        if top >= rows:
            raise ValueError(f"{what}: LM id {top} of the image layout is past the model's {rows} vocabulary rows")

    # ---- prompts -----------------------------------------------------------------------------------------------
    def encode_prompts(self, tokenizer, captions):
        ids = super().encode_prompts(tokenizer, captions)
        return [[self.bos_id, *p] for p in ids] if self.bos_id is not None else ids

    def uncond_prompt_ids(self, tokenizer, prompt_ids):
        return self.encode_prompts(tokenizer, [self.layout.uncond_caption])[0]

    @property
    def forced_tokens(self) -> dict[int, int]:
        return self._forced

    # ---- pixels ------------------------------------------------------------------------------------------------
    def image_decoder(self, model):
        if not self.spec.image_decoder:
            return None
        return load_user_decoder(self.spec.image_decoder, self.layout, self.spec.image_decoder_weights)

    # ---- checkpoints -------------------------------------------------------------------------------------------
    @classmethod
    def layout_from_options(cls, tokenizer, vocab_size: int, options: dict) -> TokenLayout:
        """A layout from ``policy.layout_options`` (a checkpoint without argrpo.json): the :class:`ExtendedSpec`
        keys plus ``codebook_size``, ``grid``, ``image_size``, ``prompt_template``, ``uncond_caption`` and ``name``."""
        opts = dict(options)
        spec_keys = set(ExtendedSpec.__dataclass_fields__)
        spec = ExtendedSpec.from_dict({k: opts.pop(k) for k in list(opts) if k in spec_keys})
        missing = [k for k in ("codebook_size", "grid", "image_size") if k not in opts]
        if missing:
            raise ValueError(f"extended family: policy.layout_options needs {missing}")
        known = {"codebook_size", "grid", "image_size", "prompt_template", "uncond_caption", "name"}
        unknown = set(opts) - known
        if unknown:
            raise ValueError(f"extended family: unknown layout options {sorted(unknown)}; valid: "
                             f"{sorted(known | spec_keys)}")
        return cls.make_layout(opts.pop("name", cls.name), tokenizer, vocab_size, spec, **opts)

    @classmethod
    def load(cls, path, meta, expected=None, device="cpu", dtype=None, trainable=False, layout_kwargs=None):
        """A causal-LM directory (full or LoRA) with argrpo.json, or as shipped with ``layout_kwargs`` (the run
        config's ``policy.layout_options``; ``image_tokenizer``: the image tokenizer directory)."""
        from argrpo.models.policy import LoadedPolicy
        from argrpo.models.text_tokenizer import load_text_tokenizer
        from transformers import AutoConfig, AutoModelForCausalLM

        path = Path(path).absolute()
        opts = dict(layout_kwargs or {})
        image_tokenizer = opts.pop("image_tokenizer", None)
        is_adapter, base_path = adapter_base(path, meta)
        tokenizer = load_text_tokenizer(path)
        config = AutoConfig.from_pretrained(str(base_path), local_files_only=True)
        vocab = int(config.get_text_config().vocab_size)
        if meta is not None:
            layout = TokenLayout.from_dict(meta["layout"])
            if SPEC_KEY not in layout.extra:
                raise ValueError(f"{path}: argrpo.json's layout has no extra.{SPEC_KEY} (not an extended checkpoint)")
            ref = meta.get("image_tokenizer")
            if ref and not image_tokenizer:
                image_tokenizer = ref if Path(ref).is_absolute() else str(path / ref)
        elif opts:
            layout = cls.layout_from_options(tokenizer, vocab, opts)
        else:
            raise ValueError(f"{path}: no argrpo.json; the extended family needs policy.layout_options (visual ids, "
                             f"grid, template, ...)")
        family = cls.resolve(layout, tokenizer, vocab)
        if isinstance(expected, TokenLayout):
            expected.check_compatible(family.layout, what=f"checkpoint {path}")
        model = load_hf_weights(AutoModelForCausalLM, path, base_path, is_adapter, dtype, trainable)
        family.check_vocab(model, f"checkpoint {path}")
        model.to(device)
        if not trainable:
            model.eval()
        if image_tokenizer and not Path(image_tokenizer).is_dir():
            raise FileNotFoundError(f"{path}: image tokenizer {image_tokenizer} not found")
        return LoadedPolicy(model=model, tokenizer=tokenizer, layout=family.layout,
                            image_tokenizer_path=Path(image_tokenizer).absolute() if image_tokenizer else None,
                            path=path, family=family)


class ModuleDecoder:
    """A Hugging Face module with ``decode(codes [B, h, w]) -> float [B, 3, H, W]`` in [-1, 1] (a VQ-VAE) as an
    image decoder: codes -> uint8 [B, H, W, 3]."""

    def __init__(self, module, layout: TokenLayout, path=None):
        self.module = module.eval()
        self.codebook_size, self.grid, self.path = layout.codebook_size, layout.grid, path

    @torch.no_grad()
    def decode(self, codes) -> torch.Tensor:
        dev = next(self.module.parameters()).device
        return unit_to_uint8(self.module.decode(torch.as_tensor(codes).long().to(dev)))


class TorchScriptDecoder:
    """A TorchScript decoder file as an image decoder: codes int [B, h, w] -> uint8 [B, H, W, 3] (the module
    returns float [B, 3, H, W] in [-1, 1])."""

    def __init__(self, path: str | Path, layout: TokenLayout):
        self.path = Path(path)
        from argrpo.models.image_tokenizers.cosmos import load_torchscript

        self.module = load_torchscript(self.path)
        self.codebook_size, self.grid = layout.codebook_size, layout.grid

    @torch.no_grad()
    def decode(self, codes) -> torch.Tensor:
        return unit_to_uint8(self.module(torch.as_tensor(codes).long()))


def load_user_decoder(ref: str, layout: TokenLayout, weights: str | None = None):
    """``package.module:factory`` (called with the layout), an HF module class (loaded from ``weights``) or a
    TorchScript file -> an image decoder."""
    from argrpo.registry import import_object

    if ":" in ref and not Path(ref).exists():
        obj = import_object(ref, what="image decoder")
        from transformers import PreTrainedModel

        if isinstance(obj, type) and issubclass(obj, PreTrainedModel):
            if not weights:
                raise ValueError(f"image decoder {ref!r} is a Hugging Face module: name its directory in "
                                 f"image_decoder_weights")
            return ModuleDecoder(obj.from_pretrained(str(weights), local_files_only=True), layout, weights)
        return obj(layout)
    if not Path(ref).is_file():
        raise FileNotFoundError(f"image decoder {ref!r}: neither an import path 'package.module:factory' nor a file")
    return TorchScriptDecoder(ref, layout)
