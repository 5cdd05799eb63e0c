"""One GRPO step, sync vs async: step time and its split (rollout, decode, reward, learn, sync).

    python -m bench.step               # bench model (hidden 512, 8 layers), 256 image tokens, P=2 x G=8,
                                       # 2 rounds of (sync, async) x 4 steps
    python -m bench.step --quick       # shapes-size model (hidden 256, 4 layers), 64 tokens
    python -m bench.step --P 1 --G 8 --steps 8 --rounds 3

The real learner (``grpo.trainer.train``: TRL's GRPOTrainer, the visual-slice head, importance correction) trains
a policy of the bench size on the shapes world (64x64 images through a patch-4 VQ: a 16x16 grid of codes, the
GenEval-style ``geneval_dense`` reward with the exact shapes detector). Rollouts come from one Ray rollout worker
(the torch engine, 1 CPU, 1 thread), the learner runs in this process with 1 thread: the same two cores in both
modes. Sync: the worker samples step t, then the learner learns t while the worker idles. Async: the worker samples
step t+1 while the learner learns t (one step stale). The importance correction is on in both modes, so the
learner's work per step is identical.

Sessions: Linux schedules by autogroup (one per session, /proc/sys/kernel/sched_autogroup_enabled): CPU time is
shared fairly between sessions first, then between the processes inside one. A learner and the Ray workers it
started share one session, so on a machine where other sessions keep the cores busy the two together get one
session's share, and async mode (both busy at once) gains nothing over sync (measured: async / sync 1.06 at load
6-7). By default this script starts the Ray cluster itself and runs each learner as a child process in a session of
its own that joins the cluster, so the learner and the rollout workers get separate shares, as on separate cores or
nodes (``--no-isolate`` to compare). On an idle machine the two set-ups are the same.

The per-phase times are the trainer's own (``time/*`` in metrics.jsonl, see grpo.callbacks.StepTimer): rollout =
waiting for samples (in async mode only what the overlap did not hide), reward, sync (weight push), learn = the
rest; rollout_generate and decode are the worker's own seconds. The first step of each run is a warm-up (async
cannot overlap it) and is left out; figures are medians over the remaining steps of all rounds, with their spread.
Rollout and learning are balanced when the worker's sampling time is close to the learner's time (reported as
``learn / rollout_generate`` in sync mode). Writes bench/results/step.json and step.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PHASES = ("rollout", "rollout_generate", "decode", "reward", "learn", "sync")


@dataclass
class StepConfig:
    size: str  # models.policy size preset
    patch: int  # VQ patch size on 64x64 shapes images: 4 -> 16x16 = 256 tokens, 8 -> 8x8 = 64 tokens
    P: int
    G: int
    steps: int  # optimizer steps per run (the first is a warm-up)
    cfg_scale: float


CONFIGS = {
    "full": StepConfig("bench", 4, 2, 8, 4, 1.0),
    "quick": StepConfig("shapes", 8, 2, 8, 3, 1.0),
}


def prepare_policy(root: Path, size: str, patch: int, seed: int = 0) -> Path:
    """A random-weight shapes-world policy of ``size`` with a patch-``patch`` VQ tokenizer, saved under ``root``."""
    from argrpo.data.shapes import ShapesWorld
    from argrpo.models.image_tokenizers.vq import VQTokenizer
    from argrpo.models.layout import SHAPES_SPECIAL_TOKENS, layout_preset
    from argrpo.models.policy import build_policy, save_policy
    from argrpo.models.text_tokenizer import build_text_tokenizer

    path = root / f"policy-{size}-p{patch}"
    if (path / "argrpo.json").is_file():
        return path
    world = ShapesWorld()
    _, images, _ = world.sample("train", 200, seed=seed)
    vq = VQTokenizer.fit(images, patch_size=patch)
    tok = build_text_tokenizer(world.vocabulary(), special_tokens=SHAPES_SPECIAL_TOKENS)
    layout = layout_preset("shapes", text_vocab_size=len(tok), codebook_size=vq.codebook_size, grid=vq.grid,
                           image_size=vq.image_size)
    save_policy(path, build_policy(layout, size=size, seed=seed), tok, layout, image_tokenizer=vq)
    return path


def run_mode(policy: Path, out: Path, mode: str, cfg: StepConfig, workers: int, extra: list[str]) -> dict:
    """Train ``cfg.steps`` steps in ``mode``; returns per-step metrics rows and the run summary."""
    from argrpo.config import load_config
    from argrpo.grpo.config import GRPORunConfig
    from argrpo.grpo.trainer import train

    sets = {
        "output_dir": str(out), "seed": 0, "threads": 1, "policy.checkpoint": str(policy),
        "rewards": "[{name: geneval_dense}]", "data.train_prompts": "shapes:train", "data.shapes_per_tag": 20,
        "rollout.engine": "torch", "rollout.num_workers": workers, "rollout.num_cpus_per_worker": 1,
        "rollout.mode": mode, "rollout.sampling.temperature": 1.0, "rollout.sampling.cfg_scale": cfg.cfg_scale,
        "grpo.num_generations": cfg.G, "grpo.per_device_train_batch_size": cfg.P * cfg.G,
        "grpo.max_steps": cfg.steps, "grpo.learning_rate": 1e-5, "grpo.loss_type": "grpo",
        # on in both modes (async needs it), so the learner does the same work per step in both
        "correction.mode": "always",
        "logging.report_to": "[]", "logging.image_every": 0, "logging.progress": False,
        "checkpoint.every": 0, "checkpoint.save_final": False, "eval.every": 0,
    }
    run_cfg = load_config(GRPORunConfig, None, [f"{k}={v}" for k, v in sets.items()] + list(extra))
    t0 = time.perf_counter()
    summary = train(run_cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"mode": mode, "rows": rows, "wall_s": wall, "prefetch": summary["prefetch"], "steps": summary["steps"]}


def run_isolated(argv, address: str, mode: str, run_dir: Path) -> dict:
    """``run_mode`` in a child process with a session (and so a scheduler autogroup) of its own, joined to the Ray
    cluster at ``address``; its rollout workers stay in this process's session."""
    import subprocess
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
        cmd = [sys.executable, "-m", "bench.step", *argv, "--child-mode", mode, "--child-run-dir", str(run_dir),
               "--child-out", f.name]
        env = {**os.environ, "RAY_ADDRESS": address}
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, start_new_session=True,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} run failed:\n{(proc.stderr or proc.stdout)[-3000:]}")
        return json.loads(Path(f.name).read_text())


