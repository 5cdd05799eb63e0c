"""`argrpo pipeline CONFIG`: image tokenizer -> pretrain -> SFT -> GRPO -> evaluation of every stage -> report.

Each stage writes its own directory under ``output_dir`` and is skipped when that directory is complete, so a re-run
resumes where the last one stopped. The stage YAMLs are the same files the single-stage commands take; the pipeline
only points each stage at the previous one's output.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from argrpo.config import require_at_least
from argrpo.recipes.commands import add_config_args, add_ray_args, command, join_ray

STAGES = ("tokenizer", "pretrain", "sft", "grpo", "eval", "report")
EVAL_STAGES = ("pretrain", "sft", "grpo")


@dataclass
class PipelineConfig:
    """The whole recipe: stage configs (paths relative to this file), per-stage overrides and the report."""

    output_dir: str = field(default="runs/demo", metadata={"help": "run directory; each stage writes a subdirectory"})
    tokenizer: str = field(default="tokenizer.yaml", metadata={"help": "image tokenizer config"})
    pretrain: str = field(default="pretrain.yaml", metadata={"help": "pretrain config"})
    sft: str = field(default="sft.yaml", metadata={"help": "SFT config"})
    grpo: str = field(default="grpo.yaml", metadata={"help": "GRPO config"})
    eval: str = field(default="eval.yaml", metadata={"help": "evaluation config (used for every stage)"})
    overrides: dict[str, list[str]] = field(
        default_factory=dict,
        metadata={"help": "per-stage `key=value` overrides, e.g. {grpo: [grpo.max_steps=20]}"},
    )
    grid_prompts: int = field(default=8, metadata={"help": "held-out prompts (rows) in the before/after grid"})
    grid_samples: int = field(default=4, metadata={"help": "samples per prompt and stage in the grid"})
    seed: int = field(default=0, metadata={"help": "seed of the grid's samples"})

    def __post_init__(self):
        unknown = set(self.overrides) - set(STAGES)
        if unknown:
            raise ValueError(f"overrides: unknown stages {sorted(unknown)}; valid: {list(STAGES[:5])}")
        require_at_least(self, grid_prompts=1, grid_samples=1)


@dataclass
class Stage:
    name: str
    done: callable
    run: callable


def _done_marker(path: Path) -> Path:
    return path / "STAGE_DONE.json"


def _mark_done(path: Path, info: dict) -> None:
    from argrpo.models.checkpoint import atomic_write_text

    atomic_write_text(_done_marker(path), json.dumps(info, indent=2, default=str))


def build_stages(cfg: PipelineConfig, base: Path) -> list[Stage]:
    """The pipeline as a list of (done?, run) pairs; each run reads its YAML and points it at the previous output."""
    from argrpo.config import load_config

    out = Path(cfg.output_dir)
    d = {name: out / name for name in ("tokenizer", "pretrain", "sft", "grpo", "eval", "report")}

    def stage_yaml(name: str) -> Path:
        return (base / getattr(cfg, name)).resolve()

    def ov(name: str, extra: list[str]) -> list[str]:
        # pipeline wiring first, user overrides last so they win
        return extra + list(cfg.overrides.get(name, []))

    def run_tokenizer():
        from argrpo.recipes.commands.tokenizer import TokenizerTrainConfig, train_tokenizer

        c = load_config(TokenizerTrainConfig, stage_yaml("tokenizer"), ov("tokenizer", [f"output_dir={d['tokenizer']}"]))
        train_tokenizer(c)

    def run_lm(name: str, cls_name: str, extra: list[str]):
        from argrpo.grpo import lm_stage

        c = load_config(getattr(lm_stage, cls_name), stage_yaml(name), ov(name, extra))
        lm_stage.run_lm_stage(c)
        _mark_done(d[name], {"stage": name})

    def run_grpo():
        from argrpo.grpo.config import GRPORunConfig
        from argrpo.grpo.trainer import train

        c = load_config(GRPORunConfig, stage_yaml("grpo"),
                        ov("grpo", [f"output_dir={d['grpo']}", f"policy.checkpoint={d['sft']}"]))
        resume = (d["grpo"] / "checkpoints").is_dir()
        summary = train(c, resume=resume)
        _mark_done(d["grpo"], {"stage": "grpo", "final": summary.get("final"), "steps": summary.get("steps")})

    def run_eval():
        for stage in EVAL_STAGES:
            target = d["eval"] / stage
            if (target / "results.json").is_file():
                continue
            evaluate_stage(stage_yaml("eval"), ov("eval", [f"output_dir={target}"]), policy_dir(d, stage), target)

    def run_report():
        write_pipeline_report(cfg, d, base)

    return [
        Stage("tokenizer", lambda: (d["tokenizer"] / "image_tokenizer.json").is_file(), run_tokenizer),
        Stage("pretrain", lambda: _done_marker(d["pretrain"]).is_file(),
              lambda: run_lm("pretrain", "PretrainConfig",
                             [f"output_dir={d['pretrain']}", f"image_tokenizer={d['tokenizer']}",
                              f"cache_dir={out / 'cache'}"])),
        Stage("sft", lambda: _done_marker(d["sft"]).is_file(),
              lambda: run_lm("sft", "SFTConfig",
                             [f"output_dir={d['sft']}", f"policy.checkpoint={d['pretrain']}",
                              f"cache_dir={out / 'cache'}"])),
        Stage("grpo", lambda: _done_marker(d["grpo"]).is_file(), run_grpo),
        Stage("eval", lambda: all((d["eval"] / s / "results.json").is_file() for s in EVAL_STAGES), run_eval),
        Stage("report", lambda: False, run_report),
    ]


def policy_dir(d: dict[str, Path], stage: str) -> Path:
    """The checkpoint a stage hands on (GRPO's final policy sits in ``final/``)."""
    return d["grpo"] / "final" if stage == "grpo" else d[stage]


def evaluate_stage(eval_yaml: Path, overrides: list[str], policy: Path, out: Path) -> None:
    """Held-out evaluation of one checkpoint with the pinned eval settings; writes ``results.json`` last."""
    from argrpo.config import load_config
    from argrpo.grpo.evaluate import EvalRunConfig, evaluate, load_prompt_set, select_prompts
    from argrpo.models.policy import load_policy
    from argrpo.models.runtime import resolve_device

    c = load_config(EvalRunConfig, eval_yaml, overrides + [f"policy={policy}"])
    specs, _ = load_prompt_set(c.prompts, c.shapes_per_tag, c.shapes_seed)
    indexed = select_prompts(specs, c.tags, c.per_tag_limit, c.limit)
    loaded = load_policy(policy, device=resolve_device(c.device))
    result = evaluate(loaded, c.image_tokenizer, [s for _, s in indexed], c, indices=[i for i, _ in indexed])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result.to_dict(), indent=2))


