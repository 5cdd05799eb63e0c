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
        assert proc.returncode == 0, proc.stderr[-6000:]
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
