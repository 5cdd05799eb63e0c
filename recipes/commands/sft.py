"""`argrpo sft CONFIG`: supervised fine-tuning of a pretrained policy (grpo.lm_stage)."""

from __future__ import annotations

from argrpo.recipes.commands import add_config_args, command


@command("sft", help="fine-tune a pretrained policy on prompt-image pairs (HF Trainer)", configure=add_config_args)
def run(args) -> int:
    from argrpo.config import load_config
    from argrpo.grpo.lm_stage import SFTConfig, run_lm_stage

    cfg = load_config(SFTConfig, args.config, args.overrides)
    result = run_lm_stage(cfg)
    print(f"sft: {result.global_step} steps, final loss {result.train_loss}, "
          f"{result.train_seconds:.1f} s; policy at {result.output_dir}")
    return 0
