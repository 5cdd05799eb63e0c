"""A factorised patch VQ: each code is one (mask, colour) pair on a fixed background, plus one all-background code.

Built for flat-coloured images whose objects sit on the patch grid (the shapes world): there every patch is the
background with at most one colour under one of a finite set of masks, so the codebook is learnt by exact
collection, not k-means. Fitting gathers the distinct masks and the distinct colours seen in training images and
takes their full product, so a colour-shape pair that no training image shows still has its codes, and
reconstruction of such images is lossless. (k-means on patches was measured to keep 99% of pixels yet flip a
detector's verdict on 30% of images: it averages away the rare edge masks that make a triangle a triangle.)

encode: nearest code in RGB L2 (any image encodes, e.g. a blurred or noisy one); decode: a table lookup.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from argrpo.models.image_tokenizers.base import register_image_tokenizer

CONFIG_NAME = "image_tokenizer.json"
WEIGHTS_NAME = "vq.safetensors"


@dataclass
class VQFitConfig:
    """How the factorised VQ is fitted (see ``VQTokenizer.fit``)."""

    patch_size: int = field(default=8, metadata={"help": "patch side in pixels; the code grid is image / patch"})
    max_codebook_size: int = field(
        default=4096, metadata={"help": "refuse to build a larger codebook (the LM's visual vocabulary)"}
    )

    def __post_init__(self):
        if self.patch_size <= 0 or self.max_codebook_size < 2:
            raise ValueError("VQFitConfig: patch_size must be > 0 and max_codebook_size >= 2")


def _as_uint8_images(images) -> torch.Tensor:
    """numpy / torch uint8 [B, H, W, 3] (or a list of [H, W, 3]) -> torch uint8 [B, H, W, 3] on CPU."""
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im) for im in images])
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected images [B, H, W, 3], got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {x.dtype}")
    return x


def _pack_rgb(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3] -> int64 [N] (24-bit colour keys: 1-D unique/bincount are far faster than dim=0 unique)."""
    rgb = rgb.long()
    return (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]


def _unpack_rgb(key: torch.Tensor) -> torch.Tensor:
    return torch.stack([(key >> 16) & 255, (key >> 8) & 255, key & 255], dim=1).to(torch.uint8)


