"""``argrpo sample`` on a real (tiny, random) checkpoint: GenEval output layout, prompt files, reruns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from argrpo.recipes.cli import main
from PIL import Image


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from argrpo.models.image_tokenizers.vq import VQTokenizer
    from argrpo.models.layout import layout_preset
    from argrpo.models.policy import build_policy, save_policy
    from argrpo.models.text_tokenizer import build_text_tokenizer

    g = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 4, 4, generator=g) > 0.5
    colors = torch.tensor([[255, 0, 0], [0, 0, 255], [0, 200, 0]], dtype=torch.uint8)
    vq = VQTokenizer(masks, colors, torch.tensor([255, 255, 255], dtype=torch.uint8), grid=(4, 4))
    layout = layout_preset("shapes", text_vocab_size=0, codebook_size=vq.codebook_size, grid=(4, 4),
                           image_size=vq.image_size)
    tok = build_text_tokenizer(["a", "red", "blue", "circle", "square", "photo", "of"], layout.special_tokens)
    layout = layout_preset("shapes", text_vocab_size=len(tok), codebook_size=vq.codebook_size, grid=(4, 4),
                           image_size=vq.image_size)
    model = build_policy(layout, size="tiny", seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "policy"
    save_policy(path, model, tok, layout, image_tokenizer=vq)
    return path


def test_sample_writes_geneval_layout(checkpoint, tmp_path):
    rows = [{"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "a red circle"},
            {"prompt": "a blue square"}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = ["sample", "--checkpoint", str(checkpoint), "--prompts", str(prompts), "--n", "3", "--cfg", "3",
            "--out", str(out), "--seed", "5", "--batch-prompts", "1"]
    assert main(args) == 0
    for i, row in enumerate(rows):
        folder = out / f"{i:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == row
        imgs = [np.asarray(Image.open(folder / "samples" / f"{k:05d}.png")) for k in range(3)]
        assert all(im.shape == (16, 16, 3) and im.dtype == np.uint8 for im in imgs)
        assert not (folder / "samples" / "00003.png").exists()
        grid = np.asarray(Image.open(folder / "grid.png"))
        assert grid.shape == (2 * 16 + 2, 2 * 16 + 2, 3)
        assert np.array_equal(grid[:16, :16], imgs[0]) and np.array_equal(grid[:16, 18:], imgs[1])
    first = (out / "00001" / "samples" / "00002.png").read_bytes()

    # a rerun with another batching reproduces the same images (seed + i * n + k); --skip-existing keeps folders
    out2 = tmp_path / "out2"
    assert main(args[:-4] + ["--out", str(out2), "--seed", "5"]) == 0
    assert (out2 / "00001" / "samples" / "00002.png").read_bytes() == first
    (out2 / "00000" / "samples" / "00001.png").unlink()
    mtime = (out2 / "00001" / "grid.png").stat().st_mtime_ns
    assert main(args[:-4] + ["--out", str(out2), "--seed", "5", "--skip-existing"]) == 0
    assert (out2 / "00000" / "samples" / "00001.png").is_file()
    assert (out2 / "00001" / "grid.png").stat().st_mtime_ns == mtime


def test_sample_plain_text_prompts_and_errors(checkpoint, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n\na photo of a blue square\n")
    out = tmp_path / "out"
    assert main(["sample", "--checkpoint", str(checkpoint), "--prompts", str(prompts), "--n", "1", "--cfg", "1",
                 "--out", str(out)]) == 0
    assert json.loads((out / "00001" / "metadata.jsonl").read_text()) == {"prompt": "a photo of a blue square"}
    assert not (out / "00002").exists()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a red circle"}\n{"caption": "x"}\n')
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(checkpoint), "--prompts", str(bad), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"argrpo sample: {bad}: row 2: expected an object with a string 'prompt' (non-empty)\n")
