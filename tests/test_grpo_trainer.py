"""The GRPO learner end to end on a tiny shapes policy: TRL's GRPOTrainer, the in-process rollout pool, real rewards."""

from __future__ import annotations

import json
import math

import pytest
import torch
from argrpo.config import load_config
from argrpo.grpo.config import GRPORunConfig
from argrpo.grpo.trainer import build_run, keep_nonzero_advantage, train
from grpo_fixtures import run_overrides, shared_world
from transformers import TrainerCallback


@pytest.fixture(scope="module")
def world():
    return shared_world()


@pytest.fixture
def plugins(world, monkeypatch):
    monkeypatch.syspath_prepend(str(world["plugins"]))


def make_cfg(world, out, **kw) -> GRPORunConfig:
    return load_config(GRPORunConfig, None, run_overrides(world, out, **kw))


def train_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "reward" in h]


def metrics_rows(out) -> list[dict]:
    """The rows a run wrote to ``out/metrics.jsonl``, one per optimizer step."""
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_full_step_changes_every_trained_weight_and_syncs(world, plugins, tmp_path):
    run = build_run(make_cfg(world, tmp_path, **{"grpo.max_steps": 2}))
    model = run.trainer.model
    before = snapshot(model)
    pushes = []
    load = run.pool.load_weights
    run.pool.load_weights = lambda sd, version, adapter=False: (pushes.append((set(sd), version, adapter)),
                                                                load(sd, version, adapter))[1]
    try:
        run.trainer.train()
    finally:
        run.close()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert trained and changed == trained
    logs = train_logs(run.trainer)
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert logs[0]["reward_std"] > 0  # the plugin reward separates samples
    # version 0 before the first rollout, version 1 after the first optimizer step; never the last step's weights
    assert [v for _, v, _ in pushes] == [0, 1]
    assert all(not a and "lm_head.weight" in keys for keys, _, a in pushes)
    assert run.pool.version == 1
    for key in ("time/rollout", "time/reward", "time/learn", "time/sync", "time/step", "time/decode",
                "advantages/std", "entropy", "clip_ratio/region_mean", "frac_reward_zero_std",
                "rewards/redness/mean", "rewards/redness/std"):
        assert key in logs[0], key
    lines = metrics_rows(tmp_path)
    assert [x["step"] for x in lines] == [1, 2] and "time/learn" in lines[0]


def test_lora_step_changes_only_adapters_and_syncs_adapter_tensors(world, plugins, tmp_path):
    cfg = make_cfg(world, tmp_path, **{"policy.lora.enabled": True, "policy.lora.r": 4, "grpo.beta": 0.04,
                                       "grpo.max_steps": 2})
    run = build_run(cfg)
    model = run.trainer.model
    assert "ref" not in model.peft_config  # KL reference = the same model with its adapter disabled
    before = snapshot(model)
    pushes = []
    load = run.pool.load_weights
    run.pool.load_weights = lambda sd, version, adapter=False: (pushes.append((set(sd), adapter)),
                                                                load(sd, version, adapter))[1]
    try:
        run.trainer.train()
    finally:
        run.close()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)
    assert all(adapter and keys and all("lora_" in k for k in keys) for keys, adapter in pushes)
    logs = train_logs(run.trainer)
    assert all(math.isfinite(h["kl"]) and h["kl"] >= 0 for h in logs)
    assert logs[-1]["kl"] > 0  # the adapter moved away from the reference


def test_step0_importance_ratio_is_one_without_cfg(world, plugins, tmp_path):
    run = build_run(make_cfg(world, tmp_path, **{"grpo.max_steps": 1, "correction.mode": "always"}))
    try:
        run.trainer.train()
    finally:
        run.close()
    log = train_logs(run.trainer)[0]
    assert abs(log["sampling/importance_sampling_ratio/min"] - 1) < 1e-4
    assert abs(log["sampling/importance_sampling_ratio/max"] - 1) < 1e-4
    assert log["sampling/sampling_logp_difference/max"] < 1e-4


def test_cfg_rollouts_are_corrected_and_logged(world, plugins, tmp_path):
    losses = {}
    for mode in ("auto", "never"):
        cfg = make_cfg(world, tmp_path / mode, **{"grpo.max_steps": 1, "rollout.sampling.cfg_scale": 3.0,
                                                  "correction.mode": mode, "correction.cap": 2.0})
        assert cfg.use_correction == (mode == "auto")  # CFG switches the correction on by itself
        run = build_run(cfg)
        try:
            run.trainer.train()
        finally:
            run.close()
        log = train_logs(run.trainer)[0]
        losses[mode] = log["loss"]
        if mode == "auto":
            assert log["sampling/sampling_logp_difference/mean"] > 1e-3
            assert log["sampling/importance_sampling_ratio/min"] < 0.99
            assert log["sampling/importance_sampling_ratio/max"] <= 2.0 + 1e-6  # truncated at the cap
        else:
            assert "sampling/importance_sampling_ratio/mean" not in log
    # the same samples (seeded) and advantages; only the per-token weights differ
    assert losses["auto"] != pytest.approx(losses["never"], abs=1e-7)


