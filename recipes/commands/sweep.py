"""`argrpo sweep CONFIG --grid grpo.beta=0,0.04 --grid grpo.learning_rate=1e-5,3e-5 [--seeds 2]` on Ray Tune.

Every trial is one GRPO run (``grpo.trainer.train``) of the same YAML with the trial's overrides, reserving the
resources it asks for. A trial that fails is reported in the table; the others go on. Output: ``sweep.md`` (one row a
trial: final and best reward and held-out score), ``sweep.json`` and ``curves.png`` (every trial's reward curve).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from pathlib import Path

from argrpo.recipes.commands import add_config_args, command, join_ray


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["grpo.beta=0,0.04"]`` -> ``{"grpo.beta": [0, 0.04]}`` (values parsed as YAML)."""
    from argrpo.config import ConfigError, parse_value

    grid: dict[str, list] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r}: expected key=v1,v2,...")
        key, raw = item.split("=", 1)
        values = [parse_value(v) for v in raw.split(",") if v.strip()]
        if not key.strip() or not values:
            raise ConfigError(f"--grid {item!r}: expected key=v1,v2,...")
        if key in grid:
            raise ConfigError(f"--grid {key!r} given twice")
        grid[key.strip()] = values
    return grid


def expand_trials(grid: dict[str, list], seeds: int) -> list[dict]:
    """Cartesian product of the grid x seeds -> [{"name", "overrides", "params", "seed"}]."""
    keys = list(grid)
    trials = []
    for values in itertools.product(*(grid[k] for k in keys)):
        params = dict(zip(keys, values))
        for seed in range(seeds):
            name = ",".join(f"{k.split('.')[-1]}={v}" for k, v in params.items()) + f",seed={seed}"
            overrides = [f"{k}={v}" for k, v in params.items()] + [f"seed={seed}"]
            trials.append({"name": name, "overrides": overrides, "params": params, "seed": seed})
    return trials


def run_trial(config: dict) -> dict:
    """One Tune trial: a whole GRPO run. Returns (and reports) its final and best figures."""
    from argrpo.config import load_config
    from argrpo.grpo.config import GRPORunConfig
    from argrpo.grpo.report import read_metrics
    from argrpo.grpo.trainer import train

    # Tune starts each trial in a directory of its own: relative paths of the config (checkpoints, prompt files)
    # mean what they meant where the sweep was started (same machine, or the same paths on every node)
    if config.get("cwd") and Path(config["cwd"]).is_dir():
        os.chdir(config["cwd"])
    # user reward plugins are found the way the driver found them (same machine or same paths on every node)
    for entry in config.get("sys_path", []):
        if entry not in sys.path:
            sys.path.append(entry)
    out = Path(config["sweep_dir"]) / "trials" / config["trial"]["name"].replace("/", "_")
    overrides = list(config["base_overrides"]) + list(config["trial"]["overrides"]) + [f"output_dir={out}"]
    cfg = load_config(GRPORunConfig, config["config_path"], overrides)
    summary = train(cfg)
    rows = read_metrics(out / "metrics.jsonl")
    rewards = [r["reward"] for r in rows if isinstance(r.get("reward"), (int, float))]
    # summary["eval"]: [(step, {"score": ..., "<tag>": ...}), ...] from the run's periodic evaluation
    evals = [e.get("score") for _, e in summary.get("eval", []) if isinstance(e.get("score"), (int, float))]
    result = {
        "steps": summary["steps"],
        "final_reward": rewards[-1] if rewards else math.nan,
        "best_reward": max(rewards) if rewards else math.nan,
        "final_score": evals[-1] if evals else math.nan,
        "best_score": max(evals) if evals else math.nan,
        "metrics_path": str(out / "metrics.jsonl"),
    }
    try:
        from ray import tune

        tune.report(result)
    except Exception:  # noqa: BLE001 - also callable outside a Tune session (tests, debugging)
        pass
    return result


