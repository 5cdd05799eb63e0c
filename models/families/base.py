"""The model-family interface: the few places where released autoregressive text-to-image models differ.

Every consumer (rollout engines, the learner's log-probs, the pretrain/SFT loss, eval, sample, weight sync) holds a
``ModelFamily`` and calls it; none asks which family it has. Token ids stay in one coordinate system for all
families, the family's ``TokenLayout``: text ids first, then ``codebook_size`` visual ids from ``visual_offset``.
For a shared-vocabulary model (SimpleAR) those are rows of its own vocabulary; for a model with a separate image
vocabulary (Janus-Pro) they are ids past the text vocabulary that only the family's :meth:`decoder_inputs` maps.

What a family answers:
    decoder(model) / decoder_inputs(model, ids)     the transformer stack, and what it is fed for mixed ids
    visual_logits(model, hidden)                    [..., H] -> [..., C] logits over the codebook
    encode_prompts / uncond_prompt_ids              the prompt template and CFG's unconditional prompt
    forced_tokens                                   {completion position: LM id} never sampled (Emu3 row ends)
    image_decoder(model)                            codes -> pixels when the checkpoint holds its own decoder
    load / save                                     the family's own Hugging Face format
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from argrpo.models.layout import TokenLayout
from argrpo.models.unwrap import unwrap_model


def uint8_to_unit(images, device=None, dtype=torch.float32) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1] (the VQ-VAEs' input: mean = std = 0.5)."""
    x = torch.as_tensor(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x.to(dtype)


def unit_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] on the CPU (x * 0.5 + 0.5, scaled to 0..255)."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


class CheckpointVQTokenizer(ABC):
    """A VQ-VAE held by the checkpoint itself (Janus-Pro's, Emu3's) as an image tokenizer: ``encode`` uint8
    [B, H, W, 3] -> codes int64 [B, h, w] (for caching an SFT set's codes), ``decode`` the reverse;
    ``save_pretrained`` writes the VQ-VAE (the token cache fingerprints it). A family says how its VQ-VAE is called
    on pixels and codes in [-1, 1] (:meth:`_encode`, :meth:`_decode`)."""

    def __init__(self, vqmodel, layout: TokenLayout):
        self.vqmodel = vqmodel
        self.codebook_size = layout.codebook_size
        self.grid = layout.grid
        self.image_size = layout.image_size
        self.path = None

    @abstractmethod
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """float [B, 3, H, W] in [-1, 1] -> the B images' codes in raster order, any shape (:meth:`encode` lays them
        out [B, h, w])."""

    @abstractmethod
    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int64 [B, h, w] -> float [B, 3, H, W] in [-1, 1]."""

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        p = next(self.vqmodel.parameters())
        pixels = uint8_to_unit(images, p.device, p.dtype)
        return self._encode(pixels).long().reshape(pixels.shape[0], *self.grid).cpu()

    @torch.no_grad()
    def decode(self, codes) -> torch.Tensor:
        dev = next(self.vqmodel.parameters()).device
        return unit_to_uint8(self._decode(torch.as_tensor(codes).long().to(dev)))

    def save_pretrained(self, path) -> None:
        self.vqmodel.save_pretrained(str(path))


class ModelFamily(ABC):
    """One family's answers (see the module docstring). Instances are cheap and carry the checkpoint's layout.

    Class attributes:
        name: family name (argrpo.json ``family``, config ``policy.family``).
        model_types: config.json ``model_type`` values this family loads as shipped (none: only via argrpo.json).
        vllm: whether the vLLM engine can generate this family.
        lora_module: the submodule LoRA is limited to (the language model of a model that also holds a vision
            tower or VQ-VAE with layers of the same names); None: every matching layer.
    """

    name: str = ""
    model_types: tuple[str, ...] = ()
    vllm: bool = False
    lora_module: str | None = None

    def __init__(self, layout: TokenLayout):
        self.layout = layout

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.layout.name!r}, grid={self.layout.grid})"

    # ---- the network ---------------------------------------------------------------------------------------------
    @abstractmethod
    def decoder(self, model) -> torch.nn.Module:
        """The transformer stack of ``model`` (any wrapper): called with ``decoder_inputs`` plus attention_mask,
        position_ids, past_key_values, use_cache; returns ``last_hidden_state`` [B, T, H]. Its ``config`` is the
        text config (KV cache shape, attention implementation)."""

    @abstractmethod
    def decoder_inputs(self, model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """ids int64 [B, T] (text and visual LM ids mixed) -> ``{"input_ids": ...}`` or ``{"inputs_embeds": ...}``."""

    @abstractmethod
    def visual_logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [..., C] over the codebook (never over the full vocabulary)."""

    def text_logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [..., text_vocab_size] over the text ids (the SFT text loss)."""
        head = unwrap_model(model).get_output_embeddings()
        n = self.layout.text_vocab_size
        logits = hidden @ head.weight[:n].T
        return logits + head.bias[:n] if getattr(head, "bias", None) is not None else logits

    def check_scoring(self, model) -> None:
        """Raise when the learner's visual log-probs cannot be computed for ``model`` (e.g. unsupported logit
        transforms); the default accepts any model."""
        return None

    # ---- prompts -------------------------------------------------------------------------------------------------
    def encode_prompts(self, tokenizer, captions: list[str]) -> list[list[int]]:
        """Captions -> prompt token ids ending right before the first image token."""
        texts = [self.layout.format_prompt(c) for c in captions]
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    @abstractmethod
    def uncond_prompt_ids(self, tokenizer, prompt_ids: list[int]) -> list[int]:
        """CFG's unconditional prompt for one conditional prompt."""

    @property
    def forced_tokens(self) -> dict[int, int]:
        """{completion position: LM id} placed by the engine without sampling (no log-prob, no loss); empty for
        families whose images are ``grid_h * grid_w`` sampled codes."""
        return {}

    @property
    def completion_length(self) -> int:
        """Tokens of one image's completion: the ``grid_h * grid_w`` sampled codes plus the forced tokens."""
        return self.layout.n_image_tokens + len(self.forced_tokens)

    def sampled_mask(self) -> torch.Tensor:
        """bool [completion_length]: True where the completion holds a sampled code, False at forced tokens."""
        mask = torch.ones(self.completion_length, dtype=torch.bool)
        mask[list(self.forced_tokens)] = False
        return mask

    def completion_codes(self, completion_ids: torch.Tensor) -> torch.Tensor:
        """Completion ids [..., completion_length] -> codes [..., h, w] (forced tokens dropped)."""
        ids = torch.as_tensor(completion_ids)
        if self.forced_tokens:
            if ids.shape[-1] != self.completion_length:
                raise ValueError(f"expected {self.completion_length} completion tokens, got {ids.shape[-1]}")
            ids = ids[..., self.sampled_mask()]
        return self.layout.ids_to_codes(ids)

    # ---- pixels --------------------------------------------------------------------------------------------------
    def image_decoder(self, model) -> Any | None:
        """An ImageTokenizer-like decoder (``decode(codes [B, h, w]) -> uint8 [B, H, W, 3]``, ``codebook_size``,
        ``grid``) held by the checkpoint itself, or None when the image tokenizer is a separate directory."""
        return None

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def load(cls, path, meta: dict | None, expected=None, device="cpu", dtype=None, trainable: bool = False,
             layout_kwargs: dict | None = None):
        """Read a checkpoint directory of this family -> ``models.policy.LoadedPolicy``."""

    def save(self, path, model, tokenizer, **kwargs):
        """Write ``model`` in this family's own Hugging Face format plus argrpo.json (atomically)."""
        from argrpo.models.policy import save_policy

        return save_policy(path, model, tokenizer, self.layout, **kwargs)  # records the family it detects

    def lora_targets(self, names: list[str]):
        """peft ``target_modules`` for these layer names: the names, or a regex that keeps them inside
        ``lora_module``."""
        if self.lora_module is None:
            return names
        return rf".*{self.lora_module}\..*\.({'|'.join(names)})"

    def rollout_model(self, model):
        """Drop what a rollout worker never runs (in place; returns the model). Default: nothing."""
        return model


