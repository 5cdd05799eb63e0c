"""The sharded learner (FSDP2) on 2 processes over gloo on CPU, against the DDP learner, launched as users launch
it: ``torch.distributed.run`` (tests/fsdp_grpo.py is one rank).

Tolerance: FSDP2 and DDP must end a 3-step run with weights within 1e-6 (absolute) and with identical rollouts.
Both average the same two per-rank gradients (DDP's all-reduce and FSDP2's reduce-scatter add two float32 addends
and halve them: exact in any order); the one computation whose order differs is the gradient norm for clipping
(FSDP2 sums squares per shard, then over shards), a relative change of about 1e-7 in one scalar that scales every
gradient alike, which AdamW's m / sqrt(v) all but cancels. Updates are up to lr = 0.01 per step, so 1e-6 is 1e-4
of one step's largest change: any real difference (a missed gradient, a shard applied twice, stale pushed weights)
is orders above it. Measured here: identical (0.0).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from grpo_fixtures import run_overrides, shared_world

TESTS = Path(__file__).resolve().parent
NPROC, STEPS, ATOL = 2, 3, 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node 2 script args...`` with one thread per rank."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(NPROC),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def failure(proc: subprocess.CompletedProcess) -> str:
    """The error lines of every rank (the launcher's summary alone names no cause), then the end of stderr."""
    errors = [line for line in proc.stderr.splitlines() if "Error" in line and "elastic" not in line]
    return "\n".join(errors[:20]) + "\n...\n" + proc.stderr[-3000:]


def world_json(tmp: Path) -> Path:
    world = shared_world()
    path = tmp / "world.json"
    path.write_text(json.dumps({k: str(world[k]) for k in ("policy", "train", "plugins")}))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    wj = world_json(tmp)
    out = {}
    for strategy in ("ddp", "fsdp"):
        proc = launch(TESTS / "fsdp_grpo.py", wj, tmp / strategy, strategy)
        assert proc.returncode == 0, failure(proc)
        out[strategy] = (tmp / strategy, [json.loads((tmp / strategy / f"rank{r}.json").read_text())
                                          for r in range(NPROC)])
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_fsdp_ends_with_the_ddp_weights_and_the_same_rollouts(runs):
    (ddp, ddp_ranks), (fsdp, fsdp_ranks) = runs["ddp"], runs["fsdp"]
    assert [r["steps"] for r in fsdp_ranks] == [STEPS] * NPROC
    for a, b in zip(ddp_ranks, fsdp_ranks):
        assert [s["step"] for s in b["scored"]] == [s["step"] for s in a["scored"]]
        assert b["scored"] == a["scored"]  # same samples at every step: the pushed weights agree too
    a, b = _weights(ddp / "run" / "final" / "model.safetensors"), _weights(fsdp / "run" / "final" / "model.safetensors")
    start = _weights(Path(shared_world()["policy"]) / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=ATOL, msg=k)
    moved = max(float((a[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3  # training changed the weights, by far more than the tolerance


def test_final_policy_of_a_sharded_run_loads_with_transformers(runs):
    from transformers import AutoModelForCausalLM

    fsdp, ranks = runs["fsdp"]
    final = fsdp / "run" / "final"
    assert ranks[0]["final"] == str(final) and ranks[1]["final"] is None
    model = AutoModelForCausalLM.from_pretrained(str(final))
    saved = _weights(final / "model.safetensors")
    for name, p in model.state_dict().items():
        if name in saved:
            assert torch.equal(p, saved[name]), name
    assert not any(type(p).__name__ == "DTensor" for p in model.parameters())
    assert (final / "argrpo.json").is_file() and (final / "tokenizer.json").is_file()


def test_rollouts_from_pushed_shards_equal_one_process_engine_with_those_weights(runs, monkeypatch):
    """Step 1's samples on both ranks, concatenated, are what one in-process engine holding the gathered weights
    that were pushed after step 1 samples for generation 1 (same seeds)."""
    from argrpo.config import load_config
    from argrpo.grpo.config import GRPORunConfig
    from argrpo.grpo.rollouts import RolloutSource
    from argrpo.rollout.pool import LocalRolloutPool, RolloutConfig

    (ddp, _), (fsdp, ranks) = runs["ddp"], runs["fsdp"]
    pushed = _weights(fsdp / "pushed-1.safetensors")
    # every push is the full state dict (lm_head included, vLLM needs it), gathered on both ranks
    assert ranks[0]["pushes"] == ranks[1]["pushes"] and "lm_head.weight" in ranks[0]["pushes"][0]
    reference = _weights(ddp / "pushed-1.safetensors")
    for k in reference:
        torch.testing.assert_close(pushed[k], reference[k], rtol=0, atol=ATOL, msg=k)

    world = shared_world()
    monkeypatch.setenv("WORLD_SIZE", str(NPROC))
    cfg = load_config(GRPORunConfig, None, run_overrides(world, Path("unused"), **{
        "grpo.per_device_train_batch_size": 4}))
    G = cfg.grpo.num_generations
    step1 = [s for r in ranks for s in r["scored"] if s["step"] == 1]
    captions = [s["prompt"] for s in step1][::G]
    source = RolloutSource(None, None, cfg.rollout.sampling, G, captions, len(captions), seed=cfg.seed)
    with LocalRolloutPool(str(world["policy"]), RolloutConfig(num_workers=0, device="cpu")) as pool:
        pool.load_weights(pushed, 1)
        ro = pool.generate(captions, G, source._sampling(1))
    assert ro.weight_version == 1
    assert ro.completion_ids.tolist() == [s["ids"] for s in step1]


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """An FSDP run SIGKILLed (every rank) inside its step-2 checkpoint write, after each rank wrote its shards and
    before the rename; then resumed to step 3 with checkpoints every step."""
    from argrpo.grpo.checkpointing import list_checkpoints

    tmp = tmp_path_factory.mktemp("fsdp-kill")
    wj = world_json(tmp)
    every = {"checkpoint.every": 1, "checkpoint.keep": 2}
    (tmp / "kill.json").write_text(json.dumps({**every, "_kill_at": 2}))
    proc = launch(TESTS / "fsdp_grpo.py", wj, tmp / "run", "fsdp", tmp / "kill.json")
    assert proc.returncode != 0
    after_kill = [step for step, _ in list_checkpoints(tmp / "run" / "run" / "checkpoints")]
    (tmp / "resume.json").write_text(json.dumps({**every, "_resume": True}))
    proc = launch(TESTS / "fsdp_grpo.py", wj, tmp / "run", "fsdp", tmp / "resume.json")
    assert proc.returncode == 0, failure(proc)
    ranks = [json.loads((tmp / "run" / f"rank{r}-resumed.json").read_text()) for r in range(NPROC)]
    return tmp / "run", after_kill, ranks


def test_kill_9_mid_checkpoint_then_resume_equals_the_uninterrupted_run(runs, killed_and_resumed):
    from argrpo.grpo.checkpointing import is_sharded_checkpoint, list_checkpoints, read_run_state

    out, after_kill, ranks = killed_and_resumed
    assert after_kill == [1]  # the half-written step-2 checkpoint never became visible
    ckpts = list_checkpoints(out / "run" / "checkpoints")
    assert [s for s, _ in ckpts] == [2, 3]
    assert all(is_sharded_checkpoint(p) and read_run_state(p)["sharded"]["world_size"] == NPROC for _, p in ckpts)
    assert not [p for p in (out / "run" / "checkpoints").iterdir() if p.name.startswith(".")]  # temp dir swept
    uninterrupted_dir, uninterrupted = runs["fsdp"]
    for r in range(NPROC):
        assert ranks[r]["steps"] == STEPS
        # the resumed run sampled steps 1 and 2 exactly as the uninterrupted run did
        assert ranks[r]["scored"] == [s for s in uninterrupted[r]["scored"] if s["step"] >= 1]
    a = _weights(uninterrupted_dir / "run" / "final" / "model.safetensors")
    b = _weights(out / "run" / "final" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=ATOL, msg=k)


def test_export_consolidates_a_sharded_checkpoint_that_transformers_loads(killed_and_resumed, tmp_path):
    from argrpo.recipes.cli import main
    from transformers import AutoModelForCausalLM

    out, _, _ = killed_and_resumed
    assert main(["export", str(out / "run" / "checkpoints" / "step-0000003"), str(tmp_path / "export")]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    final = _weights(out / "run" / "final" / "model.safetensors")  # gathered from the live shards at the end
    state = model.state_dict()
    for k, v in final.items():
        assert torch.equal(state[k], v), k
    assert json.loads((tmp_path / "export" / "argrpo.json").read_text())["extra"]["grpo_step"] == STEPS


def test_resuming_shards_on_one_process_is_refused_naming_both_counts(killed_and_resumed, monkeypatch):
    from argrpo.config import load_config
    from argrpo.grpo.config import GRPORunConfig
    from argrpo.grpo.trainer import train

    out, _, _ = killed_and_resumed
    world = shared_world()
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    # the same global batch on one process (8 = 2 x 4), so only the process count differs
    cfg = load_config(GRPORunConfig, None, run_overrides(world, out / "run", **{
        "grpo.per_device_train_batch_size": 8, "grpo.max_steps": 4, "distributed.strategy": "fsdp"}))
    with pytest.raises(ValueError, match=r"FSDP shards by 2 learner processes; this run has 1 process"):
        train(cfg, resume=True)


# ---- LoRA -----------------------------------------------------------------------------------------------------------
LORA = {"policy.lora.enabled": True, "policy.lora.r": 4, "grpo.beta": 0.04, "grpo.learning_rate": 0.05}


def test_fsdp_lora_pushes_adapter_tensors_only_and_samples_like_one_process(tmp_path, monkeypatch):
    """LoRA on the sharded model (KL to the adapter-disabled model): every push holds the adapter's tensors only,
    gathered from the shards, and one process's engine given base + that adapter samples step 1 as the ranks did."""
    from argrpo.config import load_config
    from argrpo.grpo.config import GRPORunConfig
    from argrpo.grpo.rollouts import RolloutSource
    from argrpo.grpo.weight_sync import WorkerPolicy
    from argrpo.rollout.pool import LocalRolloutPool, RolloutConfig
    from transformers import AutoModelForCausalLM

    (tmp_path / "lora.json").write_text(json.dumps(LORA))
    proc = launch(TESTS / "fsdp_grpo.py", world_json(tmp_path), tmp_path / "lora", "fsdp", tmp_path / "lora.json")
    assert proc.returncode == 0, failure(proc)
    ranks = [json.loads((tmp_path / "lora" / f"rank{r}.json").read_text()) for r in range(NPROC)]
    assert ranks[0]["steps"] == STEPS and ranks[0]["pushes"] == ranks[1]["pushes"]
    keys = ranks[0]["pushes"][0]
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    pushed = _weights(tmp_path / "lora" / "pushed-1.safetensors")
    assert sorted(pushed) == keys
    assert max(float(v.abs().max()) for k, v in pushed.items() if ".lora_B." in k) > 0  # B starts at 0: trained

    world = shared_world()
    monkeypatch.setenv("WORLD_SIZE", str(NPROC))
    cfg = load_config(GRPORunConfig, None, run_overrides(world, Path("unused"), **{
        "grpo.per_device_train_batch_size": 4, **LORA}))
    G = cfg.grpo.num_generations
    step1 = [s for r in ranks for s in r["scored"] if s["step"] == 1]
    captions = [s["prompt"] for s in step1][::G]
    source = RolloutSource(None, None, cfg.rollout.sampling, G, captions, len(captions), seed=cfg.seed)
    policy = WorkerPolicy(str(world["policy"]), lora=cfg.policy.lora)
    with LocalRolloutPool(policy, RolloutConfig(num_workers=0, device="cpu")) as pool:
        pool.load_weights(pushed, 1, adapter=True)
        ro = pool.generate(captions, G, source._sampling(1))
    assert ro.completion_ids.tolist() == [s["ids"] for s in step1]

    final = tmp_path / "lora" / "run" / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    AutoModelForCausalLM.from_pretrained(str(final))  # base named in adapter_config.json + the adapter


# ---- pretrain / SFT ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_pretrain_and_sft_on_two_ranks_equal_one_process_on_the_same_global_batch(vq_dir, tmp_path, strategy):
    """2 ranks x 8 rows train as one process on 16 rows (the loss is a mean over the batch; FSDP2's reduce-scatter
    and DDP's all-reduce average the two ranks' gradients): same weights within ATOL after 3 pretraining steps
    (measured: 6e-8 for both). The loss calls the decoder itself, so it must still pass the wrapper's forward
    hooks: without them DDP never all-reduced and the ranks drifted apart (8.7e-3 here)."""
    from argrpo.config import load_config
    from argrpo.grpo.lm_stage import PretrainConfig, complete_checkpoints, run_lm_stage
    from argrpo.models.policy import load_policy
    from fsdp_lm_stage import overrides
    from transformers import AutoModelForCausalLM

    proc = launch(TESTS / "fsdp_lm_stage.py", vq_dir, tmp_path / "fsdp", strategy)
    assert proc.returncode == 0, failure(proc)
    ranks = [json.loads((tmp_path / "fsdp" / f"rank{r}.json").read_text()) for r in range(NPROC)]
    assert [r["pre"]["steps"] for r in ranks] == [3, 3] and [r["sft"]["steps"] for r in ranks] == [2, 2]
    # checkpoints (step 2, and the last step as Trainer adds); FSDP's hold shards, resumable by Trainer's own path
    ckpts = complete_checkpoints(tmp_path / "fsdp" / "pre")
    assert [p.name for p in ckpts] == ["checkpoint-2", "checkpoint-3"]
    sharded = [(p / "pytorch_model_fsdp_0").is_dir() and (p / "optimizer_0").is_dir() for p in ckpts]
    assert sharded == [strategy == "fsdp"] * 2
    # one directory per checkpoint holds every process's part (each rank's RNG state)
    assert all((p / f"rng_state_{r}.pth").is_file() for p in ckpts for r in range(NPROC))

    one = run_lm_stage(load_config(PretrainConfig, None, overrides(
        tmp_path / "one", str(vq_dir), tmp_path / "fsdp" / "cache", "ddp", steps=3, batch=8 * NPROC)))
    assert one.global_step == 3
    a, b = _weights(tmp_path / "one" / "model.safetensors"), _weights(tmp_path / "fsdp" / "pre" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=ATOL, msg=k)
    # both stages end as consolidated policies: argrpo loads them, so does transformers
    sft = load_policy(tmp_path / "fsdp" / "sft")
    pre = load_policy(tmp_path / "fsdp" / "pre")
    assert any(not torch.equal(v, pre.model.state_dict()[k]) for k, v in sft.model.state_dict().items())
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "fsdp" / "sft"))


@pytest.fixture(scope="module")
def janus_runs(tmp_path_factory):
    """The same 3-step run on a tiny Janus-Pro directory as transformers ships it, with CFG 3 rollouts, under DDP
    and under FSDP2."""
    from janus_fixtures import save_tiny_janus

    tmp = tmp_path_factory.mktemp("fsdp-janus")
    world = shared_world()
    wj = tmp / "world.json"
    wj.write_text(json.dumps({"policy": str(save_tiny_janus(tmp / "Janus-Pro-tiny")), "train": str(world["train"]),
                              "plugins": str(world["plugins"])}))
    (tmp / "cfg.json").write_text(json.dumps({"rollout.sampling.cfg_scale": 3.0}))
    out = {}
    for strategy in ("ddp", "fsdp"):
        proc = launch(TESTS / "fsdp_grpo.py", wj, tmp / strategy, strategy, tmp / "cfg.json")
        assert proc.returncode == 0, failure(proc)
        out[strategy] = (tmp / strategy, [json.loads((tmp / strategy / f"rank{r}.json").read_text())
                                          for r in range(NPROC)])
    return tmp / "Janus-Pro-tiny", out


def test_fsdp_trains_janus_as_ddp_does_and_saves_what_transformers_loads(janus_runs):
    from transformers import JanusForConditionalGeneration

    start_dir, runs = janus_runs
    (ddp, ddp_ranks), (fsdp, fsdp_ranks) = runs["ddp"], runs["fsdp"]
    assert [r["steps"] for r in fsdp_ranks] == [STEPS] * NPROC
    for a, b in zip(ddp_ranks, fsdp_ranks):
        assert b["scored"] == a["scored"]
    a, b = _weights(ddp / "run" / "final" / "model.safetensors"), _weights(fsdp / "run" / "final" / "model.safetensors")
    start = _weights(start_dir / "model.safetensors")
    assert sorted(a) == sorted(b) == sorted(start)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=ATOL, msg=k)
    head = "model.generation_head.vision_head.weight"
    assert float((b[head] - start[head]).abs().max()) > 1e-3  # the generation head trained, sharded
    assert all(torch.equal(b[k], start[k]) for k in start if k.startswith("model.vqmodel."))
    model = JanusForConditionalGeneration.from_pretrained(str(fsdp / "run" / "final"))
    assert not any(type(p).__name__ == "DTensor" for p in model.parameters())
    assert torch.equal(model.state_dict()[head], b[head])
