"""Rollout scaling: images/s against the number of Ray rollout workers (1, 2) and against batch size (8 .. 128).

    python -m bench.scaling              # bench model (hidden 512, 8 layers), 256 tokens, SimpleAR vocabulary
    python -m bench.scaling --quick      # shapes-size model, 64 tokens
    python -m bench.scaling --part batch --batches 8 16 32 64 128

Same model as bench/rollout.py (random weights, text vocabulary of 151,672 ids before a 16,384-code block), no CFG,
temperature 1.

- workers: ``rollout.RolloutPool`` with 1 and 2 Ray actors (torch engine, 1 CPU and 1 thread each) sampling
  P=8 x G=8 images per call; each worker builds the same seeded model itself. Images/s is wall-clock (the driver
  waits for all workers). On a 2-core machine 2 workers can at best double 1 worker's rate, and only when nothing
  else runs.
- batch: the torch engine in this process (1 thread), P x G=8 images per call for batches 8, 16, 32, 64, 128.
  Reported per batch: images/s (wall), images per CPU-second (this process's CPU time: what the engine would do on
  a core of its own; other processes on a shared machine stretch the wall time, not the CPU time), and the model
  FLOP/s over CPU time as a fraction of the ``torch.matmul`` peak on the same batch's linear shapes, measured in
  this process by the same CPU clock (best of repeats, before and after).
Writes bench/results/scaling.json and scaling.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.rollout import CONFIGS, _shapes, build, engine_flops


def make_components(cfg, seed: int = 0, own_session: bool = False):
    """PolicyComponents of the bench model; runs inside each Ray worker (a picklable recipe, not the weights).

    own_session: move the worker into a session of its own first, so that under Linux autogroup scheduling each
    worker gets its own CPU share (as on separate cores or nodes) instead of all workers sharing the Ray
    cluster's one share while other sessions keep the cores busy.
    """
    from argrpo.rollout.worker import PolicyComponents

    if own_session:
        try:
            os.setsid()
        except OSError:  # already a session or process-group leader: keeps its session
            pass

    layout, model, _, uncond = build(cfg, seed=seed)
    return PolicyComponents(model=model, layout=layout, uncond_prompt_ids=uncond)


def matmul_peak_cpu(model, layout, rows: int, repeats: int = 5, iters: int = 10) -> float:
    """FLOP per CPU-second of ``torch.matmul`` on one decode step's linear shapes ([rows, in] @ [in, out]).

    Timed with this process's CPU clock (single-threaded: the time the core was really ours), best of ``repeats``:
    wall-clock peaks on a shared machine come out low by the machine's load, which flatters any fraction of them.
    """
    layer, n_layers, head, _ = _shapes(model, layout)
    shapes = layer * n_layers + [head]
    dtype = next(model.parameters()).dtype
    xs = {i: torch.randn(rows, i, dtype=dtype) for i, _ in shapes}
    ws = [torch.randn(i, o, dtype=dtype) for i, o in shapes]
    flops = sum(2 * rows * i * o for i, o in shapes) * iters
    best = float("inf")
    for _ in range(repeats):
        c0 = time.process_time()
        for _ in range(iters):
            for (i, _), w in zip(shapes, ws):
                torch.matmul(xs[i], w)
        best = min(best, time.process_time() - c0)
    return flops / best


def _timed(fn, repeats: int):
    """[(wall s, this process's CPU s)] of ``repeats`` calls, and the last result."""
    out, times = None, []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return times, out


def scale_workers(cfg, prompts, G: int, counts: list[int], repeats: int, own_session: bool = True) -> list[dict]:
    from argrpo.cluster import init_ray
    from argrpo.rollout.pool import RolloutConfig, RolloutPool
    from argrpo.rollout.types import SamplingParams

    from bench.common import summarize

    # Ray workers import bench.scaling to unpickle the model recipe
    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    init_ray(num_cpus=max(max(counts), len(os.sched_getaffinity(0))))
    sp = SamplingParams(temperature=1.0, seed=0)
    out = []
    for n in counts:
        t0 = time.perf_counter()
        pool = RolloutPool(functools.partial(make_components, cfg, own_session=own_session),
                           RolloutConfig(num_workers=n, num_cpus_per_worker=1))
        startup = time.perf_counter() - t0
        try:
            pool.generate(prompts[:n], 1, sp)  # warm-up: one short call per worker
            times, ro = _timed(lambda pool=pool: pool.generate(prompts, G, sp), repeats)
        finally:
            pool.shutdown()
        B = len(prompts) * G
        assert tuple(ro.completion_ids.shape) == (B, cfg.grid[0] * cfg.grid[1])
        wall = summarize([w for w, _ in times])
        out.append({"workers": n, "images": B, "seconds": wall, "images_per_s": B / wall["median"],
                    "startup_s": startup, "load_1m": os.getloadavg()[0]})
        print(f"  workers {n}: {B / wall['median']:.3f} images/s (median {wall['median']:.1f}s, "
              f"spread {wall['spread']:.1%}), start-up {startup:.1f}s", flush=True)
    import ray

    ray.shutdown()
    return out


def scale_batch(cfg, batches: list[int], G: int, repeats: int) -> list[dict]:
    from argrpo.rollout.engines.torch_engine import TorchEngine
    from argrpo.rollout.types import SamplingParams

    from bench.common import summarize

    P_max = max(batches) // G
    layout, model, prompts, uncond = build(replace(cfg, P=P_max))
    engine = TorchEngine(model, layout, uncond_prompt_ids=uncond)
    engine.generate(prompts[:1], SamplingParams(n=1, seed=0))  # warm-up
    out = []
    for B in batches:
        if B % G:
            raise ValueError(f"batch {B} is not a multiple of G={G}")
        P = B // G
        sp = SamplingParams(temperature=1.0, n=G, seed=0)
        peak0 = matmul_peak_cpu(model, layout, rows=B)
        times, ro = _timed(lambda P=P, sp=sp: engine.generate(prompts[:P], sp), repeats)
        peak = max(peak0, matmul_peak_cpu(model, layout, rows=B))
        assert tuple(ro.completion_ids.shape) == (B, layout.n_image_tokens)
        wall, cpu = summarize([w for w, _ in times]), summarize([c for _, c in times])
        fl = engine_flops(model, layout, prompts[:P], G, False)
        row = {"batch": B, "P": P, "G": G, "seconds": wall, "cpu_seconds": cpu, "images_per_s": B / wall["median"],
               "images_per_cpu_s": B / cpu["median"], "flops": fl, "flops_per_cpu_s": fl / cpu["min"],
               "matmul_peak_flops_per_s": peak, "fraction_of_peak": fl / cpu["min"] / peak,
               "load_1m": os.getloadavg()[0]}
        out.append(row)
        print(f"  batch {B:4d}: {row['images_per_s']:.3f} images/s wall, {row['images_per_cpu_s']:.3f} per CPU-s, "
              f"{row['flops_per_cpu_s'] / 1e9:.1f} GFLOP/s = {row['fraction_of_peak']:.1%} of matmul peak "
              f"{peak / 1e9:.1f}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shapes-size model, 64 tokens")
    ap.add_argument("--part", choices=["all", "workers", "batch"], default="all")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default 8 16 32 64 128")
    ap.add_argument("--worker-niceness", type=int, default=0,
                    help="nice value of the local Ray cluster's workers (Ray's own default is 15, which starves the "
                         "rollout actors whenever other processes share the cores; see bench/NOTES.md)")
    ap.add_argument("--no-isolate", dest="isolate", action="store_false",
                    help="leave every Ray worker in the cluster's session (one CPU share for all of them under "
                         "autogroup scheduling when other sessions are busy)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    os.environ["RAY_worker_niceness"] = str(args.worker_niceness)  # read by the raylet this process starts
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from bench.common import environment, write_results

    cfg = CONFIGS["quick" if args.quick else "full"]
    G = 8
    cfg = replace(cfg, G=G)
    batches = args.batches or [8, 16, 32, 64, 128]
    name = "scaling_quick" if args.quick else "scaling"
    load_start = os.getloadavg()[0]
    print(f"[{name}] model size '{cfg.size}', {cfg.grid[0] * cfg.grid[1]} tokens/image, vocab {cfg.text_vocab}+"
          f"{cfg.codebook}", flush=True)
    results: dict = {"config": {**cfg.__dict__, "G": G, "batches": batches, "workers": args.workers,
                                "repeats": args.repeats, "worker_niceness": args.worker_niceness,
                                "workers_in_own_sessions": args.isolate}}
    rows = []
    if args.part in ("all", "workers"):
        _, _, prompts, _ = build(replace(cfg, P=8))
        w = scale_workers(cfg, prompts, G, args.workers, args.repeats, own_session=args.isolate)
        results["workers"] = w
        base = w[0]["images_per_s"]
        for r in w:
            r["speedup"] = r["images_per_s"] / base
            rows.append({"scan": "workers", "workers": r["workers"], "batch": r["images"],
                         "images/s": r["images_per_s"], "spread": r["seconds"]["spread"], "x 1 worker": r["speedup"],
                         "load": r["load_1m"]})
    if args.part in ("all", "batch"):
        b = scale_batch(cfg, batches, G, args.repeats)
        results["batch"] = b
        for r in b:
            rows.append({"scan": "batch", "workers": "in-process", "batch": r["batch"], "images/s": r["images_per_s"],
                         "spread": r["seconds"]["spread"], "images/CPU-s": r["images_per_cpu_s"],
                         "GFLOP/CPU-s": r["flops_per_cpu_s"] / 1e9,
                         "of matmul peak": r["fraction_of_peak"], "load": r["load_1m"]})
    env = environment(1)
    env["load_average_1m_start"] = load_start
    results["environment"] = env
    notes = [
        f"model: models.policy size '{cfg.size}' (Qwen2), vocab {cfg.text_vocab} text + {cfg.codebook} codes, "
        f"{cfg.grid[0] * cfg.grid[1]} tokens/image, float32, no CFG, torch engine, 1 thread per process; "
        f"medians of {args.repeats} calls after a warm-up",
        f"workers: Ray RolloutPool, 1 CPU / 1 thread per actor (nice {args.worker_niceness}"
        + (", each in a session of its own: its own CPU share under autogroup scheduling" if args.isolate else "")
        + "), P=8 x G=8 images per call (wall-clock images/s)",
        "batch: in-process engine; images/CPU-s and GFLOP/CPU-s use this process's CPU time (immune to other "
        "processes' share of the cores); 'of matmul peak' = model FLOP/s over the best CPU time divided by the best "
        "torch.matmul FLOP per CPU-s on that batch's decode-step shapes",
        f"1-min load average at start: {load_start:.1f}",
    ]
    cols = ["scan", "workers", "batch", "images/s", "spread", "x 1 worker", "images/CPU-s", "GFLOP/CPU-s",
            "of matmul peak", "load"]
    json_path, md_path = write_results(name, results, rows, cols, notes, out_dir=args.out)
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
