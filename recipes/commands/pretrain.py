"""`argrpo pretrain CONFIG`: causal-LM pretraining of a text-to-image policy (grpo.lm_stage)."""

from __future__ import annotations

from argrpo.recipes.commands import add_config_args, command


@command("pretrain", help="pretrain a policy on image-caption data (HF Trainer)", configure=add_config_args)
def run(args) -> int:
    from argrpo.config import load_config
    from argrpo.grpo.lm_stage import PretrainConfig, run_lm_stage

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    result = run_lm_stage(cfg)
    print(f"pretrain: {result.global_step} steps, final loss {result.train_loss}, "
          f"{result.train_seconds:.1f} s; policy at {result.output_dir}")
    return 0
