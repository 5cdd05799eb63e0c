"""`argrpo eval CONFIG`: GenEval-style scores of a policy checkpoint (grpo.evaluate)."""

from __future__ import annotations

from argrpo.recipes.commands import add_config_args, command


@command("eval", help="GenEval-style evaluation: per-tag accuracy, grids, GenEval's image layout",
         configure=add_config_args)
def run(args) -> int:
    from argrpo.config import load_config
    from argrpo.errors import UserError
    from argrpo.grpo.evaluate import EvalRunConfig, evaluate, load_prompt_set, select_prompts
    from argrpo.models.policy import load_policy
    from argrpo.models.runtime import resolve_device, set_threads

    cfg = load_config(EvalRunConfig, args.config, args.overrides)
    set_threads(cfg.threads)
    specs, from_file = load_prompt_set(cfg.prompts, cfg.shapes_per_tag, cfg.shapes_seed)
    indexed = select_prompts(specs, cfg.tags, cfg.per_tag_limit, cfg.limit)
    if not indexed:
        raise UserError(f"no prompts left in {cfg.prompts} after tags={cfg.tags}, "
                        f"per_tag_limit={cfg.per_tag_limit}, limit={cfg.limit}")
    if cfg.geneval_layout is None:
        cfg.geneval_layout = from_file  # GenEval's own files get GenEval's layout by default
    engine = None
    if cfg.engine == "torch":
        policy = load_policy(cfg.policy, device=resolve_device(cfg.device))
        image_tokenizer = cfg.image_tokenizer
    else:
        from argrpo.rollout.worker import RolloutWorker

        # one in-process worker builds the engine (vLLM reads the checkpoint itself) and holds layout and tokenizers
        policy = RolloutWorker(cfg.policy, engine=cfg.engine, device=str(resolve_device(cfg.device)))
        engine, image_tokenizer = policy.engine, cfg.image_tokenizer or policy.image_tokenizer
    result = evaluate(policy, image_tokenizer, [s for _, s in indexed], cfg, indices=[i for i, _ in indexed],
                      engine=engine)
    print(result.to_markdown(title=f"{cfg.policy} on {cfg.prompts}"))
    print(f"written to {cfg.output_dir}")
    return 0
