"""TokenLayout: where the visual codebook lives inside an LM vocabulary, and how prompts are formatted.

An autoregressive text-to-image model is a causal LM whose vocabulary is

    [ text tokens (incl. added special tokens) | visual tokens: codebook_size ids | padding rows ]
    0 ..................................... visual_offset ........... visual_offset + codebook_size

and an image is exactly ``grid_h * grid_w`` visual tokens after the prompt (raster order).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from argrpo import config
from argrpo.registry import Registry

SIMPLEAR_SPECIAL_TOKENS = ("<|t2i|>", "<|i2t|>", "<|soi|>", "<|vtokens|>", "<|t2v|>", "<|v2t|>", "<|sov|>")
SHAPES_SPECIAL_TOKENS = ("<|pad|>", "<|t2i|>", "<|soi|>", "<|eoi|>")


@dataclass(frozen=True)
class TokenLayout:
    """How text and visual tokens share one vocabulary.

    Attributes:
        name: preset name or "custom".
        text_vocab_size: number of ids before the visual block (``len(text_tokenizer)``).
        visual_offset: LM id of visual code 0.
        codebook_size: number of visual codes.
        grid: (h, w) of the code grid; an image is ``h * w`` tokens.
        image_size: (H, W) in pixels of a decoded image.
        special_tokens: special tokens the text tokenizer must hold.
        prompt_template: format string with ``{caption}``; ends with the start-of-image token.
        uncond_caption: caption used for the unconditional branch of CFG and for caption dropout.
        eoi_token: optional end-of-image token (never sampled: images have a fixed length).
    """

    name: str
    text_vocab_size: int
    visual_offset: int
    codebook_size: int
    grid: tuple[int, int]
    image_size: tuple[int, int]
    special_tokens: tuple[str, ...] = ()
    prompt_template: str = "{caption}"
    uncond_caption: str = ""
    eoi_token: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.visual_offset < self.text_vocab_size:
            raise ValueError(
                f"TokenLayout {self.name!r}: visual_offset {self.visual_offset} lies inside the text vocabulary "
                f"(text_vocab_size {self.text_vocab_size})"
            )
        if self.codebook_size <= 0 or min(self.grid) <= 0:
            raise ValueError(f"TokenLayout {self.name!r}: codebook_size and grid must be positive")
        if "{caption}" not in self.prompt_template:
            raise ValueError(f"TokenLayout {self.name!r}: prompt_template must contain '{{caption}}'")
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
        object.__setattr__(self, "special_tokens", tuple(self.special_tokens))

    # ---- sizes -------------------------------------------------------------------------------------------------
    @property
    def n_image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def visual_end(self) -> int:
        """One past the last visual id."""
        return self.visual_offset + self.codebook_size

    @property
    def min_vocab_size(self) -> int:
        return self.visual_end

    @property
    def visual_slice(self) -> slice:
        return slice(self.visual_offset, self.visual_end)

    # ---- prompts -----------------------------------------------------------------------------------------------
    def format_prompt(self, caption: str) -> str:
        return self.prompt_template.format(caption=caption)

    @property
    def uncond_prompt(self) -> str:
        return self.format_prompt(self.uncond_caption)

    # ---- conversions -------------------------------------------------------------------------------------------
    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int [..., h, w] or [..., N] -> LM ids [..., N] (flattened raster order)."""
        codes = torch.as_tensor(codes)
        if codes.dim() >= 2 and tuple(codes.shape[-2:]) == self.grid:
            codes = codes.flatten(-2)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes out of range [0, {self.codebook_size})")
        return codes.long() + self.visual_offset

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """LM ids [..., N] with N == h*w -> codes [..., h, w]."""
        ids = torch.as_tensor(ids).long()
        if ids.shape[-1] != self.n_image_tokens:
            raise ValueError(f"expected {self.n_image_tokens} image tokens, got {ids.shape[-1]}")
        if not bool(self.is_visual(ids).all()):
            raise ValueError("ids contain non-visual tokens")
        return (ids - self.visual_offset).reshape(*ids.shape[:-1], *self.grid)

    def is_visual(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids)
        return (ids >= self.visual_offset) & (ids < self.visual_end)

    def visual_mask(self, vocab_size: int, device=None) -> torch.Tensor:
        """bool [vocab_size], True on visual ids."""
        if vocab_size < self.visual_end:
            raise ValueError(f"vocab_size {vocab_size} < visual_end {self.visual_end}")
        mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        mask[self.visual_slice] = True
        return mask

    # ---- persistence -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return config.to_dict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "TokenLayout") -> TokenLayout:
        """The inverse of :meth:`to_dict`; an unknown key or a value of the wrong type is a ``ConfigError``."""
        return config.from_dict(cls, d, source=source)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> TokenLayout:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def check_compatible(self, other: TokenLayout, what: str = "checkpoint") -> None:
        """Raise if ``other`` places or sizes the visual vocabulary differently."""
        for key in ("visual_offset", "codebook_size", "grid"):
            a, b = getattr(self, key), getattr(other, key)
            if a != b:
                raise ValueError(f"{what} layout mismatch on {key!r}: expected {a}, found {b}")

    def check_image_tokenizer(self, image_tokenizer, what: str = "image tokenizer") -> None:
        """Raise if an image tokenizer's ``codebook_size`` or ``grid`` differs from this layout's (its decoder
        would then refuse, or silently scramble, the codes the policy samples)."""
        for key in ("codebook_size", "grid"):
            have, want = getattr(image_tokenizer, key), getattr(self, key)
            have = tuple(int(g) for g in have) if key == "grid" else int(have)
            if have != want:
                raise ValueError(f"{what}: {key} {have} does not match the layout's {want}")


