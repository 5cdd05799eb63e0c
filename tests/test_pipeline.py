"""`argrpo pipeline` end to end on the shipped shapes configs, shrunk to seconds; a re-run skips finished stages."""

import json
from pathlib import Path

import yaml
from argrpo.recipes.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "shapes"


def tiny_pipeline(tmp_path: Path) -> Path:
    cfg = {
        "output_dir": str(tmp_path / "run"),
        **{stage: str(CONFIGS / f"{stage}.yaml") for stage in ("tokenizer", "pretrain", "sft", "grpo", "eval")},
        "overrides": {
            "tokenizer": ["n_images=200"],
            "pretrain": ["policy.size=tiny", "data.shapes_n=256", "train.max_steps=3", "train.batch_size=16",
                         "train.report_to=[]"],
            "sft": ["data.shapes_n=128", "train.max_steps=2", "train.batch_size=16", "train.report_to=[]"],
            "grpo": ["grpo.max_steps=2", "grpo.num_generations=2", "grpo.per_device_train_batch_size=8",
                     "logging.report_to=[]", "checkpoint.every=0", "threads=1"],
            "eval": ["shapes_per_tag=2", "sampling.n=2"],
        },
        "grid_prompts": 3,
        "grid_samples": 2,
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pipeline_runs_every_stage_then_resumes(tmp_path, capsys):
    path = tiny_pipeline(tmp_path)
    assert main(["pipeline", str(path)]) == 0
    run = tmp_path / "run"
    for stage in ("pretrain", "sft"):
        assert (run / stage / "argrpo.json").is_file()
    assert (run / "grpo" / "final" / "argrpo.json").is_file()
    for stage in ("pretrain", "sft", "grpo"):
        res = json.loads((run / "eval" / stage / "results.json").read_text())
        assert 0.0 <= res["overall"] <= 1.0 and set(res["tags"]) == {
            "single_object", "two_object", "counting", "colors", "position", "color_attr"}
    report = run / "report"
    for name in ("index.html", "report.md", "grid.png", "reward_curves.png"):
        assert (report / name).is_file(), name
    md = (report / "report.md").read_text()
    assert all(f"| {s} |" in md for s in ("pretrain", "sft", "grpo"))
    assert "| pretrain |" in capsys.readouterr().out
    first = json.loads((run / "timings.json").read_text())
    assert set(first) == {"tokenizer", "pretrain", "sft", "grpo", "eval", "report"}

    # a second run finds every stage done and only rewrites the report
    assert main(["pipeline", str(path)]) == 0
    assert set(json.loads((run / "timings.json").read_text())) == {"report"}


def test_unknown_stage_in_overrides_is_refused(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("overrides: {pretrian: [train.max_steps=1]}\n")
    assert main(["pipeline", str(path)]) == 2
    assert "pretrian" in capsys.readouterr().err