def test_async_mode_trains_one_step_off_policy(world, plugins, tmp_path):
    run = build_run(make_cfg(world, tmp_path, **{"rollout.mode": "async", "grpo.max_steps": 3}))
    try:
        run.trainer.train()
    finally:
        run.close()
    logs = train_logs(run.trainer)
    assert [h["rollout/staleness"] for h in logs] == [0, 1, 1]
    assert run.source.prefetch_hits == 2 and run.source.prefetch_misses == 0
    assert run.source.generations == [0, 1, 2]
    assert all("sampling/importance_sampling_ratio/mean" in h for h in logs)  # async switches the correction on
    assert all(math.isfinite(h["loss"]) for h in logs)


class _Crash(TrainerCallback):
    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt("simulated crash")


def test_resume_continues_from_same_step_and_data_position(world, plugins, tmp_path):
    kw = {"grpo.max_steps": 4, "checkpoint.every": 2, "checkpoint.keep": 1}
    full = build_run(make_cfg(world, tmp_path / "full", **kw))
    try:
        full.trainer.train()
    finally:
        full.close()

    out = tmp_path / "resumed"
    crashed = build_run(make_cfg(world, out, **kw))
    crashed.trainer.add_callback(_Crash(at=3))
    with pytest.raises(KeyboardInterrupt):
        crashed.trainer.train()
    crashed.close()
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-0000002"]

    resumed = build_run(make_cfg(world, out, **kw))
    try:
        resumed.trainer.train(resume_from_checkpoint=str(out / "checkpoints" / "step-0000002"))
    finally:
        resumed.close()
    assert resumed.trainer.state.global_step == 4
    assert full.source.generations == [0, 1, 2, 3]
    assert resumed.source.generations == [2, 3]  # the same data position
    a, b = snapshot(full.trainer.model), snapshot(resumed.trainer.model)
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6), n
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    full_rows = metrics_rows(tmp_path / "full")
    assert [r["reward"] for r in rows] == pytest.approx([r["reward"] for r in full_rows], abs=1e-6)


def test_equal_rewards_give_zero_advantage_and_none_rewards_are_skipped(world, plugins, tmp_path):
    cfg = make_cfg(world, tmp_path, **{
        "grpo.max_steps": 1, "grpo.scale_rewards": "group",
        "rewards": "[{name: 'user_rewards:constant'}, {name: 'user_rewards:nothing'}]"})
    run = build_run(cfg)
    try:
        run.trainer.train()
    finally:
        run.close()
    log = train_logs(run.trainer)[0]
    assert log["advantages/frac_zero"] == 1.0 and log["advantages/abs_mean"] == 0.0
    assert log["frac_reward_zero_std"] == 1.0
    assert log["rewards/nothing/skipped"] == 1.0 and log["rewards/nothing/mean"] is None
    assert log["rewards/constant/skipped"] == 0.0
    assert math.isfinite(log["loss"]) and math.isfinite(log["grad_norm"])


def test_keep_nonzero_advantage_keeps_every_informative_row_in_order():
    adv = torch.tensor([0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 2.0, 0.0])
    batch = {"advantages": adv, "completion_ids": torch.arange(8).reshape(8, 1), "texts": list("abcdefgh"),
             "num_items_in_batch": torch.tensor(8.0), "old_per_token_logps": None}
    out = keep_nonzero_advantage(batch, multiple=2)
    # rows 1, 3, 6 are informative; one zero row (the first, 0) pads them to a multiple of 2
    assert out["completion_ids"].reshape(-1).tolist() == [0, 1, 3, 6]
    assert out["texts"] == ["a", "b", "d", "g"] and out["advantages"].tolist() == [0.0, 1.0, -1.0, 2.0]
    assert out["num_items_in_batch"] is batch["num_items_in_batch"] and out["old_per_token_logps"] is None
    assert keep_nonzero_advantage({"advantages": torch.zeros(8)}, multiple=4)["advantages"].numel() == 4
    assert keep_nonzero_advantage({"advantages": torch.ones(8)}, multiple=4)["advantages"].numel() == 8