def _unique_rows(bits: torch.Tensor) -> torch.Tensor:
    """bool [N, D] -> its distinct rows, sorted, bool [U, D]."""
    n, d = bits.shape
    if n == 0:
        return bits[:0]
    words = -(-d // 62)  # 62 bits a word keeps every packed value a positive int64
    padded = torch.zeros(n, words * 62, dtype=torch.long)
    padded[:, :d] = bits.long()
    weights = 1 << torch.arange(62, dtype=torch.long)
    keys = (padded.view(n, words, 62) * weights).sum(-1)  # [N, words]
    uniq = torch.unique(keys, dim=0) if words > 1 else torch.unique(keys[:, 0]).view(-1, 1)
    out = ((uniq[:, :, None] >> torch.arange(62)) & 1).bool().reshape(len(uniq), -1)
    return out[:, :d]


def _patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> [B, H/p, W/p, p, p, 3]."""
    b, h, w, _ = x.shape
    return x.reshape(b, h // p, p, w // p, p, 3).permute(0, 1, 3, 2, 4, 5)


@register_image_tokenizer("vq")
class VQTokenizer:
    """Codes [B, h, w] <-> images uint8 [B, h*p, w*p, 3]; code 0 is all-background, code 1 + m * C + c is mask m
    painted in colour c.

    Args:
        masks: bool [M, p, p], the non-empty patch masks.
        colors: uint8 [C, 3], the object colours.
        background: uint8 [3].
        grid: (h, w) code grid of one image.
    """

    def __init__(self, masks, colors, background, grid=(8, 8)):
        self.masks = torch.as_tensor(masks).bool()
        self.colors = torch.as_tensor(colors).to(torch.uint8).reshape(-1, 3)
        self.background = torch.as_tensor(background).to(torch.uint8).reshape(3)
        if self.masks.dim() != 3 or self.masks.shape[1] != self.masks.shape[2]:
            raise ValueError(f"VQTokenizer: masks must be [M, p, p], got {tuple(self.masks.shape)}")
        self.patch_size = int(self.masks.shape[1])
        self.grid = (int(grid[0]), int(grid[1]))
        self.image_size = (self.grid[0] * self.patch_size, self.grid[1] * self.patch_size)
        m, c, p = self.masks.shape[0], self.colors.shape[0], self.patch_size
        book = self.background.view(1, 1, 1, 3).expand(1 + m * c, p, p, 3).clone()
        paint = self.colors.view(1, c, 1, 1, 3).expand(m, c, p, p, 3)
        where = self.masks.view(m, 1, p, p, 1).expand(m, c, p, p, 3)
        body = book[1:].view(m, c, p, p, 3)
        body[where] = paint[where]
        self.codebook = book  # uint8 [K, p, p, 3]
        self._flat = (book.reshape(len(book), -1).float() - 128.0)  # centred: squared sums stay exact in fp32
        self._flat_sq = (self._flat**2).sum(1)
        self._by_device: dict[torch.device, torch.Tensor] = {}

    @property
    def codebook_size(self) -> int:
        return int(self.codebook.shape[0])

    # ---- fitting ---------------------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, images, patch_size: int = 8, max_codebook_size: int = 4096, background=None) -> VQTokenizer:
        """Collect the masks and colours of training images (uint8 [N, H, W, 3]); background = the most common
        pixel colour unless given. Raises if a patch holds two object colours (the images are not patch-aligned
        flat-colour images) or the product codebook would exceed ``max_codebook_size``."""
        x = _as_uint8_images(images)
        n, h, w, _ = x.shape
        p = int(patch_size)
        if h % p or w % p:
            raise ValueError(f"VQTokenizer.fit: image size {h}x{w} is not a multiple of patch_size {p}")
        if background is None:
            packed = _pack_rgb(x.reshape(-1, 3))
            background = _unpack_rgb(torch.bincount(packed, minlength=1 << 24).argmax().view(1))[0]
        bg = torch.as_tensor(background).to(torch.uint8).reshape(3)
        pt = _patches(x, p).reshape(-1, p * p, 3)  # [P, p*p, 3]
        fg = (pt != bg).any(-1)  # [P, p*p]
        has = fg.any(1)
        first = pt[torch.arange(len(pt)), fg.float().argmax(1)]  # colour of each patch's first object pixel
        mixed = (fg & (pt != first[:, None]).any(-1)).any(1)
        if bool(mixed.any()):
            k = int(mixed.nonzero()[0])
            img, rest = divmod(k, (h // p) * (w // p))
            raise ValueError(
                f"VQTokenizer.fit: image {img}, patch (row {rest // (w // p)}, col {rest % (w // p)}) holds more than "
                "one non-background colour; the factorised VQ needs flat colours on patch-aligned objects"
            )
        masks = _unique_rows(fg[has]).reshape(-1, p, p)
        colors = _unpack_rgb(torch.unique(_pack_rgb(first[has])))
        size = 1 + len(masks) * len(colors)
        if size > max_codebook_size:
            raise ValueError(f"VQTokenizer.fit: {len(masks)} masks x {len(colors)} colours = {size} codes > "
                             f"max_codebook_size {max_codebook_size}")
        return cls(masks, colors, bg, grid=(h // p, w // p))

    # ---- codes <-> images ------------------------------------------------------------------------------------------
    def encode(self, images, chunk: int = 16384) -> torch.Tensor:
        """uint8 [B, H, W, 3] (numpy or torch) -> codes int64 [B, h, w]: the nearest code of each patch (L2)."""
        x = _as_uint8_images(images).cpu()
        if tuple(x.shape[1:3]) != self.image_size:
            raise ValueError(f"VQTokenizer.encode: expected {self.image_size} images, got {tuple(x.shape[1:3])}")
        b = x.shape[0]
        flat = _patches(x, self.patch_size).reshape(-1, self.patch_size**2 * 3)
        out = torch.empty(len(flat), dtype=torch.long)
        for s in range(0, len(flat), chunk):
            v = flat[s:s + chunk].float() - 128.0
            # ||v - c||^2 up to the per-row constant ||v||^2
            d = self._flat_sq[None, :] - 2.0 * (v @ self._flat.T)
            out[s:s + chunk] = d.argmin(1)
        return out.view(b, *self.grid)

    def decode(self, codes) -> torch.Tensor:
        """codes int [B, h, w] -> images uint8 [B, H, W, 3] on CPU, by table lookup (on the codes' device)."""
        codes = torch.as_tensor(codes)
        if codes.dim() != 3 or tuple(codes.shape[1:]) != self.grid:
            raise ValueError(f"VQTokenizer.decode: expected codes [B, {self.grid[0]}, {self.grid[1]}], "
                             f"got {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"VQTokenizer.decode: expected integer codes, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"VQTokenizer.decode: codes out of range [0, {self.codebook_size})")
        book = self._by_device.get(codes.device)
        if book is None:
            book = self._by_device[codes.device] = self.codebook.to(codes.device)
        b, (h, w), p = codes.shape[0], self.grid, self.patch_size
        img = book[codes.long()]  # [B, h, w, p, p, 3]
        return img.permute(0, 1, 3, 2, 4, 5).reshape(b, h * p, w * p, 3).cpu()

    def code_features(self) -> torch.Tensor:
        """float32 [K, 1 + M + C]: code 0 (background) -> [1, 0...]; code 1 + m*C + c -> one-hot mask m and one-hot
        colour c. Additive in the two factors, so a model's rows initialised from them share a colour's part
        across masks (models.visual_init)."""
        m, c = int(self.masks.shape[0]), int(self.colors.shape[0])
        feats = torch.zeros(self.codebook_size, 1 + m + c)
        feats[0, 0] = 1.0
        k = torch.arange(m * c)
        feats[1 + k, 1 + k // c] = 1.0
        feats[1 + k, 1 + m + k % c] = 1.0
        return feats

    # ---- persistence -----------------------------------------------------------------------------------------------
    def config(self) -> dict:
        return {
            "kind": "vq",
            "codebook_size": self.codebook_size,
            "grid": list(self.grid),
            "image_size": list(self.image_size),
            "patch_size": self.patch_size,
            "n_masks": int(self.masks.shape[0]),
            "n_colors": int(self.colors.shape[0]),
            "colors": self.colors.tolist(),
            "background": self.background.tolist(),
            "method": "exact collection of patch masks x colours (factorised)",
        }

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``vq.safetensors`` (masks, colors, background, codebook) and ``image_tokenizer.json``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"masks": self.masks.to(torch.uint8).contiguous(), "colors": self.colors.contiguous(),
                   "background": self.background.contiguous(), "codebook": self.codebook.contiguous()}
        # Weights first, config last: a directory with a config always has its weights.
        fd, tmp = tempfile.mkstemp(prefix=".vq.", suffix=".safetensors", dir=path)
        os.close(fd)
        try:
            save_file(tensors, tmp)
            os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; a saved model is meant to be shared
            os.replace(tmp, path / WEIGHTS_NAME)
        finally:
            Path(tmp).unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".cfg.", dir=path)
        with os.fdopen(fd, "w") as f:
            json.dump(self.config(), f, indent=2)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path / CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> VQTokenizer:
        from safetensors.torch import load_file

        path = Path(path)
        cfg_path, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
        for f in (cfg_path, weights):
            if not f.is_file():
                raise FileNotFoundError(f"{path}: missing {f.name} (not a saved VQ image tokenizer)")
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("kind") != "vq":
            raise ValueError(f"{cfg_path}: kind is {cfg.get('kind')!r}, expected 'vq'")
        t = load_file(str(weights))
        missing = {"masks", "colors", "background"} - set(t)
        if missing:
            raise ValueError(f"{weights}: missing tensors {sorted(missing)}")
        tok = cls(t["masks"].bool(), t["colors"], t["background"], grid=tuple(cfg["grid"]))
        if tok.codebook_size != cfg.get("codebook_size"):
            raise ValueError(f"{cfg_path}: codebook_size {cfg.get('codebook_size')} does not match the stored "
                             f"factors ({tok.codebook_size} codes)")
        if "codebook" in t and not torch.equal(t["codebook"], tok.codebook):
            raise ValueError(f"{weights}: stored codebook differs from the one its masks and colours define")
        return tok

    def __repr__(self) -> str:
        return (f"VQTokenizer(codebook_size={self.codebook_size}, masks={self.masks.shape[0]}, "
                f"colors={self.colors.shape[0]}, grid={self.grid}, patch={self.patch_size})")
