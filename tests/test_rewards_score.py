"""``argrpo score`` on GenEval-layout and flat folders of rendered shapes images."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from argrpo.recipes.cli import main
from PIL import Image


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "score_plugin.py").write_text(textwrap.dedent("""
        import numpy as np

        def redness(prompts, images, **metadata):
            return [float((np.asarray(im)[..., 0] > 200).mean()) for im in images]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "score_plugin:redness"


def test_score_geneval_layout(tmp_path, plugin, capsys):
    from argrpo.data.shapes import ShapesWorld, perturb_spec

    world = ShapesWorld()
    specs, images, _ = world.sample("train", 6, seed=3)
    rng = np.random.default_rng(0)
    root = tmp_path / "samples"
    for i, spec in enumerate(specs):
        folder = root / f"{i:05d}"
        (folder / "samples").mkdir(parents=True)
        row = spec if i % 2 == 0 else {**perturb_spec(world, spec, rng), "prompt": spec["prompt"]}
        (folder / "metadata.jsonl").write_text(json.dumps(row) + "\n")
        for k in range(2):
            Image.fromarray(images[i]).save(folder / "samples" / f"{k:05d}.png")
    out = tmp_path / "out"
    rc = main(["score", "--reward", f"geneval,{plugin}", "--reward-kwargs", "geneval={detector: shapes}",
               "--images", str(root), "--out", str(out), "--batch-size", "5"])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    assert [r["index"] for r in rows] == [i for i in range(6) for _ in range(2)]
    assert [r["scores"]["geneval"] for r in rows] == [1.0 if r["index"] % 2 == 0 else 0.0 for r in rows]
    for r in rows:
        img = np.asarray(Image.open(r["path"]).convert("RGB"))
        assert r["scores"][plugin] == pytest.approx(float((img[..., 0] > 200).mean()))
        assert r["extras"]["geneval/correct"] == r["scores"]["geneval"]
    summary = (out / "summary.md").read_text()
    assert "| reward | mean | std | n |" in summary and "mean over tags |" in summary
    line = next(ln for ln in summary.splitlines() if ln.startswith("| geneval |"))
    assert line.split(" | ")[1:4] == ["0.5000", "0.5000", "12"]
    assert "| geneval |" in capsys.readouterr().out


def test_score_flat_folder_and_errors(tmp_path, plugin, capsys):
    from argrpo.data.shapes import ShapesWorld

    specs, images, _ = ShapesWorld().sample("train", 3, seed=4)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(flat / f"img{i}.png")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(s) + "\n" for s in specs))
    assert main(["score", "--reward", "geneval", "--reward-kwargs", "geneval={detector: shapes}",
                 "--prompts", str(prompts), "--images", str(flat), "--out", str(tmp_path / "o")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "o" / "scores.jsonl").read_text().splitlines()]
    assert [r["scores"]["geneval"] for r in rows] == [1.0, 1.0, 1.0]

    prompts.write_text("".join(json.dumps(s) + "\n" for s in specs[:2]))
    assert main(["score", "--reward", plugin, "--prompts", str(prompts), "--images", str(flat)]) == 2
    assert "3 images but 2 prompt rows" in capsys.readouterr().err
    prompts.write_text("".join(json.dumps(s) + "\n" for s in specs))
    assert main(["score", "--reward", "nope", "--prompts", str(prompts), "--images", str(flat)]) == 2
    assert "unknown reward 'nope'" in capsys.readouterr().err
    assert main(["score", "--reward", "geneval", "--reward-kwargs", "clip={}", "--prompts", str(prompts),
                 "--images", str(flat)]) == 2
    assert "expected NAME=YAML with NAME one of ['geneval']" in capsys.readouterr().err
