"""`argrpo sweep` on a real local Ray cluster: every trial runs, a failing trial is reported, the others finish."""

import json
import os

from argrpo.recipes.commands.sweep import expand_trials, parse_grid, sweep
from grpo_fixtures import run_overrides, shared_world


def test_grid_parsing_and_product():
    grid = parse_grid(["grpo.beta=0,0.04", "grpo.learning_rate=1e-5,3e-5"])
    assert grid == {"grpo.beta": [0, 0.04], "grpo.learning_rate": [1e-5, 3e-5]}
    trials = expand_trials(grid, seeds=2)
    assert len(trials) == 8 and len({t["name"] for t in trials}) == 8
    assert {t["seed"] for t in trials} == {0, 1}


def test_sweep_runs_trials_and_reports_a_failure(ray_cluster, tmp_path, monkeypatch):
    """Paths in the config are relative to where the sweep starts, as they are for `argrpo grpo` (Tune runs each
    trial in a directory of its own)."""
    world = shared_world()
    monkeypatch.syspath_prepend(str(world["plugins"]))
    monkeypatch.setenv("PYTHONPATH", str(world["plugins"]))
    monkeypatch.chdir(tmp_path)
    base = [f"policy.checkpoint={os.path.relpath(v.split('=', 1)[1], tmp_path)}"
            if v.startswith("policy.checkpoint=") else v for v in run_overrides(world, tmp_path / "unused")]
    base += ["eval.every=2", f"eval.prompts={world['heldout']}", "eval.limit=2",
             "eval.settings={sampling: {n: 2, seed: 0, temperature: 1.0}, progress: false}"]
    assert any(v.startswith("policy.checkpoint=..") for v in base)
    rows = sweep(
        config_path=None, grid={"grpo.loss_type": ["grpo", "not_a_loss"]}, seeds=1,
        out_dir="sweep", base_overrides=base, cpus_per_trial=1, gpus_per_trial=0,
    )
    by_loss = {r["grpo.loss_type"]: r for r in rows}
    assert by_loss["grpo"]["status"] == "ok" and by_loss["grpo"]["steps"] == 2
    assert isinstance(by_loss["grpo"]["final_reward"], float)
    assert 0.0 <= by_loss["grpo"]["final_score"] <= 1.0 and by_loss["grpo"]["best_score"] >= by_loss["grpo"]["final_score"]
    assert by_loss["not_a_loss"]["status"] == "failed" and "loss" in by_loss["not_a_loss"]["error"]
    out = tmp_path / "sweep"
    assert (out / "sweep.md").read_text().count("\n") == 4
    assert json.loads((out / "sweep.json").read_text())[0]["trial"]
    assert (out / "curves.png").is_file()
