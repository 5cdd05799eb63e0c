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
from argrpo.config import load_config
from argrpo.grpo.config import GRPORunConfig
from argrpo.grpo.trainer import build_run
from grpo_fixtures import run_overrides, shared_world
from safetensors.torch import load_file

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
    {"kind": "random", "max_delay_s": 0.3},  # within the third new step: the child is always mid-run
    {"kind": "during_delete"},  # an old checkpoint renamed aside and half deleted
    {"kind": "random", "max_delay_s": 0.3},
]


def run_kill_driver(tmp_path: Path, spec: dict) -> dict:
    spec = {**spec, "output_dir": str(tmp_path / "run" / "out"), "reference_dir": str(tmp_path / "ref" / "out"),
            "kills": KILLS, "seed": 0, "timeout_s": 600}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    report_path = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    proc = subprocess.run([sys.executable, str(HERE / "kill_driver.py"), str(tmp_path / "spec.json"),
                           str(report_path)], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(report_path.read_text())


def check_kill_report(report: dict, prefix: str, steps: int, keep: int) -> None:
    """After every kill: a complete checkpoint to resume from, and the one being written or deleted when the
    process died is not among those that count. At the end: each step logged once, killed writers' temp dirs
    swept, and a resume of the finished run trains nothing."""
    for kill, entry in zip(KILLS, report["kills"]):
        assert entry["killed"], entry
        assert entry["checkpoints"], entry
        if kill["kind"] in ("during_write", "during_delete"):
            step = int(re.search(rf"/\.{prefix}(\d+)\.tmp-", entry["marker"]).group(1))
            hidden = [e for e in entry["entries"] if e.startswith(".")]
            assert any(re.match(rf"\.{prefix}0*{step}\.tmp-", h) for h in hidden), entry
            assert step not in entry["checkpoints"], entry  # half-written / half-deleted: does not count
    assert report["kills"][0]["checkpoints"] == [1]
    final, again = report["final"], report["again"]
    assert final["exit"] == 0 and report["reference"]["exit"] == 0 and again["exit"] == 0
    assert final["steps_logged"] == list(range(1, steps + 1))  # every step once, none lost or repeated
    assert report["reference"]["steps_logged"] == final["steps_logged"]
    assert final["checkpoints"] == list(range(steps - keep + 1, steps + 1))
    assert [e for e in final["entries"] if e.startswith(".")] == []  # killed writers' temp dirs were swept
    assert again["steps_logged"] == final["steps_logged"] and again["checkpoints"] == final["checkpoints"]


def assert_same_weights(a_file: Path, b_file: Path) -> None:
    a, b = load_file(str(a_file)), load_file(str(b_file))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_grpo_sigkill_at_any_moment_leaves_the_last_checkpoint_loadable_and_resume_matches(world, tmp_path):
    """The GRPO learner is SIGKILLed four times (inside a checkpoint write, inside an old checkpoint's deletion,
    and at two seeded random moments after a step), resumed each time, then run to the end and resumed once more.
    After every kill each directory that counts as a checkpoint loads completely; half-written and half-deleted
    ones never count. The finished run logs each step once, a resume of it trains nothing, and it ends with the
    weights and rewards of a run that was never killed."""
    steps = 10
    overrides = run_overrides(world, tmp_path / "unused", **{
        "grpo.max_steps": steps, "checkpoint.every": 1, "checkpoint.keep": 2, "checkpoint.save_final": True})
    report = run_kill_driver(tmp_path, {"stage": "grpo", "sys_path": [str(world["plugins"])],
                                        "overrides": [o for o in overrides if not o.startswith("output_dir=")]})
    check_kill_report(report, "step-", steps, keep=2)
    out, ref = tmp_path / "run" / "out", tmp_path / "ref" / "out"
    assert_same_weights(out / "final" / "model.safetensors", ref / "final" / "model.safetensors")
    assert [r["reward"] for r in metrics(out)] == pytest.approx([r["reward"] for r in metrics(ref)], abs=1e-6)


def test_pretrain_sigkill_at_any_moment_leaves_the_last_checkpoint_loadable_and_resume_matches(vq_dir, tmp_path):
    """The same four kills for pretraining (Trainer's checkpoint-N directories, written atomically by
    grpo.lm_stage): every checkpoint that counts loads, the log history holds each step once, a finished run
    resumes to nothing, and the published policy equals an unkilled run's."""
    steps = 10
    overrides = [f"image_tokenizer={vq_dir}", f"cache_dir={tmp_path / 'cache'}", "policy.size=tiny",
                 "data.shapes_n=48", "caption_dropout=0.2", f"train.max_steps={steps}", "train.batch_size=16",
                 "train.save_steps=1", "train.save_total_limit=2", "train.logging_steps=1", "train.report_to=[]",
                 "train.learning_rate=0.003", "train.bf16=false", "train.threads=1"]
    report = run_kill_driver(tmp_path, {"stage": "pretrain", "overrides": overrides})
    check_kill_report(report, "checkpoint-", steps, keep=2)
    assert_same_weights(tmp_path / "run" / "out" / "model.safetensors", tmp_path / "ref" / "out" / "model.safetensors")
