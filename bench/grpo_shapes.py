"""GRPO on the shapes world: held-out GenEval-style score of SFT vs GRPO, sync vs async, several seeds.

    python -m bench.grpo_shapes --sft runs/shapes/sft --seeds 0 1 --modes sync async --budget-minutes 10

Each (mode, seed) run trains recipes/configs/shapes/grpo.yaml from the SFT checkpoint until the recipe's
``grpo.max_steps`` (its LR schedule's length) or a budget of process CPU time runs out, whichever comes first
(CPU time is robust when other jobs share the machine; ``--clock wall`` for wall time), evaluating the
held-out set every ``--eval-every`` steps with the recipe's pinned eval settings (120 prompts x 4 samples; the
evaluation's own time is not counted). Writes bench/results/grpo_shapes.{json,md} and grpo_shapes_curves.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "shapes" / "grpo.yaml"


def run_one(sft: str, mode: str, seed: int, out: Path, budget: float, clock: str, eval_every: int,
            overrides: list[str]) -> dict:
    import torch
    from argrpo.config import load_config
    from argrpo.grpo.config import GRPORunConfig
    from argrpo.grpo.trainer import train

    sets = [f"output_dir={out}", f"policy.checkpoint={sft}", f"seed={seed}", f"rollout.mode={mode}",
            f"budget_minutes={budget}", f"budget_clock={clock}",
            f"eval.every={eval_every}", "logging.progress=false", "checkpoint.every=0"] + overrides
    cfg = load_config(GRPORunConfig, RECIPE, sets)
    t0, c0 = time.time(), time.process_time()
    summary = train(cfg)
    summary["wall_s"], summary["cpu_s"] = time.time() - t0, time.process_time() - c0
    summary["threads"] = torch.get_num_threads()  # what train() set from cfg.threads (recipe, override or cores)
    summary["metrics"] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return summary


def evaluate_policy(path: str, eval_cfg, cfg_scale: float | None = None) -> dict:
    """Held-out score of a policy with the recipe's pinned eval settings (``cfg_scale``: another guidance scale)."""
    import dataclasses

    from argrpo.grpo import evaluate as ev
    from argrpo.models.policy import load_policy

    specs, _ = ev.load_prompt_set(eval_cfg.prompts, eval_cfg.shapes_per_tag, eval_cfg.shapes_seed)
    settings = eval_cfg.settings
    if cfg_scale is not None:
        settings = dataclasses.replace(settings, sampling=dataclasses.replace(settings.sampling, cfg_scale=cfg_scale))
    result = ev.evaluate(load_policy(path), None, specs, settings)
    return {"overall": result.overall, "se": result.overall_stderr,
            "tags": {t: {"acc": s.accuracy, "se": s.stderr} for t, s in result.tags.items()}}


def reward_rows(metrics: list[dict]) -> list[dict]:
    """The metrics rows that carry rewards: with steps_per_generation > 1 only a generation's first optimizer step
    logs them."""
    return [x for x in metrics if "reward" in x]


