"""Faults during a run: actor processes killed mid-step (Ray restarts them and their work is redone), and the
learner killed with SIGKILL at chosen and random moments, checkpoint writes and deletions included."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo.config import GRPORunConfig
from grpo.trainer import build_run
from recipes.config import load_config

from grpo_fixtures import run_overrides, shared_world

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def world():
    return shared_world()


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---- actor faults -----------------------------------------------------------------------------------------------
def test_killed_rollout_and_reward_actors_are_restarted_and_the_run_is_unchanged(world, tmp_path, monkeypatch,
                                                                                  ray_cluster):
    """A GRPO run on Ray: the rollout actor's process is SIGKILLed while it samples step 2, the reward actor's while
    it scores step 3. Ray restarts both, the pool re-sends the weights and redoes the chunk, the reward call is sent
    again: the run has exactly the steps, logged rewards and weights of the same run without faults (rows use
    per-sample seeds, so in-process rollouts give the same samples)."""
    monkeypatch.syspath_prepend(str(world["plugins"]))
    kw = {"grpo.max_steps": 3}
    clean = build_run(load_config(GRPORunConfig, None, run_overrides(world, tmp_path / "clean", **kw)))
    try:
        clean.trainer.train()
    finally:
        clean.close()

    ray_kw = {**kw, "rollout.num_workers": 1, "reward_actors": True}
    run = build_run(load_config(GRPORunConfig, None, run_overrides(world, tmp_path / "faulty", **ray_kw)))
    pool = run.pool
    rewards = run.trainer.reward_funcs[0].reward.shared.pool
    killed = {}

    def reward_pid() -> int:
        (pid,) = rewards.pids().values()
        return pid

    generate_async = pool.generate_async

    def generate_then_kill(*args, **kwargs):
        if run.trainer.state.global_step != 1 or "rollout" in killed:
            return generate_async(*args, **kwargs)
        pid = pool.worker_pids()[0]  # asked first: the actor answers only after the call it is busy with
        fut = generate_async(*args, **kwargs)  # step 2's samples
        os.kill(pid, signal.SIGKILL)
        killed["rollout"] = pid
        return fut

    submit = rewards.submit

    def submit_then_kill(*args, **kwargs):
        if run.trainer.state.global_step != 2 or "reward" in killed:
            return submit(*args, **kwargs)
        pid = reward_pid()
        pending = submit(*args, **kwargs)  # step 3's scores
        os.kill(pid, signal.SIGKILL)
        killed["reward"] = pid
        return pending

    pool.generate_async = generate_then_kill
    rewards.submit = submit_then_kill
    try:
        run.trainer.train()
        after = {"rollout": pool.worker_pids()[0], "reward": reward_pid()}
        resends = pool._resends
    finally:
        run.close()

    assert set(killed) == {"rollout", "reward"}
    assert after["rollout"] != killed["rollout"] and after["reward"] != killed["reward"]  # restarted processes
    assert resends >= 1  # the rebuilt rollout worker got the current weights before redoing its chunk
    assert run.trainer.state.global_step == clean.trainer.state.global_step == 3
    got, want = metrics(tmp_path / "faulty"), metrics(tmp_path / "clean")
    assert [r["step"] for r in got] == [1, 2, 3]  # no step lost, none counted twice
    assert [r["reward"] for r in got] == pytest.approx([r["reward"] for r in want], abs=1e-6)
    a, b = weights(run.trainer.model), weights(clean.trainer.model)
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6), n


# ---- learner faults ---------------------------------------------------------------------------------------------
KILLS = [
    {"kind": "during_write", "min_step": 2},  # step 1 complete, step 2 half-written
    {"kind": "random", "max_delay_s": 0.3},  # a step takes longer than that: the child is always mid-run
    {"kind": "during_delete"},  # an old checkpoint renamed aside and half deleted
    {"kind": "random", "max_delay_s": 0.3},
]


def test_sigkill_at_any_moment_leaves_the_last_checkpoint_loadable_and_resume_matches(world, tmp_path):
    """The learner is SIGKILLed four times (inside a checkpoint write, inside an old checkpoint's deletion, and
    at two seeded random moments after a step), resumed each time, then run to the end and resumed once more.
    After every kill each directory that counts as a checkpoint loads completely; half-written and half-deleted
    ones never count. The finished run logs each step once, a resume of it trains nothing, and it ends with the
    weights and rewards of a run that was never killed."""
    steps = 10
    overrides = run_overrides(world, tmp_path / "unused", **{
        "grpo.max_steps": steps, "checkpoint.every": 1, "checkpoint.keep": 2, "checkpoint.save_final": True})
    overrides = [o for o in overrides if not o.startswith("output_dir=")]
    spec = {"overrides": overrides, "plugins": str(world["plugins"]), "output_dir": str(tmp_path / "run" / "out"),
            "reference_dir": str(tmp_path / "ref" / "out"), "kills": KILLS, "seed": 0, "timeout_s": 600}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    report_path = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    proc = subprocess.run([sys.executable, str(HERE / "kill_driver.py"), str(tmp_path / "spec.json"),
                           str(report_path)], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(report_path.read_text())

    for kill, entry in zip(KILLS, report["kills"]):
        assert entry["killed"], entry
        assert entry["checkpoints"], entry  # there is always a complete one to resume from
        hidden = [e for e in entry["entries"] if e.startswith(".")]
        if kill["kind"] in ("during_write", "during_delete"):
            step = int(re.search(r"\.step-(\d+)\.tmp-", Path(entry["marker"]).name).group(1))
            assert any(h.startswith(f".step-{step:07d}.tmp-") for h in hidden), entry
            assert step not in entry["checkpoints"], entry  # the half-written / half-deleted one does not count
    first = report["kills"][0]
    assert first["checkpoints"] == [1]

    final = report["final"]
    assert final["exit"] == 0 and report["reference"]["exit"] == 0
    assert final["steps_logged"] == list(range(1, steps + 1))  # every step once, none lost or repeated
    assert final["checkpoints"] == [steps - 1, steps]
    assert [e for e in final["entries"] if e.startswith(".")] == []  # killed writers' temp dirs were swept
    again = report["again"]  # --resume of the finished run: nothing more is trained
    assert again["exit"] == 0 and again["steps_logged"] == final["steps_logged"]
    assert again["checkpoints"] == final["checkpoints"]

    out, ref = tmp_path / "run" / "out", tmp_path / "ref" / "out"
    a, b = load_file(str(out / "final" / "model.safetensors")), load_file(str(ref / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert [r["reward"] for r in metrics(out)] == pytest.approx([r["reward"] for r in metrics(ref)], abs=1e-6)