def write_pipeline_report(cfg: PipelineConfig, d: dict[str, Path], base: Path) -> str:
    """Stage table + GRPO curves + the same held-out prompts sampled from every stage."""
    import numpy as np
    from argrpo.grpo.report import StageScores, comparison_grid, read_metrics, write_report

    stages = []
    for stage in EVAL_STAGES:
        res = json.loads((d["eval"] / stage / "results.json").read_text())
        stages.append(StageScores(
            name=stage, overall=res["overall"], overall_se=res["overall_stderr"],
            tags={t: (v["accuracy"], v["stderr"]) for t, v in res["tags"].items()},
            sampling=res.get("sampling", {}), n_samples=res.get("n_images", 0),
        ))
    curves = {"grpo": read_metrics(d["grpo"] / "metrics.jsonl")}
    prompts = grid_prompts(cfg, base)
    images = {stage: sample_grid(policy_dir(d, stage), prompts, cfg.grid_samples, cfg.seed) for stage in EVAL_STAGES}
    grid = comparison_grid(images, prompts)
    gain = stages[-1].overall - stages[1].overall
    notes = f"GRPO - SFT on held-out prompts: {gain:+.3f}"
    _, md = write_report(d["report"], stages, curves, grid, title="argrpo shapes pipeline", notes=notes)
    np.save(d["report"] / "grid_images.npy", np.stack([images[s] for s in EVAL_STAGES]))
    return md


def grid_prompts(cfg: PipelineConfig, base: Path) -> list[str]:
    """The first held-out prompts of each tag in turn, so the grid shows every tag."""
    from argrpo.config import load_config
    from argrpo.grpo.evaluate import EvalRunConfig, load_prompt_set

    c = load_config(EvalRunConfig, (base / cfg.eval).resolve(), list(cfg.overrides.get("eval", [])))
    specs, _ = load_prompt_set(c.prompts, c.shapes_per_tag, c.shapes_seed)
    by_tag: dict[str, list[str]] = {}
    for s in specs:
        by_tag.setdefault(s.get("tag", ""), []).append(s["prompt"])
    out: list[str] = []
    while len(out) < cfg.grid_prompts and any(by_tag.values()):
        for tag in sorted(by_tag):
            if by_tag[tag] and len(out) < cfg.grid_prompts:
                out.append(by_tag[tag].pop(0))
    return out


def sample_grid(policy: Path, prompts: list[str], k: int, seed: int):
    """uint8 [P, k, H, W, 3]: ``k`` samples of each prompt with the same seed at every stage."""
    from argrpo.rollout.pool import LocalRolloutPool, RolloutConfig
    from argrpo.rollout.types import SamplingParams

    with LocalRolloutPool(str(policy), RolloutConfig(num_workers=0, device="cpu")) as pool:
        ro = pool.generate(prompts, k, SamplingParams(seed=seed))
    return ro.images.reshape(len(prompts), k, *ro.images.shape[1:])


def _configure(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--only", choices=STAGES, action="append", default=[],
                        help="run only these stages (repeatable); others are still skipped when done")
    add_ray_args(parser)


@command("pipeline", help="tokenizer -> pretrain -> SFT -> GRPO -> eval of every stage -> report",
         configure=_configure)
def run(args) -> int:
    from argrpo.config import load_config
    from argrpo.models.runtime import set_threads
    from tqdm import tqdm

    set_threads()
    cfg = load_config(PipelineConfig, args.config, args.overrides)
    join_ray(args.ray_address, "pipeline")
    stages = build_stages(cfg, Path(args.config).resolve().parent)
    timings = {}
    bar = tqdm(stages, desc="pipeline", unit="stage", position=0, leave=True)
    for stage in bar:
        bar.set_postfix_str(stage.name)
        if args.only and stage.name not in args.only:
            continue
        if stage.done():
            tqdm.write(f"[pipeline] {stage.name}: done already, skipped")
            continue
        t0 = time.perf_counter()
        tqdm.write(f"[pipeline] {stage.name}: running")
        stage.run()
        timings[stage.name] = round(time.perf_counter() - t0, 1)
        tqdm.write(f"[pipeline] {stage.name}: {timings[stage.name]} s")
    out = Path(cfg.output_dir)
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    report = out / "report" / "report.md"
    if report.is_file():
        print(report.read_text())
        print(f"report: {out / 'report' / 'index.html'}")
    return 0
