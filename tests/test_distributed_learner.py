"""The learner on 2 processes (DDP over gloo on CPU), launched as users launch it: ``torch.distributed.run``.

TRL 1.16 splits a generation this way: its RepeatSampler yields each of the generation's P prompts G times in a
row (P*G rows, the same order on every process), accelerate hands process r the contiguous rows
[r*B, (r+1)*B) (B = per_device_train_batch_size x steps_per_generation), each process scores its own rows, and the
rewards are gathered before group advantages are computed. With G=4 and B=6 on 2 processes, a step has 3 prompts
and the middle prompt's group is split 2 + 2 across the processes.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from grpo_fixtures import run_overrides, shared_world

TESTS = Path(__file__).resolve().parent
G, B, STEPS, NPROC = 4, 6, 2, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    world = shared_world()
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "world.json").write_text(json.dumps({k: str(world[k]) for k in ("policy", "train", "plugins")}))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(NPROC),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(TESTS / "distributed_grpo.py"), str(tmp / "world.json"), str(tmp / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    ranks = [json.loads((tmp / "out" / f"rank{r}.json").read_text()) for r in range(NPROC)]
    return world, tmp / "out", ranks


def test_both_ranks_end_with_the_same_changed_weights(two_process_run):
    _, out, ranks = two_process_run
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == NPROC for r in ranks)
    assert all(r["steps"] == STEPS for r in ranks)
    assert ranks[0]["before"] == ranks[1]["before"]
    assert ranks[0]["after"]["sha256"] == ranks[1]["after"]["sha256"]
    assert ranks[0]["after"]["sha256"] != ranks[0]["before"]["sha256"]  # training moved the weights
    # only the main process writes run files: one metrics line per step, one final policy
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, STEPS + 1))
    assert ranks[0]["final"] and ranks[1]["final"] is None
    assert (out / "run" / "final" / "argrpo.json").is_file()
    assert (out / "run" / "checkpoints" / f"step-{STEPS:07d}").is_dir()


def test_every_group_of_every_step_is_scored_exactly_once(two_process_run, monkeypatch):
    world, _, ranks = two_process_run
    from argrpo.config import load_config
    from argrpo.grpo.config import GRPORunConfig
    from argrpo.grpo.prompts import load_prompts, prompt_stream
    from argrpo.grpo.trainer import generations_needed

    monkeypatch.setenv("WORLD_SIZE", str(NPROC))  # the config the ranks saw
    cfg = load_config(GRPORunConfig, None, run_overrides(world, Path("unused"), **{
        "grpo.per_device_train_batch_size": B, "grpo.max_steps": STEPS}))
    P = cfg.grpo.prompts_per_generation
    assert P == NPROC * B // G == ranks[0]["prompts_per_generation"]
    stream = prompt_stream(load_prompts(str(world["train"])), P, generations_needed(cfg), cfg.seed)

    split = 0
    for step in range(STEPS):
        expected_rows = stream["row"][step * P:(step + 1) * P]
        assert len(set(expected_rows)) == P  # distinct prompts, so (step, row) names a group
        per_rank = [[s for s in r["scored"] if s["step"] == step] for r in ranks]
        assert [len(x) for x in per_rank] == [B] * NPROC  # TRL's per-process slice
        # rank r scored rows [r*B, (r+1)*B) of the step's P*G rows, in order
        flat = [s["row"] for x in per_rank for s in x]
        assert flat == [row for row in expected_rows for _ in range(G)]
        groups = collections.defaultdict(list)
        for r, x in enumerate(per_rank):
            for s in x:
                groups[s["row"]].append((r, s["completion"]))
        assert sorted(groups) == sorted(expected_rows)
        for members in groups.values():
            assert len(members) == G  # the whole group, no duplicate, none missing
            assert len({c for _, c in members}) == G  # G distinct samples (a split group's halves never share seeds)
            split += len({r for r, _ in members}) > 1
    assert split == STEPS  # one group per step spans both processes


def test_split_rollouts_equal_one_process_sampling_the_whole_generation(two_process_run, monkeypatch):
    """Completion i of a generation has seed base + i wherever it is sampled: the step-0 samples of both ranks,
    concatenated, are what one pool sampling all P prompts x G returns."""
    world, _, ranks = two_process_run
    from argrpo.config import load_config
    from argrpo.grpo.config import GRPORunConfig
    from argrpo.grpo.rollouts import RolloutSource
    from argrpo.rollout.pool import LocalRolloutPool, RolloutConfig

    monkeypatch.setenv("WORLD_SIZE", str(NPROC))
    cfg = load_config(GRPORunConfig, None, run_overrides(world, Path("unused"), **{
        "grpo.per_device_train_batch_size": B, "grpo.max_steps": STEPS}))
    step0 = [s for r in ranks for s in r["scored"] if s["step"] == 0]
    captions = [s["prompt"] for s in step0][::G]
    source = RolloutSource(None, None, cfg.rollout.sampling, G, captions, len(captions), seed=cfg.seed)
    with LocalRolloutPool(str(world["policy"]), RolloutConfig(num_workers=0, device="cpu")) as pool:
        ro = pool.generate(captions, G, source._sampling(0))
    digests = [hashlib.sha1(json.dumps(ids).encode()).hexdigest() for ids in ro.completion_ids.tolist()]
    assert [s["completion"] for s in step0] == digests


def test_several_processes_with_ray_actors_need_a_shared_cluster(monkeypatch, tmp_path):
    """Each learner process would otherwise start its own local Ray and overbook the machine."""
    import ray
    from argrpo.config import load_config
    from argrpo.grpo.config import GRPORunConfig
    from argrpo.grpo.trainer import build_run

    world = shared_world()
    monkeypatch.setenv("WORLD_SIZE", str(NPROC))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh learner process
    cfg = load_config(GRPORunConfig, None, run_overrides(world, tmp_path / "run", **{
        "grpo.per_device_train_batch_size": B, "rollout.num_workers": 1}))
    with pytest.raises(ValueError, match="2 learner processes with Ray actors .* need one shared Ray cluster"):
        build_run(cfg)
    assert not (tmp_path / "run").exists()
