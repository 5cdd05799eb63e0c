"""Cosmos adapter against small TorchScript modules scripted here with the real call convention."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from argrpo.models.image_tokenizers.cosmos import (
    CosmosTokenizer,
    codes_to_indices,
    images_to_video,
    indices_to_codes,
)
from torch import nn

P = 16  # pixels per code


class PatchEncoder(nn.Module):
    """[B, 3, T, H, W] in [-1, 1] -> (indices [B, 1, h, w], codes [B, 6, 1, h, w], loss), like Cosmos' encoder.jit:
    each 16x16 patch's mean colour is quantised to 8 levels per channel (digits 0-2); digits 3-5 sit mid-range."""

    def __init__(self):
        super().__init__()
        self.register_buffer("basis", torch.tensor([1, 8, 64, 512, 2560, 12800]))
        self.register_buffer("half_width", torch.tensor([4.0, 4.0, 4.0, 2.0, 2.0, 2.0]))
        self.proj = nn.Conv2d(3, 3, 1)  # a float parameter, so dtype casting is exercised
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
            self.proj.bias.zero_()

    def forward(self, x: torch.Tensor):
        frame = self.proj(x[:, :, 0])
        mean = torch.nn.functional.avg_pool2d(frame, 16)  # [B, 3, h, w]
        rgb = torch.round((mean + 1.0) / 2.0 * 7.0).clamp(0, 7).long()
        b, _, h, w = rgb.shape
        digits = torch.cat([rgb, torch.full((b, 3, h, w), 2, dtype=torch.long, device=x.device)], dim=1)
        indices = (digits * self.basis.view(1, 6, 1, 1)).sum(1).unsqueeze(1)
        codes = ((digits.float() - self.half_width.view(1, 6, 1, 1)) / self.half_width.view(1, 6, 1, 1)).unsqueeze(2)
        return indices, codes, torch.zeros(b, 1, 1, 1, 1)


class ColourDecoder(nn.Module):
    """indices [B, 1, h, w] -> [B, 3, 1, 16h, 16w] in [-1, 1]: each code becomes a flat 16x16 patch whose colour
    comes from digits 0-2."""

    def __init__(self):
        super().__init__()
        self.register_buffer("basis", torch.tensor([1, 8, 64]))
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, indices: torch.Tensor):
        idx = indices[:, 0].long()  # [B, h, w]
        digits = (idx.unsqueeze(1) // self.basis.view(1, 3, 1, 1)) % 8  # [B, 3, h, w]
        rgb = digits.float() / 7.0 * 2.0 - 1.0
        img = rgb.repeat_interleave(16, dim=2).repeat_interleave(16, dim=3) * self.scale.float()
        return img.unsqueeze(2)


@pytest.fixture(scope="module")
def cosmos_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cosmos")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, yet it is Cosmos' format
        torch.jit.script(PatchEncoder()).save(str(d / "encoder.jit"))
        torch.jit.script(ColourDecoder()).save(str(d / "decoder.jit"))
    return d


def _patch_images(n=2, grid=(4, 6), seed=0):
    """uint8 [n, 16*gh, 16*gw, 3] of flat patches whose colours lie on the 8-level grid, and their digits."""
    g = np.random.default_rng(seed)
    levels = g.integers(0, 8, size=(n, *grid, 3))
    colours = np.round(levels / 7 * 255).astype(np.uint8)
    img = colours.repeat(P, axis=1).repeat(P, axis=2)
    return img, levels


def test_fsq_mixed_radix_full_codebook():
    idx = torch.arange(64000)
    codes = indices_to_codes(idx)
    assert codes.shape == (64000, 6) and codes.min() == -1 and codes.max() == 1
    assert torch.equal(codes_to_indices(codes), idx)
    assert len({tuple(c) for c in codes[::97].tolist()}) == len(range(0, 64000, 97))
    assert torch.equal(codes[0], torch.full((6,), -1.0))
    assert torch.equal(codes[63999], torch.tensor([0.75, 0.75, 0.75, 1.0, 1.0, 1.0]))
    # the first level is the least significant digit: index 1 moves digit 0 only, index 8 digit 1
    assert torch.equal(codes[1] - codes[0], torch.tensor([0.25, 0, 0, 0, 0, 0]))
    assert torch.equal(codes[8] - codes[0], torch.tensor([0, 0.25, 0, 0, 0, 0]))
    assert torch.equal(codes[512] - codes[0], torch.tensor([0, 0, 0, 0.5, 0, 0]))
    # nearby values snap to the nearest level
    assert torch.equal(codes_to_indices(codes[:50] + 0.05), idx[:50])


def test_conventions():
    img = np.zeros((2, 32, 48, 3), np.uint8)
    img[0, 0, 0] = 255
    v = images_to_video(img)
    assert v.shape == (2, 3, 1, 32, 48) and v.min() == -1 and v[0, :, 0, 0, 0].tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="uint8"):
        images_to_video(img.astype(np.float32))