@pytest.mark.parametrize("reward, rows_per_step", [("redness", 8), ("constant", 1)])
def test_skip_zero_advantage_learns_only_on_informative_rows(world, plugins, tmp_path, reward, rows_per_step):
    """redness: every completion informative, nothing dropped; constant: every group ties, so each of the two
    micro-batches holds one (zero) row instead of eight."""
    cfg = make_cfg(world, tmp_path, **{"grpo.max_steps": 2, "grpo.steps_per_generation": 2,
                                       "grpo.skip_zero_advantage": True,
                                       "rewards": f"[{{name: 'user_rewards:{reward}'}}]"})
    run = build_run(cfg)
    seen = []
    compute_loss = run.trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        seen.append(inputs["advantages"].numel())
        return compute_loss(model, inputs, *args, **kwargs)

    run.trainer.compute_loss = recording
    try:
        run.trainer.train()
    finally:
        run.close()
    assert seen == [rows_per_step, rows_per_step]
    assert train_logs(run.trainer)[0]["advantages/kept"] == 2 * rows_per_step


def test_train_entry_point_with_plugin_reward_from_yaml(world, plugins, tmp_path):
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(
        "# argrpo grpo run.yaml\n"
        f"output_dir: {tmp_path / 'out'}\n"
        f"policy: {{checkpoint: {world['policy']}}}\n"
        "rewards:\n  - {name: 'user_rewards:redness', weight: 2.0}\n"
        f"data: {{train_prompts: {world['train']}}}\n"
        "rollout: {num_workers: 0}\n"
        "grpo: {num_generations: 4, per_device_train_batch_size: 8, max_steps: 12, learning_rate: 0.01}\n"
        "logging: {report_to: [tensorboard], image_every: 6, progress: false}\n"
    )
    cfg = load_config(GRPORunConfig, yaml_path, ["threads=1"])
    summary = train(cfg)
    out = tmp_path / "out"
    assert summary["steps"] == 12 and summary["final"] == str(out / "final")
    assert (out / "final" / "argrpo.json").is_file() and (out / "final" / "model.safetensors").is_file()
    assert sorted(p.name for p in (out / "images").iterdir()) == ["step-0000001.png", "step-0000006.png", "step-0000012.png"]
    # the plugin is what the policy learns to raise
    redness = [r["rewards/redness/mean"] for r in metrics_rows(out)]
    assert len(redness) == 12 and sum(redness[-3:]) / 3 > sum(redness[:3]) / 3 + 0.2, redness
    assert any((out / "tensorboard").iterdir())
    assert summary["last"]["rewards/redness/mean"] * 2.0 == pytest.approx(summary["last"]["reward"], abs=1e-6)
    from argrpo.models.policy import load_policy

    loaded = load_policy(out / "final")
    assert loaded.layout == world["layout"]


def test_ray_rollout_workers_and_reward_actors(world, plugins, tmp_path, ray_cluster):
    """The same run on real Ray: one rollout actor (async, so it samples while the learner trains) and one reward
    actor per reward, all rewards of a batch scored concurrently; per-reward metrics still come out."""
    cfg = make_cfg(world, tmp_path, **{
        "rollout.num_workers": 1, "rollout.mode": "async", "grpo.max_steps": 2, "reward_actors": True,
        "rewards": "[{name: 'user_rewards:redness', weight: 1.0}, {name: geneval_dense, weight: 0.5}]"})
    run = build_run(cfg)
    try:
        run.trainer.train()
    finally:
        run.close()
    logs = train_logs(run.trainer)
    assert [h["rollout/staleness"] for h in logs] == [0, 1]
    for h in logs:
        assert h["reward"] == pytest.approx(h["rewards/redness/mean"] + 0.5 * h["rewards/geneval_dense/mean"],
                                            abs=1e-5)
        assert math.isfinite(h["loss"])
    assert run.source.prefetch_hits == 1


def test_periodic_heldout_evaluation_is_logged(world, plugins, tmp_path):
    cfg = make_cfg(world, tmp_path, **{
        "grpo.max_steps": 2, "eval.every": 2, "eval.prompts": str(world["heldout"]), "eval.limit": 3,
        "eval.settings": "{sampling: {n: 2, seed: 0, temperature: 1.0}, progress: false}"})
    run = build_run(cfg)
    try:
        run.trainer.train()
    finally:
        run.close()
    history = run.callbacks["eval"].history
    assert [s for s, _ in history] == [0, 2]  # before training, then every 2 steps
    assert all(0.0 <= v["score"] <= 1.0 and "score_se" in v for _, v in history)
    logs = train_logs(run.trainer)
    assert "eval/score" in logs[0] and "eval/score" in logs[1] and "time/eval" in logs[1]
    assert logs[1]["eval/score"] == history[1][1]["score"]
    # every curve the report draws is a field the learner really logs (beta 0 here: no kl)
    from argrpo.grpo.report import EVAL_CURVES, POLICY_CURVES, REWARD_CURVES

    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in REWARD_CURVES + POLICY_CURVES + EVAL_CURVES:
        if key != "kl" and not (key.startswith("sampling/") and not cfg.use_correction):
            assert any(key in r for r in rows), key
