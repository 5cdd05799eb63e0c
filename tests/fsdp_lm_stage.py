"""One rank of a tiny 2-process pretrain -> SFT under a given strategy, launched by tests/test_fsdp_learner.py as

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_lm_stage.py VQ_DIR OUT STRATEGY

Pretrain (3 steps of 2 x 8 rows, a checkpoint at step 2) writes OUT/pre, SFT (2 steps) from it writes OUT/sft;
each rank writes OUT/rank<r>.json with both stages' steps and image losses.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def overrides(out: Path, vq_dir: str, cache: Path, strategy: str, steps: int, batch: int) -> list[str]:
    """A tiny shapes pretraining run (the tests' usual settings)."""
    return [f"output_dir={out}", f"image_tokenizer={vq_dir}", f"cache_dir={cache}", "policy.size=tiny",
            "data.shapes_n=96", "data.shapes_captions=mixed", f"train.max_steps={steps}", f"train.batch_size={batch}",
            "train.save_steps=2", "train.save_total_limit=null", "train.logging_steps=1", "train.report_to=[]",
            "train.learning_rate=0.003", "train.bf16=false", "train.threads=1", "caption_dropout=0.0",
            f"distributed.strategy={strategy}"]


def main(vq_dir: str, out_dir: str, strategy: str) -> None:
    from argrpo.config import load_config
    from argrpo.grpo.lm_stage import PretrainConfig, SFTConfig, run_lm_stage

    rank = int(os.environ["RANK"])
    out = Path(out_dir)
    pre = run_lm_stage(load_config(PretrainConfig, None, overrides(out / "pre", vq_dir, out / "cache", strategy,
                                                                   steps=3, batch=8)))
    sft = run_lm_stage(load_config(SFTConfig, None, [
        f"output_dir={out / 'sft'}", f"policy.checkpoint={out / 'pre'}", f"cache_dir={out / 'cache'}",
        "data.shapes_n=64", "data.shapes_seed=1", "train.max_steps=2", "train.batch_size=8",
        "train.learning_rate=0.001", "train.logging_steps=1", "train.report_to=[]", "train.bf16=false",
        "train.threads=1", "train.save_steps=100", f"distributed.strategy={strategy}"]))
    (out / f"rank{rank}.json").write_text(json.dumps({
        stage: {"steps": r.global_step, "losses": [h["image_loss"] for h in r.log_history if "image_loss" in h]}
        for stage, r in (("pre", pre), ("sft", sft))}))


if __name__ == "__main__":
    main(*sys.argv[1:])
