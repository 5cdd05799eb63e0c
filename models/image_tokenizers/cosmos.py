"""Cosmos discrete video tokenizer (DV8x16x16, SimpleAR's image tokenizer) through its TorchScript files.

A Cosmos tokenizer directory holds ``encoder.jit`` and ``decoder.jit``. The call convention, as the Cosmos
tokenizer library and SimpleAR use them:

    encoder.jit(video float [B, 3, T, H, W] in [-1, 1]) -> (indices int [B, t, h, w], codes [B, 6, t, h, w], ...)
    decoder.jit(indices int [B, t, h, w])                -> video float [B, 3, T, H, W] in [-1, 1]

An image is a 1-frame video (T = t = 1); the spatial compression is 16, so 1024 px -> a 64x64 code grid.
Indices live in an FSQ codebook with levels (8, 8, 8, 5, 5, 5): index = sum_i digit_i * prod(levels[:i]) with
digit_i in [0, levels[i]), so 8*8*8*5*5*5 = 64,000 codes; the normalised code of a digit is
(digit - levels // 2) / (levels // 2).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from argrpo.models.checkpoint import link_or_copy
from argrpo.models.image_tokenizers.base import register_image_tokenizer

CONFIG_NAME = "image_tokenizer.json"
ENCODER_FILE = "encoder.jit"
DECODER_FILE = "decoder.jit"
COSMOS_FSQ_LEVELS = (8, 8, 8, 5, 5, 5)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- FSQ index <-> code (mixed radix) ------------------------------------------------------------------------
def fsq_basis(levels: Sequence[int]) -> torch.Tensor:
    """int64 [D]: the place value of each digit (the first level is the least significant)."""
    return torch.tensor([math.prod(levels[:i]) for i in range(len(levels))], dtype=torch.long)


def indices_to_digits(indices: torch.Tensor, levels: Sequence[int]) -> torch.Tensor:
    """int [...] -> int64 digits [..., D], digit i in [0, levels[i])."""
    lv = torch.tensor(levels, dtype=torch.long, device=indices.device)
    return (indices.long().unsqueeze(-1) // fsq_basis(levels).to(indices.device)) % lv


def digits_to_indices(digits: torch.Tensor, levels: Sequence[int]) -> torch.Tensor:
    """int digits [..., D] -> int64 [...]."""
    return (digits.long() * fsq_basis(levels).to(digits.device)).sum(-1)


def indices_to_codes(indices: torch.Tensor, levels: Sequence[int] = COSMOS_FSQ_LEVELS) -> torch.Tensor:
    """FSQ indices int [...] -> normalised codes float32 [..., D] in [-1, 1] (channels last; Cosmos puts them at
    dim 1 of its ``codes`` output)."""
    half = torch.tensor([lv // 2 for lv in levels], dtype=torch.float32, device=indices.device)
    return (indices_to_digits(indices, levels).float() - half) / half


def codes_to_indices(codes: torch.Tensor, levels: Sequence[int] = COSMOS_FSQ_LEVELS) -> torch.Tensor:
    """Normalised codes float [..., D] -> FSQ indices int64 [...]; codes are rounded to the nearest level."""
    half = torch.tensor([lv // 2 for lv in levels], dtype=torch.float32, device=codes.device)
    lv = torch.tensor(levels, dtype=torch.long, device=codes.device)
    digits = torch.round(codes.float() * half + half).long()
    digits = torch.minimum(digits.clamp_min(0), lv - 1)
    return digits_to_indices(digits, levels)


# ---- image <-> tensor conventions -------------------------------------------------------------------------------
def images_to_video(images, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """uint8 [B, H, W, 3] (numpy or torch) -> float [B, 3, 1, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else torch.as_tensor(images)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected images [B, H, W, 3], got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {x.dtype}")
    x = x.to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x.unsqueeze(2).to(dtype)


def video_to_images(video: torch.Tensor) -> torch.Tensor:
    """float [B, 3, 1, H, W] (or [B, 3, H, W]) in [-1, 1] -> uint8 [B, H, W, 3] on CPU (first frame)."""
    if video.dim() == 5:
        video = video[:, :, 0]
    if video.dim() != 4 or video.shape[1] != 3:
        raise ValueError(f"decoder output must be [B, 3, T, H, W] or [B, 3, H, W], got {tuple(video.shape)}")
    x = ((video.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu()


def load_torchscript(path: str | Path, device="cpu") -> torch.nn.Module:
    """A TorchScript module file, in eval mode. TorchScript is a restricted language (no Python objects are
    unpickled), but it is still code from that file: the one place argrpo loads such files."""
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream, but it is the format Cosmos ships its tokenizers in
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location=device)
    return module.eval()


@register_image_tokenizer("cosmos")
class CosmosTokenizer:
    """ImageTokenizer over Cosmos TorchScript files (loaded lazily: generation only ever needs the decoder).

    Args:
        path: directory with ``encoder.jit`` and/or ``decoder.jit``.
        image_size: (H, W) of the images this tokenizer makes; ``grid`` = image_size // spatial_compression.
        levels: FSQ levels; ``codebook_size`` is their product.
        spatial_compression: pixels per code along each side (16 for DV8x16x16).
        device / dtype: where and in which precision the TorchScript modules run (bfloat16 on GPU, as Cosmos
            ships; float32 on CPU).
        batch_size: images per encoder/decoder call (1024 px decodes are memory-heavy).
    """

    def __init__(
        self,
        path: str | Path,
        image_size: Sequence[int] = (1024, 1024),
        levels: Sequence[int] = COSMOS_FSQ_LEVELS,
        spatial_compression: int = 16,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        batch_size: int = 8,
    ):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"Cosmos tokenizer directory not found: {self.path}")
        if not (self.path / ENCODER_FILE).is_file() and not (self.path / DECODER_FILE).is_file():
            raise FileNotFoundError(f"{self.path}: neither {ENCODER_FILE} nor {DECODER_FILE}")
        if dtype not in _DTYPES:
            raise ValueError(f"Cosmos dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
        self.levels = tuple(int(v) for v in levels)
        if min(self.levels) < 2:
            raise ValueError(f"FSQ levels must be >= 2, got {self.levels}")
        self.spatial_compression = int(spatial_compression)
        self.image_size = tuple(int(s) for s in image_size)
        if any(s % self.spatial_compression for s in self.image_size):
            raise ValueError(f"image_size {self.image_size} is not a multiple of {self.spatial_compression}")
        self.grid = tuple(s // self.spatial_compression for s in self.image_size)
        self.codebook_size = math.prod(self.levels)
        self.device = torch.device(device)
        self.dtype_name = dtype
        self.dtype = _DTYPES[dtype]
        self.batch_size = int(batch_size)
        self._encoder = None
        self._decoder = None

    def code_features(self) -> torch.Tensor:
        """float32 [K, D]: each index's normalised FSQ code (one coordinate per level), the vector the decoder sees."""
        return indices_to_codes(torch.arange(self.codebook_size), self.levels)

    # ---- TorchScript modules ---------------------------------------------------------------------------------
    def _load(self, name: str):
        f = self.path / name
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing (needed for {'encode' if name == ENCODER_FILE else 'decode'})")
        module = load_torchscript(f, self.device)
        # Cosmos ships bfloat16 weights; casting also lets a CPU run them in float32
        return module.to(self.dtype)

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = self._load(ENCODER_FILE)
        return self._encoder

    @property
    def decoder(self):
        if self._decoder is None:
            self._decoder = self._load(DECODER_FILE)
        return self._decoder

    def to(self, device) -> CosmosTokenizer:
        self.device = torch.device(device)
        for m in (self._encoder, self._decoder):
            if m is not None:
                m.to(self.device)
        return self

    # ---- ImageTokenizer ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> FSQ indices int64 [B, H/16, W/16] (CPU)."""
        video = images_to_video(images, dtype=self.dtype, device=self.device)
        h, w = video.shape[-2:]
        if h % self.spatial_compression or w % self.spatial_compression:
            raise ValueError(f"image size {(h, w)} is not a multiple of {self.spatial_compression}")
        out = []
        for chunk in video.split(self.batch_size):
            res = self.encoder(chunk)
            indices = res[0] if isinstance(res, (tuple, list)) else res
            if indices.is_floating_point():
                raise TypeError(f"{self.path / ENCODER_FILE}: first output is {indices.dtype}, expected indices")
            if indices.dim() == 4:  # [B, t, h, w]; an image is the first (only) latent frame
                indices = indices[:, 0]
            out.append(indices.long().cpu())
        codes = torch.cat(out)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"{self.path / ENCODER_FILE}: indices outside [0, {self.codebook_size})")
        return codes

    @torch.no_grad()
    def decode(self, codes) -> torch.Tensor:
        """FSQ indices int [B, h, w] -> images uint8 [B, 16h, 16w, 3] (CPU)."""
        codes = torch.as_tensor(codes)
        if codes.dim() == 2:
            codes = codes.unsqueeze(0)
        if codes.dim() != 3:
            raise ValueError(f"expected codes [B, h, w], got shape {tuple(codes.shape)}")
        if codes.is_floating_point():
            raise TypeError(f"expected integer codes, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes outside [0, {self.codebook_size})")
        out = []
        for chunk in codes.long().split(self.batch_size):
            video = self.decoder(chunk.to(self.device).unsqueeze(1))  # [b, 1, h, w]: a 1-frame latent video
            out.append(video_to_images(video))
        return torch.cat(out)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """int [...] -> float [..., len(levels)] in [-1, 1]."""
        return indices_to_codes(torch.as_tensor(indices), self.levels)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """float [..., len(levels)] -> int64 [...]."""
        return codes_to_indices(torch.as_tensor(codes), self.levels)

    # ---- persistence ----------------------------------------------------------------------------------------------
    def config(self) -> dict:
        return {"kind": "cosmos", "image_size": list(self.image_size), "levels": list(self.levels),
                "spatial_compression": self.spatial_compression, "dtype": self.dtype_name,
                "batch_size": self.batch_size}

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``image_tokenizer.json`` and the TorchScript files (hard-linked: they are large and never edited)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name in (ENCODER_FILE, DECODER_FILE):
            src, dst = self.path / name, path / name
            if src.is_file() and src.resolve() != dst.resolve():
                if dst.exists():
                    dst.unlink()
                link_or_copy(src, dst)
        (path / CONFIG_NAME).write_text(json.dumps(self.config(), indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", **overrides) -> CosmosTokenizer:
        """Load a directory: ``image_tokenizer.json`` when present, else a raw Cosmos download (DV8x16x16 defaults,
        1024 px images)."""
        path = Path(path)
        cfg: dict = {}
        if (path / CONFIG_NAME).is_file():
            try:
                cfg = json.loads((path / CONFIG_NAME).read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path / CONFIG_NAME}: not valid JSON: {e}") from e
            if cfg.pop("kind", "cosmos") != "cosmos":
                raise ValueError(f"{path / CONFIG_NAME}: not a Cosmos tokenizer")
            known = {"image_size", "levels", "spatial_compression", "dtype", "batch_size"}
            unknown = set(cfg) - known
            if unknown:
                raise ValueError(f"{path / CONFIG_NAME}: unknown keys {sorted(unknown)}; valid: {sorted(known)}")
        cfg.update(overrides)
        return cls(path, device=device, **cfg)

    def __repr__(self) -> str:
        return (f"CosmosTokenizer(path={str(self.path)!r}, grid={self.grid}, codebook_size={self.codebook_size}, "
                f"device={self.device}, dtype={self.dtype_name})")
