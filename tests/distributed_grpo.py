"""One rank of a tiny 2-process GRPO run, launched by tests/test_distributed_learner.py as

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT tests/distributed_grpo.py WORLD.json OUT

Each rank runs ``grpo.trainer.train`` (DDP over gloo on CPU) with its own in-process rollout pool and writes
``OUT/rank<r>.json``: a hash of every parameter before and after training, and one entry per completion it scored
(step, prompt row, caption, completion hash), so the test can check that both ranks end with the same weights and
that every prompt group of every step was scored exactly once across the ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path


def weights_digest(model) -> dict:
    """sha256 over every parameter (name order) and the sum of all their values."""
    h, total = hashlib.sha256(), 0.0
    for name, p in sorted(model.named_parameters()):
        t = p.detach().float().cpu().contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes())
        total += float(t.double().sum())
    return {"sha256": h.hexdigest(), "sum": total}


class Recorder:
    """Wraps the reward a TrackedReward calls; notes what this rank scored (TRL hands it only the local slice)."""

    def __init__(self, reward, rank: int, seen: list):
        self.reward, self.rank, self.seen = reward, rank, seen

    def __call__(self, prompts=None, completions=None, **kwargs):
        step = int(kwargs["trainer_state"].global_step)
        for caption, row, ids in zip(prompts, kwargs["row"], kwargs["completion_ids"]):
            digest = hashlib.sha1(json.dumps([int(i) for i in ids]).encode()).hexdigest()
            self.seen.append({"step": step, "row": int(row), "prompt": caption, "completion": digest})
        return self.reward(prompts=prompts, completions=completions, **kwargs)


def main(world_json: str, out_dir: str) -> None:
    import argrpo.grpo.trainer as gt
    from argrpo.config import load_config
    from argrpo.grpo.config import GRPORunConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from grpo_fixtures import run_overrides

    rank = int(os.environ["RANK"])
    world = {k: Path(v) for k, v in json.loads(Path(world_json).read_text()).items()}
    sys.path.insert(0, str(world["plugins"]))
    out = Path(out_dir)
    # G=4 and 6 completions per rank: 3 prompts a step, the middle one's group split 2 + 2 across the ranks
    cfg = load_config(GRPORunConfig, None, run_overrides(world, out / "run", **{
        "grpo.per_device_train_batch_size": 6, "grpo.max_steps": 2, "checkpoint.every": 2,
        "checkpoint.save_final": True}))

    seen: list = []
    state: dict = {}
    build_run = gt.build_run

    def build_and_watch(cfg, eval_fn=None):
        run = build_run(cfg, eval_fn=eval_fn)
        tracked = run.trainer.reward_funcs[0]
        tracked.reward = Recorder(tracked.reward, rank, seen)
        state.update(run=run, before=weights_digest(run.trainer.model))
        return run

    gt.build_run = build_and_watch
    summary = gt.train(cfg)
    run = state["run"]
    model = run.trainer.accelerator.unwrap_model(run.trainer.model)
    result = {"rank": rank, "world_size": int(os.environ["WORLD_SIZE"]), "steps": summary["steps"],
              "final": summary["final"], "before": state["before"], "after": weights_digest(model),
              "prompts_per_generation": cfg.grpo.prompts_per_generation, "scored": seen}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
