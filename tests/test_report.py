import json

import numpy as np
from argrpo.grpo.report import StageScores, comparison_grid, markdown_table, read_metrics, write_report


def _stages():
    return [
        StageScores("pretrain", 0.1, 0.02, {"counting": (0.05, 0.01), "position": (0.0, 0.0)}, {"cfg_scale": 1.0}, 400),
        StageScores("sft", 0.4, 0.03, {"counting": (0.35, 0.05), "position": (0.2, 0.04)}, {"cfg_scale": 1.0}, 400),
    ]


def test_markdown_table_rows_and_values():
    md = markdown_table(_stages())
    lines = md.splitlines()
    assert len(lines) == 4
    assert "counting" in lines[0] and "position" in lines[0]
    assert "0.400 ± 0.030" in lines[3] and lines[3].startswith("| sft")


def test_write_report_files(tmp_path):
    metrics = tmp_path / "m.jsonl"
    metrics.write_text("\n".join(json.dumps({"step": i, "reward": i / 10, "kl": i / 100}) for i in range(5)))
    curves = {"seed0": read_metrics(metrics)}
    imgs = {s: np.random.randint(0, 255, (3, 2, 16, 16, 3), dtype=np.uint8) for s in ("pretrain", "sft")}
    grid = comparison_grid(imgs, ["a photo of a circle", "two squares", "x"])
    html_path, md = write_report(tmp_path / "rep", _stages(), curves, grid)
    out = tmp_path / "rep"
    assert html_path.is_file() and (out / "grid.png").is_file() and (out / "reward_curves.png").is_file()
    assert (out / "kl_curves.png").is_file()
    page = html_path.read_text()
    assert "grid.png" in page and "reward_curves.png" in page and "0.400" in page
    assert (out / "report.md").read_text() == md


def test_read_metrics_names_bad_row(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 0}\nnot json\n')
    try:
        read_metrics(p)
    except ValueError as e:
        assert "row 2" in str(e) and str(p) in str(e)
    else:
        raise AssertionError("bad row accepted")