def plot(runs: list[dict], sft_score: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    colors = {"sync": "tab:blue", "async": "tab:orange"}
    styles = ["-", "--", ":", "-."]
    by_config = mixes_configs(runs)  # a tuning merge: a colour and a label per config
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(runs) > len(palette):  # more runs than the default cycle's ten colours: no two runs share one
        palette = [plt.cm.tab20(k) for k in range(20)]
    for i, r in enumerate(runs):
        m = reward_rows(r["metrics"])
        steps = [x["step"] for x in m]
        rew = [x["reward"] for x in m]
        k = 5  # moving average over 5 steps
        smooth = [sum(v for v in rew[max(0, i - k + 1): i + 1]) / len(rew[max(0, i - k + 1): i + 1])
                  for i in range(len(rew))]
        label = f"{r['mode']} seed {r['seed']}"
        color = colors[r["mode"]]
        if by_config:
            label += " " + config_label(r.get("overrides"))
            color = palette[i % len(palette)]
        ls = styles[r["seed"] % len(styles)]
        axes[0].plot(steps, smooth, ls, color=color, label=label)
        cpu_at = {}
        total = 0.0
        for x in r["metrics"]:
            total += x.get("cpu/step", 0.0)
            cpu_at[x["step"]] = total / 60
        cpu = [cpu_at[s] for s in steps]
        axes[1].plot(cpu, smooth, ls, color=color, label=label)
        ev = r["eval_curve"]
        axes[2].errorbar([s for s, _, _ in ev], [v for _, v, _ in ev], yerr=[e for _, _, e in ev], fmt="o" + ls,
                         color=color, label=label, capsize=2)
    axes[0].set(xlabel="step", ylabel="train reward (geneval_dense, 5-step mean)", title="reward vs step")
    axes[1].set(xlabel="learner process CPU minutes", ylabel="train reward", title="reward vs CPU time")
    axes[2].axhline(sft_score, color="gray", lw=1, label="SFT")
    axes[2].set(xlabel="step", ylabel="held-out GenEval-style score (± SE)", title="held-out score")
    for ax in axes:
        ax.grid(alpha=0.3)
        if not by_config:
            ax.legend(fontsize=7)
    if by_config:  # long labels: one legend for the three panels, below them
        handles, labels = axes[2].get_legend_handles_labels()
        legend_h = 0.2 + 0.16 * ((len(labels) + 1) // 2)  # inches: two columns of 7-point lines
        fig.set_size_inches(16, 4.2 + legend_h)
        fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, legend_h / (4.2 + legend_h), 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_threads(runs: list[dict]) -> int | None:
    """The torch threads the runs used when they all agree, else None. Runs record their count; result files
    written before they did name it only as a ``threads=N`` override (none: every core)."""
    used = set()
    for r in runs:
        n = r.get("threads")
        if n is None:
            given = [o.split("=", 1)[1] for o in r.get("overrides") or [] if o.startswith("threads=")]
            n = int(given[-1]) if given and given[-1] != "null" else None
        used.add(n)
    return used.pop() if len(used) == 1 and None not in used else None


def mixes_configs(runs: list[dict]) -> bool:
    """Whether the runs differ in their overrides (a merge of tuning runs), not only in mode and seed."""
    return len({" ".join(r.get("overrides") or []) for r in runs}) > 1


def config_label(overrides) -> str:
    """A run's config in a legend or table: its overrides without the thread count and section prefixes."""
    short = (o for o in overrides or [] if not o.startswith("threads="))
    return " ".join(o.replace("policy.", "").replace("grpo.", "").replace("data.", "") for o in short)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sft", default="runs/shapes/sft")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--modes", nargs="+", default=["sync", "async"])
    p.add_argument("--budget-minutes", type=float, default=10.0)
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--out", default="runs/bench_grpo_shapes")
    p.add_argument("--results", default=None, help="results directory (default bench/results)")
    p.add_argument("--name", default="grpo_shapes")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra GRPO config overrides")
    p.add_argument("--also-cfg", type=float, default=None, metavar="S",
                   help="also score SFT and each final policy on the held-out set sampled with guidance scale S")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="only combine these result files (same SFT; the ones in results/raw/, which keep per-step metrics) "
                        "into --name's table and curves")
    args = p.parse_args(argv)

    from argrpo.config import load_config
    from argrpo.grpo.config import GRPORunConfig

    if args.merge:
        return merge(args)
    eval_cfg = load_config(GRPORunConfig, RECIPE, [f"policy.checkpoint={args.sft}"]).eval
    out = Path(args.out)
    sft = evaluate_policy(args.sft, eval_cfg)
    if args.also_cfg is not None:
        sft["at_cfg"] = {"scale": args.also_cfg, **evaluate_policy(args.sft, eval_cfg, args.also_cfg)}
    runs = []
    for mode in args.modes:
        for seed in args.seeds:
            s = run_one(args.sft, mode, seed, out / f"{mode}_seed{seed}", args.budget_minutes, args.clock,
                        args.eval_every, args.overrides)
            final = evaluate_policy(s["final"], eval_cfg)
            if args.also_cfg is not None:
                final["at_cfg"] = {"scale": args.also_cfg, **evaluate_policy(s["final"], eval_cfg, args.also_cfg)}
            curve = [(st, v["score"], v.get("score_se", 0.0)) for st, v in s["eval"]]
            if not curve or curve[-1][0] != s["steps"]:
                curve.append((s["steps"], final["overall"], final["se"]))
            runs.append({"mode": mode, "seed": seed, "steps": s["steps"], "final": final, "eval_curve": curve,
                         "wall_s": s["wall_s"], "cpu_s": s["cpu_s"], "time_totals": s["time_totals"],
                         "metrics": s["metrics"], "prefetch": s["prefetch"], "overrides": list(args.overrides),
                         "threads": s["threads"]})
            print(json.dumps(run_row(sft, runs[-1])), flush=True)
    notes = [f"budget: {args.budget_minutes} min of {args.clock} time per run; held-out: {eval_cfg.prompts} "
             f"({eval_cfg.shapes_per_tag}/tag) x {eval_cfg.settings.sampling.n} samples, cfg "
             f"{eval_cfg.settings.sampling.cfg_scale}, seed {eval_cfg.settings.sampling.seed}; SE over prompts",
             f"overrides: {args.overrides}"]
    write_all(args.name, sft, runs, {"args": vars(args)}, notes, Path(args.results) if args.results else None)
    return 0


