"""The factorised patch VQ: lossless on shapes renders (held-out compositions included), lookup decode, persistence,
the `argrpo tokenizer train` recipe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from argrpo.data.shapes import PALETTE, ShapesWorld, blur_and_noise, spec_from_key
from argrpo.models.image_tokenizers import IMAGE_TOKENIZERS, ImageTokenizer, load_image_tokenizer
from argrpo.models.image_tokenizers.vq import VQTokenizer

WORLD = ShapesWorld()
REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "recipes/configs/shapes/tokenizer.yaml"


@pytest.fixture(scope="module")
def tok():
    _, images, _ = WORLD.sample("train", 400, seed=0)
    return VQTokenizer.fit(images)


@pytest.fixture(scope="module")
def heldout():
    return WORLD.sample("heldout", 120, seed=1)


def test_registered_and_satisfies_the_protocol(tok):
    assert IMAGE_TOKENIZERS["vq"] is VQTokenizer and VQTokenizer.kind == "vq"
    assert isinstance(tok, ImageTokenizer)
    assert tok.grid == (8, 8) and tok.image_size == (64, 64) and tok.patch_size == 8


def test_codebook_is_masks_times_colours(tok):
    m, c = tok.masks.shape[0], tok.colors.shape[0]
    assert c == len(WORLD.colors) and tok.codebook_size == 1 + m * c
    assert 20 <= tok.codebook_size <= 2048
    assert {tuple(x) for x in tok.colors.tolist()} == set(WORLD.palette.values())
    assert tok.background.tolist() == list(WORLD.background)
    flat = tok.codebook.reshape(tok.codebook_size, -1)
    assert len(torch.unique(flat, dim=0)) == tok.codebook_size  # distinct codes: encode(decode(c)) == c
    assert (tok.codebook[0] == tok.background).all()


def test_heldout_images_round_trip_exactly(tok, heldout):
    _, images, _ = heldout
    codes = tok.encode(images)
    assert codes.shape == (120, 8, 8) and codes.dtype == torch.int64
    recon = tok.decode(codes)
    assert recon.shape == (120, 64, 64, 3) and recon.dtype == torch.uint8
    assert torch.equal(recon, torch.from_numpy(images))
    # torch input and a list of arrays encode the same
    assert torch.equal(tok.encode(torch.from_numpy(images[:3])), codes[:3])
    assert torch.equal(tok.encode(list(images[:3])), codes[:3])


def test_colour_shape_pairs_absent_from_training_still_have_codes():
    # train on single coloured shapes without any blue triangle; a blue triangle must still reconstruct exactly
    keys = [(c, s) for c in WORLD.colors for s in WORLD.shapes if (c, s) != ("blue", "triangle")]
    images = np.stack([WORLD.render(spec_from_key("colors", k), seed)[0] for k in keys for seed in range(12)])
    tok = VQTokenizer.fit(images)
    blue_tri = np.stack([WORLD.render(spec_from_key("colors", ("blue", "triangle")), s)[0] for s in range(10)])
    assert torch.equal(tok.decode(tok.encode(blue_tri)), torch.from_numpy(blue_tri))


def test_decode_is_a_lookup_and_encode_inverts_it(tok):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, tok.codebook_size, (16, 8, 8), generator=g)
    images = tok.decode(codes)
    assert torch.equal(tok.encode(images), codes)
    p = tok.patch_size
    for b, r, c in [(0, 0, 0), (3, 7, 2), (15, 4, 7)]:
        assert torch.equal(images[b, r * p:(r + 1) * p, c * p:(c + 1) * p], tok.codebook[codes[b, r, c]])


def test_nearest_code_encoding_of_noisy_images(tok, heldout):
    _, images, _ = heldout
    clean = tok.encode(images)
    noisy = tok.encode(blur_and_noise(images, 0.0, 8.0, seed=0))
    assert (noisy == clean).float().mean() >= 0.99
    blurred = tok.decode(tok.encode(blur_and_noise(images, 0.7, 8.0, seed=0))).numpy()
    assert np.mean(np.all(blurred == images, axis=-1)) >= 0.97  # per-pixel colour kept through nearest codes


def test_bad_inputs_are_refused(tok):
    with pytest.raises(ValueError, match=r"codes \[B, 8, 8\]"):
        tok.decode(torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        tok.decode(torch.full((1, 8, 8), tok.codebook_size))
    with pytest.raises(ValueError, match="integer"):
        tok.decode(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        tok.encode(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        tok.encode(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"expected \(64, 64\)"):
        tok.encode(np.zeros((1, 32, 32, 3), np.uint8))


def test_fit_refuses_images_it_cannot_factorise():
    img = np.full((1, 16, 16, 3), 128, np.uint8)
    img[0, 9, 10] = PALETTE["red"]
    img[0, 12, 13] = PALETTE["blue"]  # two colours in patch (row 1, col 1)
    with pytest.raises(ValueError, match=r"image 0, patch \(row 1, col 1\)"):
        VQTokenizer.fit(img)
    _, images, _ = WORLD.sample("train", 50, seed=0)
    with pytest.raises(ValueError, match="max_codebook_size"):
        VQTokenizer.fit(images, max_codebook_size=20)


def test_save_and_load(tok, heldout, tmp_path):
    tok.save_pretrained(tmp_path / "vq")
    assert {p.name for p in (tmp_path / "vq").iterdir()} == {"vq.safetensors", "image_tokenizer.json"}
    cfg = json.loads((tmp_path / "vq/image_tokenizer.json").read_text())
    assert cfg["kind"] == "vq" and cfg["codebook_size"] == tok.codebook_size and cfg["grid"] == [8, 8]
    loaded = load_image_tokenizer(tmp_path / "vq")
    assert isinstance(loaded, VQTokenizer) and torch.equal(loaded.codebook, tok.codebook)
    images = heldout[1][:8]
    assert torch.equal(loaded.encode(images), tok.encode(images))


def test_load_errors_name_the_problem(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="image_tokenizer.json"):
        load_image_tokenizer(tmp_path)
    (tmp_path / "image_tokenizer.json").write_text(json.dumps({"kind": "nope"}))
    with pytest.raises(ValueError, match=r"unknown image tokenizer kind 'nope'.*'vq'"):
        load_image_tokenizer(tmp_path)
    (tmp_path / "image_tokenizer.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_image_tokenizer(tmp_path)
    tok.save_pretrained(tmp_path / "ok")
    (tmp_path / "ok/vq.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="vq.safetensors"):
        load_image_tokenizer(tmp_path / "ok")


def test_tokenizer_train_command(tmp_path, capsys):
    from argrpo.recipes.cli import main

    out = tmp_path / "tok"
    rc = main(["tokenizer", "train", str(CONFIG), "--set", f"output_dir={out}", "--set", "n_images=300"])
    assert rc == 0
    tok = load_image_tokenizer(out)
    _, images, _ = WORLD.sample("train", 300, seed=0)
    assert torch.equal(tok.codebook, VQTokenizer.fit(images).codebook)  # the recipe fits on the same renders
    _, held, _ = WORLD.sample("heldout", 30, seed=4)
    assert torch.equal(tok.decode(tok.encode(held)), torch.from_numpy(held))
    assert "codebook_size=109" in capsys.readouterr().out
    assert main(["tokenizer", "train", str(CONFIG), "--set", f"output_dir={out}", "--set", "n_imgs=3"]) == 2
    assert "n_imgs" in capsys.readouterr().err


def test_shipped_config_loads_and_documents_its_command():
    from argrpo.config import load_config
    from argrpo.recipes.commands.tokenizer import TokenizerTrainConfig

    assert CONFIG.read_text().splitlines()[0] == "# argrpo tokenizer train recipes/configs/shapes/tokenizer.yaml"
    cfg = load_config(TokenizerTrainConfig, CONFIG)
    assert cfg.world == ShapesWorld() and cfg.vq.patch_size == cfg.world.cell
