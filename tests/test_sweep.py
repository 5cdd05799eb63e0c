"""`argrpo sweep` on a real local Ray cluster: every trial runs, a failing trial is reported, the others finish."""

import json
import os
from pathlib import Path

from argrpo.recipes.commands.sweep import expand_trials, parse_grid, sweep
from grpo_fixtures import run_overrides, shared_world

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "shapes" / "grpo.yaml"


def test_grid_parsing_and_product():
    grid = parse_grid(["grpo.beta=0,0.04", "grpo.learning_rate=1e-5,3e-5"])
    assert grid == {"grpo.beta": [0, 0.04], "grpo.learning_rate": [1e-5, 3e-5]}
    trials = expand_trials(grid, seeds=2)
    assert len(trials) == 8 and len({t["name"] for t in trials}) == 8
    assert {t["seed"] for t in trials} == {0, 1}


def test_sweep_runs_trials_and_reports_a_failure(ray_cluster, tmp_path, monkeypatch):
    """A beta sweep over the shipped shapes recipe: beta 0 and 0.04 both run (skip_zero_advantage: auto), an
    invalid beta is reported as that trial's failure. Paths in the config are relative to where the sweep starts,
    as they are for `argrpo grpo` (Tune runs each trial in a directory of its own)."""
    world = shared_world()
    monkeypatch.syspath_prepend(str(world["plugins"]))
    monkeypatch.setenv("PYTHONPATH", str(world["plugins"]))
    monkeypatch.chdir(tmp_path)
    base = [f"policy.checkpoint={os.path.relpath(v.split('=', 1)[1], tmp_path)}"
            if v.startswith("policy.checkpoint=") else v for v in run_overrides(world, tmp_path / "unused")]
    base += ["eval.every=2", f"eval.prompts={world['heldout']}", "eval.limit=2",
             "eval.settings={sampling: {n: 2, seed: 0, temperature: 1.0}, progress: false}",
             "grpo.steps_per_generation=1", "checkpoint.every=0", "logging.report_to=[]"]
    assert any(v.startswith("policy.checkpoint=..") for v in base)
    rows = sweep(
        config_path=str(RECIPE), grid={"grpo.beta": [0, 0.04, -1]}, seeds=1,
        out_dir="sweep", base_overrides=base, cpus_per_trial=1, gpus_per_trial=0,
    )
    by_beta = {r["grpo.beta"]: r for r in rows}
    for beta in (0, 0.04):
        ok = by_beta[beta]
        assert ok["status"] == "ok" and ok["steps"] == 2, ok
        assert isinstance(ok["final_reward"], float)
        assert 0.0 <= ok["final_score"] <= 1.0 and ok["best_score"] >= ok["final_score"]
    assert by_beta[-1]["status"] == "failed" and "beta must be >= 0" in by_beta[-1]["error"]
    out = tmp_path / "sweep"
    assert (out / "sweep.md").read_text().count("\n") == 5
    assert json.loads((out / "sweep.json").read_text())[0]["trial"]
    assert (out / "curves.png").is_file()