def run_row(sft: dict, run: dict) -> dict:
    """One table row: scores, delta, train reward trend and the mean time split of a run."""
    m, final = run["metrics"], run["final"]
    n = max(1, len(m))
    rew = [x["reward"] for x in reward_rows(m)]
    avg = {k: sum(x.get(k, 0.0) for x in m) / n
           for k in ("time/step", "time/rollout", "time/reward", "time/learn", "time/sync", "cpu/step")}
    return {
        "mode": run["mode"], "seed": run["seed"], "overrides": " ".join(run.get("overrides") or []) or "-",
        "steps": run["steps"],
        "SFT": f"{sft['overall']:.3f} ± {sft['se']:.3f}",
        "GRPO": f"{final['overall']:.3f} ± {final['se']:.3f}",
        "delta": round(final["overall"] - sft["overall"], 3),
        **at_cfg_columns(sft, final),
        "train reward first→last(5)": f"{sum(rew[:5]) / max(1, len(rew[:5])):.3f}→"
                                      f"{sum(rew[-5:]) / max(1, len(rew[-5:])):.3f}",
        "cpu s/step": round(avg["cpu/step"], 2), "wall s/step": round(avg["time/step"], 2),
        "rollout/reward/learn/sync s": "/".join(f"{avg[k]:.2f}" for k in
                                                ("time/rollout", "time/reward", "time/learn", "time/sync")),
    }


def at_cfg_columns(sft: dict, final: dict) -> dict:
    """The row's columns for the held-out score sampled with another guidance scale (``--also-cfg``), if any."""
    if "at_cfg" not in final or "at_cfg" not in sft:
        return {}
    a, b = sft["at_cfg"], final["at_cfg"]
    return {f"SFT cfg {a['scale']:g}": f"{a['overall']:.3f} ± {a['se']:.3f}",
            f"GRPO cfg {b['scale']:g}": f"{b['overall']:.3f} ± {b['se']:.3f}",
            f"delta cfg {b['scale']:g}": round(b["overall"] - a["overall"], 3)}


def write_all(name: str, sft: dict, runs: list[dict], extra: dict, notes: list[str], results_dir: Path | None):
    """<name>.json / .md (run table + per-tag table) and <name>_curves.png."""
    from bench.common import environment, markdown_table, write_results

    tags = sorted(sft["tags"])
    tag_rows = [{"policy": "SFT", **{t: f"{sft['tags'][t]['acc']:.3f} ± {sft['tags'][t]['se']:.3f}" for t in tags}}]
    by_config = mixes_configs(runs)  # a tuning merge: name each config
    for r in runs:
        label = f"GRPO {r['mode']} seed {r['seed']}"
        if by_config:
            label += " " + config_label(r.get("overrides"))
        tag_rows.append({"policy": label.rstrip(),
                         **{t: f"{r['final']['tags'][t]['acc']:.3f} ± {r['final']['tags'][t]['se']:.3f}"
                            for t in tags}})
    out_dir = results_dir or Path(__file__).resolve().parent / "results"
    png = out_dir / f"{name}_curves.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(runs, sft["overall"], png)
    # per-step metrics go to raw/ (git-ignored; --merge reads them from there); the result of record keeps summaries
    raw = out_dir / "raw" / f"{name}.json"
    raw.parent.mkdir(exist_ok=True)
    raw.write_text(json.dumps({"name": name, "sft": sft, "runs": runs, **extra}))
    record = [{k: v for k, v in r.items() if k != "metrics"} for r in runs]
    _, md = write_results(name, {"sft": sft, "runs": record, **extra, "raw": f"per-step metrics: raw/{raw.name}",
                                 "environment": environment(run_threads(runs))},
                          [run_row(sft, r) for r in runs], notes=notes + [f"curves: {png.name}"],
                          out_dir=results_dir)
    md.write_text(md.read_text() + "\n## Held-out accuracy per tag (± SE over prompts)\n\n"
                  + markdown_table(tag_rows) + "\n")


def merge(args) -> int:
    """Combine result JSONs of separate invocations (e.g. runs started in parallel) into one table and plot."""
    parts = [json.loads(Path(p).read_text()) for p in args.merge]
    sfts = {json.dumps(p["sft"], sort_keys=True) for p in parts}
    if len(sfts) != 1:
        raise SystemExit("--merge: the results evaluate different SFT scores; they are not one experiment")
    runs = [{"overrides": p["args"].get("overrides", []), **r} for p in parts for r in p["runs"]]
    notes = [f"merged from {', '.join(Path(p).name for p in args.merge)}"]
    notes += [n for n in parts[0].get("notes", [])]
    a = parts[0]["args"]
    notes.insert(0, f"budget: {a['budget_minutes']} min of {a['clock']} time per run; sft: {a['sft']}")
    write_all(args.name, parts[0]["sft"], runs, {"merged": list(args.merge)}, notes,
              Path(args.results) if args.results else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
