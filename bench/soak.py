"""Soak: a long GRPO run of a tiny policy on Ray, watching for leaks (memory, file descriptors, object store).

    python -m bench.soak                  # 200 steps
    python -m bench.soak --quick          # 40 steps
    python -m bench.soak --steps 500 --sample-every 10

The real learner (``grpo.trainer.build_run``: TRL's GRPOTrainer) trains the 'tiny' Qwen2 policy on the shapes world
with every long-lived part a run has: one Ray rollout actor (torch engine; the learner's weights reach it through
the object store every step), one Ray reward actor (``geneval_dense`` with the exact shapes detector; each batch's
images go through the object store), metrics.jsonl, image grids and checkpoints (written and pruned) every
``--checkpoint-every`` steps. Every ``--sample-every`` steps a callback records, after the step:

- RSS and open file descriptors of the learner, the rollout actor and the reward actor (psutil);
- the object store: bytes and objects in plasma, summed over the cluster (Ray's memory summary);
- threads of the learner, temp dirs left under the checkpoint directory.

Growth is measured after the warm-up (``--warmup`` steps: allocator pools, lazily built modules and the first
checkpoint settle first), from the first quarter of the remaining samples to the last quarter (see ``analyse``),
with the least-squares RSS slope (MiB per 100 steps) beside it, so one noisy sample cannot decide. Targets: RSS growth < 10% for each process; file
descriptors and plasma objects not growing. Writes bench/results/soak.json and soak.md (``--quick``: soak_quick).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def prepare(root: Path) -> tuple[Path, Path]:
    """A 'tiny' random-weight shapes policy (patch-8 VQ: 64 codes an image) and a training prompt set."""
    from argrpo.data.shapes import ShapesWorld, write_prompt_sets
    from argrpo.models.image_tokenizers.vq import VQTokenizer
    from argrpo.models.layout import SHAPES_SPECIAL_TOKENS, layout_preset
    from argrpo.models.policy import build_policy, save_policy
    from argrpo.models.text_tokenizer import build_text_tokenizer

    world = ShapesWorld()
    _, images, _ = world.sample("train", 64, seed=0)
    vq = VQTokenizer.fit(images)
    tok = build_text_tokenizer(world.vocabulary(), special_tokens=SHAPES_SPECIAL_TOKENS)
    layout = layout_preset("shapes", text_vocab_size=len(tok), codebook_size=vq.codebook_size)
    policy = save_policy(root / "policy", build_policy(layout, size="tiny", seed=0), tok, layout, image_tokenizer=vq)
    prompts = write_prompt_sets(root / "prompts", world, train_per_tag=8, heldout_per_tag=1)
    return policy, prompts["train"]


class ObjectStore:
    """Bytes and objects in this cluster's object stores (what ``ray memory --stats-only`` reports), read from the
    raylet. The cluster is named by address: other Ray instances on the machine would make Ray's own default
    lookup ambiguous."""

    def __init__(self):
        import ray
        from ray._private.internal_api import get_state_from_address

        self.state = get_state_from_address(ray.get_runtime_context().gcs_address)

    def read(self) -> tuple[float, int]:
        """(MiB used, objects)."""
        from ray._private.internal_api import get_memory_info_reply

        stats = get_memory_info_reply(self.state).store_stats
        return stats.object_store_bytes_used / 2**20, int(stats.num_local_objects)


def process_figures(pid: int) -> dict:
    import psutil

    p = psutil.Process(pid)
    return {"rss_mib": p.memory_info().rss / 2**20, "fds": p.num_fds(), "threads": p.num_threads()}


def make_sampler(run, every: int, samples: list, ckroot: Path):
    """A TrainerCallback that records the figures after every ``every``-th step (and after step 1)."""
    from transformers import TrainerCallback

    rewards = run.trainer.reward_funcs[0].reward.shared.pool
    (rollout_pid,) = run.pool.worker_pids()
    (reward_pid,) = rewards.pids().values()
    store = ObjectStore()

    class Sampler(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            if step != 1 and step % every:
                return
            # processes first: the object-store query opens a channel of its own
            figures = {"learner": process_figures(os.getpid()),
                       "rollout_actor": {"pid": rollout_pid, **process_figures(rollout_pid)},
                       "reward_actor": {"pid": reward_pid, **process_figures(reward_pid)}}
            mib, objects = store.read()
            hidden = [p.name for p in ckroot.iterdir() if p.name.startswith(".")] if ckroot.is_dir() else []
            samples.append({"step": step, "t": time.time(), **figures, "plasma_mib": mib, "plasma_objects": objects,
                            "checkpoint_temp_dirs": len(hidden)})
            if step % (10 * every) and step != 1:
                return
            s = samples[-1]
            print(f"  step {step:4d}: learner {s['learner']['rss_mib']:.0f} MiB {s['learner']['fds']} fds | rollout "
                  f"{s['rollout_actor']['rss_mib']:.0f} MiB {s['rollout_actor']['fds']} fds | reward "
                  f"{s['reward_actor']['rss_mib']:.0f} MiB {s['reward_actor']['fds']} fds | plasma {mib:.2f} MiB "
                  f"{objects} objects", flush=True)

    return Sampler()


def slope_per_100(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs, per 100 steps."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return 100.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def analyse(samples: list[dict], warmup: int) -> dict:
    """Growth from the first quarter of the post-warm-up samples to the last quarter.

    RSS: median of the late window vs median of the early window (and the slope over all of them). File
    descriptors and object-store objects go up and down within a step (a gRPC socket, a batch in flight), so
    "not growing" means the late window's maximum is no higher than the early window's maximum.
    """
    import statistics

    after = [s for s in samples if s["step"] >= warmup]
    if len(after) < 2:
        raise ValueError(f"need at least 2 samples after the warm-up (step {warmup}); got {len(after)}")
    w = max(1, len(after) // 4)
    early, late = after[:w], after[-w:]
    steps = [s["step"] for s in after]
    out = {"from_step": after[0]["step"], "to_step": after[-1]["step"], "window_samples": w, "processes": {}}

    def med(rows, get):
        return statistics.median(get(r) for r in rows)

    for proc in ("learner", "rollout_actor", "reward_actor"):
        def rss(r, proc=proc):
            return r[proc]["rss_mib"]

        rss0, rss1 = med(early, rss), med(late, rss)
        fds0, fds1 = max(r[proc]["fds"] for r in early), max(r[proc]["fds"] for r in late)
        out["processes"][proc] = {
            "rss_start_mib": rss0, "rss_end_mib": rss1, "rss_max_mib": max(r[proc]["rss_mib"] for r in after),
            "rss_growth": (rss1 - rss0) / rss0,
            "rss_slope_mib_per_100_steps": slope_per_100(steps, [r[proc]["rss_mib"] for r in after]),
            "fds_start": fds0, "fds_end": fds1, "fds_growth": fds1 - fds0,
            "threads_start": max(r[proc]["threads"] for r in early), "threads_end": max(r[proc]["threads"] for r in late),
            "restarted": proc != "learner" and len({r[proc]["pid"] for r in after}) > 1,
        }
    o0, o1 = max(r["plasma_objects"] for r in early), max(r["plasma_objects"] for r in late)
    m0, m1 = max(r["plasma_mib"] for r in early), max(r["plasma_mib"] for r in late)
    out["object_store"] = {"objects_start": o0, "objects_end": o1, "objects_growth": o1 - o0,
                           "mib_start": m0, "mib_end": m1, "mib_growth": m1 - m0,
                           "objects_max": max(r["plasma_objects"] for r in after),
                           "mib_max": max(r["plasma_mib"] for r in after)}
    out["checkpoint_temp_dirs_end"] = after[-1]["checkpoint_temp_dirs"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="40 steps")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 200, --quick 40)")
    ap.add_argument("--warmup", type=int, default=None, help="steps before growth is measured (default steps/10)")
    ap.add_argument("--sample-every", type=int, default=1, help="record the figures every N steps")
    ap.add_argument("--checkpoint-every", type=int, default=25, help="checkpoint every N steps (keep 2)")
    ap.add_argument("--work-dir", default=None, help="policy and run outputs (default: a temp dir)")
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = ap.parse_args(argv)
    steps = args.steps or (40 if args.quick else 200)
    warmup = args.warmup if args.warmup is not None else max(args.sample_every, steps // 10)

    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from argrpo.cluster import init_ray, shutdown_ray
    from argrpo.config import load_config
    from argrpo.grpo.config import GRPORunConfig
    from argrpo.grpo.trainer import build_run

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    policy, prompts = prepare(work)
    init_ray(num_cpus=3)
    out = work / "run"
    sets = {
        "output_dir": str(out), "seed": 0, "threads": 1, "policy.checkpoint": str(policy),
        "rewards": "[{name: geneval_dense}]", "reward_actors": True, "data.train_prompts": str(prompts),
        "rollout.num_workers": 1, "rollout.num_cpus_per_worker": 1, "rollout.mode": "sync",
        "grpo.num_generations": 4, "grpo.per_device_train_batch_size": 8, "grpo.max_steps": steps,
        "grpo.learning_rate": 1e-3, "grpo.loss_type": "grpo", "logging.report_to": "[]",
        "logging.image_every": args.checkpoint_every, "logging.progress": False,
        "checkpoint.every": args.checkpoint_every, "checkpoint.keep": 2, "checkpoint.save_final": False,
    }
    cfg = load_config(GRPORunConfig, None, [f"{k}={v}" for k, v in sets.items()])
    print(f"[soak] {steps} GRPO steps, tiny policy, 1 Ray rollout actor + 1 reward actor, sampling every "
          f"{args.sample_every} steps, warm-up {warmup} steps; work dir {work}", flush=True)
    samples: list[dict] = []
    loads = [os.getloadavg()[0]]
    run = build_run(cfg)
    run.trainer.add_callback(make_sampler(run, args.sample_every, samples, out / "checkpoints"))
    t0 = time.perf_counter()
    try:
        run.trainer.train()
    finally:
        run.close()
        wall = time.perf_counter() - t0
        loads.append(os.getloadavg()[0])
        shutdown_ray()

    a = analyse(samples, warmup)
    targets = {}
    for proc, f in a["processes"].items():
        targets[f"{proc} RSS growth after warm-up < 10%"] = {"value": f["rss_growth"], "met": f["rss_growth"] < 0.10}
        targets[f"{proc} open fds not growing"] = {"value": f["fds_growth"], "met": f["fds_growth"] <= 0}
    os_ = a["object_store"]
    targets["object store objects not growing"] = {"value": os_["objects_growth"], "met": os_["objects_growth"] <= 0}
    targets["object store MiB not growing"] = {"value": os_["mib_growth"], "met": os_["mib_growth"] <= 0}
    targets["no checkpoint temp dirs left"] = {"value": a["checkpoint_temp_dirs_end"],
                                               "met": a["checkpoint_temp_dirs_end"] == 0}

    from bench.common import environment, write_results

    rows = []
    for proc, f in a["processes"].items():
        rows.append({"process": proc, "RSS MiB (warm)": f["rss_start_mib"], "RSS MiB (end)": f["rss_end_mib"],
                     "RSS growth": f"{f['rss_growth']:+.1%}",
                     "slope MiB/100 steps": f["rss_slope_mib_per_100_steps"],
                     "fds (warm -> end)": f"{f['fds_start']} -> {f['fds_end']}",
                     "threads (warm -> end)": f"{f['threads_start']} -> {f['threads_end']}",
                     "restarted": f["restarted"]})
    rows.append({"process": "object store", "RSS MiB (warm)": os_["mib_start"], "RSS MiB (end)": os_["mib_end"],
                 "RSS growth": f"{os_['mib_growth']:+.2f} MiB",
                 "fds (warm -> end)": f"{os_['objects_start']} -> {os_['objects_end']} objects"})
    env = environment(1)
    env["load_average_1m_during"] = loads
    name = "soak_quick" if args.quick and args.steps is None else "soak"
    notes = [
        f"{steps} GRPO steps in {wall / 60:.1f} min ({wall / steps:.2f} s/step): 'tiny' Qwen2 policy, shapes world "
        f"64 codes/image, P=2 prompts x G=4 per step, 1 Ray rollout actor (weights through the object store every "
        f"step), 1 Ray reward actor (geneval_dense), checkpoints and image grids every {args.checkpoint_every} steps.",
        f"growth: steps {a['from_step']}..{a['to_step']} after a {warmup}-step warm-up, first vs last "
        f"{a['window_samples']} samples (RSS: medians; fds and object-store objects/MiB: maxima), one sample after "
        f"every {args.sample_every} steps.",
        "targets: " + "; ".join(f"{k}: {v['value']:.3g} ({'met' if v['met'] else 'NOT met'})"
                                for k, v in targets.items()),
    ]
    results = {"config": {"steps": steps, "warmup": warmup, "sample_every": args.sample_every,
                          "checkpoint_every": args.checkpoint_every, "overrides": sets},
               "wall_s": wall, "analysis": a, "targets": targets, "samples": samples, "load_averages": loads,
               "environment": env}
    json_path, md_path = write_results(name, results, rows, notes=notes, out_dir=args.out)
    print(md_path.read_text(), flush=True)
    return 0 if all(t["met"] for t in targets.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