def check_trial_resources(config_path: str | None, base_overrides: list[str], trials: list[dict],
                          cpus_per_trial: float, gpus_per_trial: float) -> None:
    """Before Tune starts: each trial's own reservation plus the Ray actors its config asks for must fit the cluster
    (a local cluster fails here, naming the numbers; a joined one warns). A trial whose config does not load is
    left to fail as that trial, by name."""
    from argrpo.cluster import ActorRequest, check_resources
    from argrpo.config import load_config
    from argrpo.grpo.config import GRPORunConfig

    keys = ("--cpus-per-trial",) + (("--gpus-per-trial",) if gpus_per_trial else ())
    trial = ActorRequest("sweep trial", 1, cpus_per_trial, gpus_per_trial, keys=keys)
    for t in trials:
        try:
            cfg = load_config(GRPORunConfig, config_path, list(base_overrides) + list(t["overrides"]))
        except Exception:  # noqa: BLE001 - reported by Tune as this trial's error
            continue
        check_resources([trial, *cfg.actor_requests()], f"sweep trial {t['name']}")


def sweep(config_path: str | None, grid: dict[str, list], seeds: int, out_dir: str, base_overrides: list[str],
          cpus_per_trial: float, gpus_per_trial: float, ray_address: str | None = None) -> list[dict]:
    """Run every trial on Ray Tune; return one row per trial (failed trials carry their error)."""
    from argrpo.cluster import init_ray
    from ray import tune

    init_ray(address=ray_address)
    trials = expand_trials(grid, seeds)
    check_trial_resources(config_path, base_overrides, trials, cpus_per_trial, gpus_per_trial)
    sweep_dir = Path(out_dir).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    trainable = tune.with_resources(run_trial, {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
    tuner = tune.Tuner(
        trainable,
        param_space={
            "trial": tune.grid_search(trials),
            "config_path": str(Path(config_path).resolve()) if config_path else None,
            "base_overrides": base_overrides,
            "sweep_dir": str(sweep_dir),
            "cwd": os.getcwd(),
            "sys_path": [p for p in sys.path if p],
        },
        run_config=tune.RunConfig(
            name="tune", storage_path=str(sweep_dir), verbose=0,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )
    results = tuner.fit()
    rows = []
    for res in results:
        trial = res.config["trial"]
        row = {"trial": trial["name"], **{k: v for k, v in trial["params"].items()}, "seed": trial["seed"]}
        if res.error is not None:
            row.update(status="failed", error=str(res.error).strip().splitlines()[-1][:200])
        else:
            row.update(status="ok", **{k: res.metrics.get(k) for k in
                                       ("steps", "final_reward", "best_reward", "final_score", "best_score",
                                        "metrics_path")})
        rows.append(row)
    rows.sort(key=lambda r: r["trial"])
    write_sweep_outputs(rows, sweep_dir)
    return rows


def sweep_table(rows: list[dict]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) and math.isfinite(v) else ("-" if v is None else str(v))

    cols = ["trial", "status", "steps", "final_reward", "best_reward", "final_score", "best_score"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [fmt(r.get(c)) for c in cols]
        if r.get("status") == "failed":
            cells[-1] = f"error: {r.get('error', '')}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_sweep_outputs(rows: list[dict], sweep_dir: Path) -> None:
    from argrpo.grpo.report import plot_curves, read_metrics

    (sweep_dir / "sweep.json").write_text(json.dumps(rows, indent=2, default=str))
    (sweep_dir / "sweep.md").write_text(sweep_table(rows) + "\n")
    curves = {r["trial"]: read_metrics(r["metrics_path"]) for r in rows if r.get("metrics_path")}
    if curves:
        plot_curves(curves, ["reward"], sweep_dir / "curves.png", "reward per trial")


def _configure(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="a swept key and its values (repeatable; the trials are the product)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per grid point")
    parser.add_argument("--out", default="runs/sweep", help="sweep directory")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs reserved per trial")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs reserved per trial")
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster (default: RAY_ADDRESS or local)")


@command("sweep", help="grid sweep of GRPO runs on Ray Tune (table + reward curves)", configure=_configure)
def run(args) -> int:
    from argrpo.config import ConfigError

    grid = parse_grid(args.grid)
    if not grid:
        raise ConfigError("--grid: give at least one key=v1,v2")
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    join_ray(args.ray_address, "sweep")  # an unreachable address fails here, by name, before Tune starts
    rows = sweep(args.config, grid, args.seeds, args.out, args.overrides, args.cpus_per_trial,
                 args.gpus_per_trial, args.ray_address)
    print(sweep_table(rows))
    print(f"written to {args.out}/sweep.md, sweep.json, curves.png")
    failed = [r for r in rows if r.get("status") == "failed"]
    return 1 if failed and len(failed) == len(rows) else 0
