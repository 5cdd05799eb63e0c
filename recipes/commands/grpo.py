"""`argrpo grpo CONFIG [--set key=value ...] [--resume]`: GRPO on TRL from a trained policy (grpo.trainer)."""

from __future__ import annotations

from argrpo.recipes.commands import add_config_args, add_ray_args, command, join_ray


def configure(parser) -> None:
    add_config_args(parser, required=False)
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in output_dir/checkpoints (same step and data)")
    parser.add_argument("--describe", action="store_true", help="print every config key with its help and exit")
    add_ray_args(parser)


@command("grpo", help="GRPO (TRL GRPOTrainer) with rollout workers and reward functions", configure=configure)
def run(args) -> int:
    import json
    import warnings

    from argrpo.config import describe, load_config
    from argrpo.errors import UserError
    from argrpo.grpo.config import GRPORunConfig

    if args.describe:
        print(describe(GRPORunConfig))
        return 0
    if args.config is None:
        raise UserError("name a config file (e.g. recipes/configs/shapes/grpo.yaml), or --describe")
    cfg = load_config(GRPORunConfig, args.config, args.overrides)
    join_ray(args.ray_address, "grpo")
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM")
    from argrpo.grpo.trainer import train

    summary = train(cfg, resume=args.resume)
    last = summary["last"]
    print(json.dumps({"steps": summary["steps"], "final": summary["final"], "seconds": round(summary["seconds"], 1),
                      "reward": last.get("reward"), "eval": summary["eval"][-1:] or None}, default=str))
    return 0