def test_encode_decode_round_trip(cosmos_dir):
    from argrpo.models.image_tokenizers.base import ImageTokenizer

    tok = CosmosTokenizer(cosmos_dir, image_size=(64, 96))
    assert isinstance(tok, ImageTokenizer)
    assert tok.codebook_size == 64000 and tok.grid == (4, 6) and tok.image_size == (64, 96)
    assert tok._encoder is None and tok._decoder is None  # loaded lazily
    images, levels = _patch_images()
    codes = tok.encode(images)
    assert codes.dtype == torch.int64 and codes.shape == (2, 4, 6)
    expected = torch.from_numpy(levels[..., 0] + 8 * levels[..., 1] + 64 * levels[..., 2] + 2 * (512 + 2560 + 12800))
    assert torch.equal(codes, expected)
    # the encoder's own `codes` output agrees with the adapter's index -> code conversion
    _, enc_codes, _ = tok.encoder(images_to_video(images))
    assert torch.allclose(enc_codes[:, :, 0].permute(0, 2, 3, 1), tok.indices_to_codes(codes))
    out = tok.decode(codes)
    assert out.dtype == torch.uint8 and out.shape == (2, 64, 96, 3)
    assert np.abs(out.numpy().astype(int) - images.astype(int)).max() <= 1
    assert torch.equal(tok.encode(out.numpy()), codes)
    # batching in chunks gives the same result
    tok.batch_size = 1
    assert torch.equal(tok.decode(codes), out)
    with pytest.raises(ValueError, match="outside"):
        tok.decode(torch.full((1, 4, 6), 64000))
    with pytest.raises(ValueError, match="multiple of 16"):
        tok.encode(np.zeros((1, 40, 48, 3), np.uint8))


def test_save_load_and_registry(cosmos_dir, tmp_path):
    from argrpo.models.image_tokenizers import load_image_tokenizer

    tok = CosmosTokenizer(cosmos_dir, image_size=(64, 96), dtype="bfloat16")
    tok.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "decoder.jit").stat().st_ino == (cosmos_dir / "decoder.jit").stat().st_ino
    loaded = load_image_tokenizer(tmp_path / "saved")
    assert isinstance(loaded, CosmosTokenizer)
    assert loaded.grid == (4, 6) and loaded.dtype == torch.bfloat16 and loaded.codebook_size == 64000
    images, _ = _patch_images(n=1, seed=3)
    codes = CosmosTokenizer(cosmos_dir, image_size=(64, 96)).encode(images)
    assert torch.equal(loaded.encode(images), codes)  # bfloat16 still hits the same levels here
    assert np.abs(loaded.decode(codes).numpy().astype(int) - images.astype(int)).max() <= 1
    # a raw Cosmos download (only the .jit files) loads with SimpleAR's defaults
    raw = CosmosTokenizer.from_pretrained(cosmos_dir)
    assert raw.grid == (64, 64) and raw.image_size == (1024, 1024)
    with pytest.raises(FileNotFoundError):
        CosmosTokenizer(tmp_path / "nothing")
