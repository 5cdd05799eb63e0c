"""`argrpo pretrain CONFIG` and `argrpo sft CONFIG`: the two causal-LM stages (grpo.lm_stage), one runner.

Pretraining learns image-caption data from scratch (or a converted checkpoint); SFT fine-tunes a pretrained policy
on prompt-image pairs. They differ only in their config class and defaults.
"""

from __future__ import annotations

from argrpo.recipes.commands import add_config_args, command

# command -> (its config class in grpo.lm_stage, help)
STAGES = {
    "pretrain": ("PretrainConfig", "pretrain a policy on image-caption data (HF Trainer)"),
    "sft": ("SFTConfig", "fine-tune a pretrained policy on prompt-image pairs (HF Trainer)"),
}


def _runner(stage: str, config_class: str):
    def run(args) -> int:
        from argrpo.config import load_config
        from argrpo.grpo import lm_stage

        cfg = load_config(getattr(lm_stage, config_class), args.config, args.overrides)
        result = lm_stage.run_lm_stage(cfg)
        print(f"{stage}: {result.global_step} steps, final loss {result.train_loss}, "
              f"{result.train_seconds:.1f} s; policy at {result.output_dir}")
        return 0

    return run


for _stage, (_config_class, _help) in STAGES.items():
    command(_stage, help=_help, configure=add_config_args)(_runner(_stage, _config_class))
