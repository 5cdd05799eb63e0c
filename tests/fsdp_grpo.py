"""One rank of a tiny 2-process GRPO run under a given strategy, launched by tests/test_fsdp_learner.py as

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_grpo.py WORLD.json OUT STRATEGY [OVERRIDES.json]

Each rank runs ``grpo.trainer.train`` (STRATEGY ddp or fsdp, gloo on CPU) with its own in-process rollout pool and
writes ``OUT/rank<r>.json`` (``rank<r>-resumed.json`` for a resumed run): every completion it scored (step, prompt row, token ids). Rank 0 also saves the
weights pushed to its pool after step 1 (``OUT/pushed-1.safetensors``, the full gathered tensors), so the test can
sample generation 1 again in one process from exactly those weights; every push's key list goes into the json. ``OUT/run/final`` is the consolidated policy.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path


def main(world_json: str, out_dir: str, strategy: str, overrides_json: str | None = None) -> None:
    import argrpo.grpo.trainer as gt
    from argrpo.config import load_config
    from argrpo.grpo.config import GRPORunConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from grpo_fixtures import run_overrides

    rank = int(os.environ["RANK"])
    world = {k: Path(v) for k, v in json.loads(Path(world_json).read_text()).items()}
    sys.path.insert(0, str(world["plugins"]))
    out = Path(out_dir)
    extra = json.loads(Path(overrides_json).read_text()) if overrides_json else {}
    # "_kill_at": N: every rank SIGKILLs itself inside the step-N checkpoint write; "_resume": continue a run
    kill_at, resume = extra.pop("_kill_at", None), bool(extra.pop("_resume", False))
    # G=4 and 4 completions per rank: 2 prompts a step, one whole group per rank
    cfg = load_config(GRPORunConfig, None, run_overrides(world, out / "run", **{
        "grpo.per_device_train_batch_size": 4, "grpo.max_steps": 3, "checkpoint.save_final": True,
        "distributed.strategy": strategy, **extra}))

    seen: list = []
    build_run = gt.build_run

    def build_and_watch(cfg, eval_fn=None):
        run = build_run(cfg, eval_fn=eval_fn)
        tracked = run.trainer.reward_funcs[0]
        reward = tracked.reward

        def recording(prompts=None, completions=None, **kwargs):
            step = int(kwargs["trainer_state"].global_step)
            for caption, row, ids in zip(prompts, kwargs["row"], kwargs["completion_ids"]):
                seen.append({"step": step, "row": int(row), "prompt": caption, "ids": [int(i) for i in ids]})
            return reward(prompts=prompts, completions=completions, **kwargs)

        tracked.reward = recording
        if kill_at is not None:
            save_rng = run.trainer._save_rng_state

            def save_rng_then_die(output_dir):
                # every rank's shards of this checkpoint are in its temp dir; the rename has not happened yet
                if run.trainer.state.global_step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                save_rng(output_dir)

            run.trainer._save_rng_state = save_rng_then_die
        return run

    import argrpo.grpo.weight_sync as ws

    gather = ws.sync_state
    pushes = []

    def sync_state_and_keep(model):
        state, adapter = gather(model)  # under FSDP2 a collective: both ranks gather, each feeds its own pool
        pushes.append(sorted(state))
        if len(pushes) == 2 and rank == 0 and not resume:  # after step 1 (the first push sends step 0)
            from safetensors.torch import save_file

            save_file({k: v.clone().contiguous() for k, v in state.items()}, str(out / "pushed-1.safetensors"))
        return state, adapter

    ws.sync_state = sync_state_and_keep

    gt.build_run = build_and_watch
    summary = gt.train(cfg, resume=resume)
    (out / f"rank{rank}{'-resumed' if resume else ''}.json").write_text(json.dumps({
        "rank": rank, "world_size": int(os.environ["WORLD_SIZE"]), "steps": summary["steps"],
        "final": summary["final"], "prompts_per_generation": cfg.grpo.prompts_per_generation, "scored": seen,
        "pushes": pushes}))


if __name__ == "__main__":
    main(*sys.argv[1:])