def _median(values):
    return statistics.median(values) if values else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shapes-size model, 64 tokens, 4 steps per mode")
    ap.add_argument("--P", type=int, default=None, help="prompts per step")
    ap.add_argument("--G", type=int, default=None, help="samples per prompt")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (first is a warm-up)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="sync/async run pairs, alternating order (sync-async, async-sync, ...) so drift hits both")
    ap.add_argument("--cfg-scale", type=float, default=None, help="rollout CFG scale (1 = off)")
    ap.add_argument("--workers", type=int, default=1, help="Ray rollout workers (0 = in-process thread)")
    ap.add_argument("--worker-niceness", type=int, default=0,
                    help="nice value of the local Ray cluster's workers (Ray's own default is 15, which starves the "
                         "rollout actors whenever other processes share the cores; see bench/NOTES.md)")
    ap.add_argument("--no-isolate", dest="isolate", action="store_false",
                    help="run the learner in this process and session (by default each run's learner is a child "
                         "process in a session of its own, so the scheduler gives it and the Ray workers separate "
                         "CPU shares; see the module docstring)")
    ap.add_argument("--work-dir", default=None, help="where the policy and run outputs go (default: a temp dir)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra GRPO config overrides")
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    ap.add_argument("--child-mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-run-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    os.environ["RAY_worker_niceness"] = str(args.worker_niceness)  # read by the raylet this process starts
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from dataclasses import replace

    base = CONFIGS["quick" if args.quick else "full"]
    cfg = replace(base, **{k: v for k, v in (("P", args.P), ("G", args.G), ("steps", args.steps),
                                             ("cfg_scale", args.cfg_scale)) if v is not None})
    if cfg.steps < 2:
        ap.error("--steps must be >= 2 (the first step is a warm-up)")
    name = "step_quick" if args.quick else "step"
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-step-"))
    work.mkdir(parents=True, exist_ok=True)
    policy = prepare_policy(work, cfg.size, cfg.patch)
    if args.child_mode:  # one run, in the session the parent made for it; Ray is the parent's (RAY_ADDRESS)
        res = run_mode(policy, Path(args.child_run_dir), args.child_mode, cfg, args.workers, args.overrides)
        Path(args.child_out).write_text(json.dumps(res))
        return 0
    meta = json.loads((policy / "argrpo.json").read_text())["layout"]
    n_tokens = meta["grid"][0] * meta["grid"][1]
    from argrpo.models.policy import load_policy

    n_params = sum(p.numel() for p in load_policy(policy).model.parameters())
    loads = [os.getloadavg()[0]]
    print(f"[{name}] policy {n_params / 1e6:.1f}M params, {n_tokens} tokens/image, codebook {meta['codebook_size']}, "
          f"P={cfg.P} x G={cfg.G}, {cfg.steps} steps x {args.rounds} round(s) per mode", flush=True)

    isolate = args.isolate and args.workers > 0
    if isolate:
        from argrpo.cluster import init_ray

        ray = init_ray(num_cpus=max(2, len(os.sched_getaffinity(0))))
        address = ray.get_runtime_context().gcs_address
    runs = []
    for r in range(args.rounds):
        for mode in ("sync", "async") if r % 2 == 0 else ("async", "sync"):
            if isolate:
                res = run_isolated(argv, address, mode, work / f"{mode}-{r}")
            else:
                res = run_mode(policy, work / f"{mode}-{r}", mode, cfg, args.workers, args.overrides)
            res["round"] = r
            runs.append(res)
            loads.append(os.getloadavg()[0])
            steady = res["rows"][1:]
            print(f"  {mode:5s} round {r}: step " + " ".join(f"{x['time/step']:.1f}" for x in res["rows"])
                  + " s; steady split " + ", ".join(f"{p} {_median([x.get(f'time/{p}', 0.0) for x in steady]):.2f}"
                                                   for p in PHASES), flush=True)
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass

    from bench.common import environment, summarize, write_results

    per_mode: dict[str, dict] = {}
    for mode in ("sync", "async"):
        steady = [x for res in runs if res["mode"] == mode for x in res["rows"][1:]]
        per_mode[mode] = {"step_s": summarize([x["time/step"] for x in steady]),
                          **{p: summarize([x.get(f"time/{p}", 0.0) for x in steady]) for p in PHASES},
                          "cpu_step_s": summarize([x.get("cpu/step", 0.0) for x in steady]),
                          "staleness": _median([x.get("rollout/staleness", 0.0) for x in steady])}
    s, a = per_mode["sync"], per_mode["async"]
    ratio = a["step_s"]["median"] / s["step_s"]["median"]
    # per-round ratios show how stable the ratio is under the machine's load
    round_ratios = []
    for r in range(args.rounds):
        med = {res["mode"]: _median([x["time/step"] for x in res["rows"][1:]]) for res in runs if res["round"] == r}
        round_ratios.append(med["async"] / med["sync"])
    balance = s["learn"]["median"] / s["rollout_generate"]["median"]
    ideal = max(s["learn"]["median"], s["rollout"]["median"]) / (s["learn"]["median"] + s["rollout"]["median"])
    results = {
        "config": {**asdict(cfg), "params": n_params, "n_image_tokens": n_tokens, "workers": args.workers,
                   "worker_niceness": args.worker_niceness, "isolated_sessions": isolate, "rounds": args.rounds, "overrides": args.overrides},
        "modes": per_mode, "async_over_sync": ratio, "async_over_sync_per_round": round_ratios,
        "learn_over_rollout_generate_sync": balance, "ideal_overlap_ratio": ideal,
        "targets": {"async_over_sync <= 0.7": {"value": ratio, "met": ratio <= 0.7,
                                              "balanced (learn/rollout within 0.67..1.5)": 0.67 <= balance <= 1.5}},
        "runs": runs, "load_averages": loads,
    }
    rows = []
    for mode in ("sync", "async"):
        m = per_mode[mode]
        rows.append({"mode": mode, "step s (median)": m["step_s"]["median"], "spread": m["step_s"]["spread"],
                     **{f"{p} s": m[p]["median"] for p in PHASES}, "x sync": m["step_s"]["median"] / s["step_s"]["median"],
                     "n steps": m["step_s"]["n"]})
    env = environment(1)
    env["load_average_1m_during"] = loads
    notes = [
        f"policy: models.policy size '{cfg.size}' (Qwen2), {n_params / 1e6:.1f}M params, shapes world 64x64 images as "
        f"{meta['grid'][0]}x{meta['grid'][1]} = {n_tokens} codes (VQ patch {cfg.patch}, {meta['codebook_size']} codes); "
        f"P={cfg.P} prompts x G={cfg.G} per step, one micro-batch; reward geneval_dense (shapes detector); "
        f"rollout CFG {cfg.cfg_scale:g}; importance correction on in both modes",
        f"rollouts: {args.workers} Ray worker(s), torch engine, 1 CPU / 1 thread each, nice {args.worker_niceness}; "
        f"learner: 1 thread, nice {os.nice(0)}, "
        + ("a child process in a session of its own (its own CPU share under the kernel's autogroup scheduling, "
           "like a learner on other cores or nodes than its rollout workers)" if isolate
           else "in the same process and session as the Ray cluster (one CPU share for both under autogroup "
                "scheduling)"),
        f"steady-state medians over steps 2..{cfg.steps} of {args.rounds} run(s) per mode; 'rollout' = time the learner "
        f"waited for samples, 'rollout_generate'/'decode' = the worker's own seconds",
        f"async / sync step time: {ratio:.3f} (per round: {', '.join(f'{x:.3f}' for x in round_ratios)}); "
        f"balance learn / rollout_generate in sync mode: {balance:.2f}; a perfect overlap would give "
        f"max(rollout, learn) / (rollout + learn) = {ideal:.3f}",
        f"1-min load average at start and after each run: {', '.join(f'{x:.1f}' for x in loads)}",
    ]
    cols = ["mode", "step s (median)", "spread", *[f"{p} s" for p in PHASES], "x sync", "n steps"]
    json_path, md_path = write_results(name, results, rows, cols, notes, out_dir=args.out)
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