# ---- presets ---------------------------------------------------------------------------------------------------
LAYOUT_PRESETS: Registry[Callable[..., TokenLayout]] = Registry("layout preset")
register_preset = LAYOUT_PRESETS.register


def layout_preset(name: str, **kwargs) -> TokenLayout:
    """The layout of preset ``name`` built with ``kwargs``; an unknown name raises ``KeyError`` listing the known."""
    return LAYOUT_PRESETS.lookup(name)(**kwargs)


def layout_presets() -> list[str]:
    return LAYOUT_PRESETS.names()


def _visual_after_text(name: str, text_vocab_size: int, codebook_size: int, grid, image_size, **template) -> TokenLayout:
    """What every preset shares: visual ids start right after the text vocabulary; the unconditional caption is
    empty. ``template``: the preset's ``special_tokens``, ``prompt_template`` and optional ``eoi_token``."""
    return TokenLayout(name=name, text_vocab_size=text_vocab_size, visual_offset=text_vocab_size,
                       codebook_size=codebook_size, grid=tuple(grid), image_size=tuple(image_size), uncond_caption="",
                       **template)


@register_preset("simplear")
def simplear_layout(text_vocab_size: int, codebook_size: int = 64000, grid=(64, 64), image_size=(1024, 1024)):
    """SimpleAR: Qwen2.5 tokenizer + 7 special tokens; visual id = code + len(tokenizer); no end-of-image token.

    ``text_vocab_size`` is ``len(tokenizer)`` including the 7 added special tokens.
    """
    return _visual_after_text("simplear", text_vocab_size, codebook_size, grid, image_size,
                              special_tokens=SIMPLEAR_SPECIAL_TOKENS, prompt_template="<|t2i|>{caption}<|soi|>")


@register_preset("shapes")
def shapes_layout(text_vocab_size: int, codebook_size: int, grid=(8, 8), image_size=(64, 64)):
    """The embedded shapes world: a word-level tokenizer, 64x64 images as an 8x8 grid of codes."""
    return _visual_after_text("shapes", text_vocab_size, codebook_size, grid, image_size,
                              special_tokens=SHAPES_SPECIAL_TOKENS, prompt_template="<|t2i|> {caption} <|soi|>",
                              eoi_token="<|eoi|>")