def adapter_base(path: Path, meta: dict | None) -> tuple[bool, Path]:
    """(is this a LoRA adapter directory, the directory of the full model its weights load from).

    The base comes from argrpo.json's ``base_model`` or peft's ``base_model_name_or_path``, relative to ``path``
    unless absolute; a base that is not a model directory is a ``FileNotFoundError`` naming both.
    """
    if not (path / "adapter_config.json").is_file():
        return False, path
    ref = (meta or {}).get("base_model") or json.loads((path / "adapter_config.json").read_text()).get(
        "base_model_name_or_path")
    base = Path(ref) if ref and Path(ref).is_absolute() else (path / (ref or "")).resolve()
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{path}: base model {base} of this LoRA checkpoint not found")
    return True, base


def load_hf_weights(model_cls, path: Path, base: Path, is_adapter: bool, dtype=None, trainable: bool = False):
    """``model_cls.from_pretrained(base)``, then the adapter at ``path`` when ``is_adapter`` (only its LoRA tensors
    trainable, and only when ``trainable``). Local files only: nothing is downloaded."""
    from argrpo.models.policy import _naming, _resolve_dtype

    kwargs = {"dtype": _resolve_dtype(dtype)} if dtype is not None else {}
    with _naming(base):
        model = model_cls.from_pretrained(str(base), local_files_only=True, **kwargs)
    if is_adapter:
        from peft import PeftModel

        with _naming(path):
            model = PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
        for name, p in model.named_parameters():
            p.requires_grad_(trainable and "lora_" in name)
    return model


def load_shipped(family: type[ModelFamily], model_cls, path, meta, expected, dtype, trainable):
    """The start of loading a family's own Hugging Face directory (full or LoRA): refuse a config that names another
    family, then the tokenizer and the weights -> (absolute path, tokenizer, model)."""
    from transformers import AutoTokenizer

    path = Path(path).absolute()
    if isinstance(expected, str) and expected != family.name:
        raise ValueError(f"checkpoint {path} is a {family.name!r} model; the config expects {expected!r}")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    is_adapter, base = adapter_base(path, meta)
    return path, tokenizer, load_hf_weights(model_cls, path, base, is_adapter, dtype, trainable)
