"""torch.profiler on the torch engine's decode at batch 64: where one rollout call's time goes.

    python -m bench.profile_decode                 # bench model, SimpleAR vocabulary, 8 x 8 rows, 256 tokens, no CFG
    python -m bench.profile_decode --tokens 64 --cfg 3
    python -m bench.profile_decode --no-visual-head   # the full LM head, then slice (for comparison)
    python -m bench.profile_decode --no-column-major --no-gqa-decode   # without the engine's CPU fast paths

Prints (and writes to bench/results/profile_decode.txt) the operators by self CPU time, grouped into matmul
(linear/addmm/mm/bmm), attention (SDPA), sampling (softmax/cumsum/searchsorted/...), KV-cache copies and the
rest, plus the model FLOP/s over an unprofiled call's CPU time and a ``torch.matmul`` peak on the same shapes by
the same CPU clock (bench.scaling.matmul_peak_cpu).
The profile is of one warm call (a first call runs untimed).
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

GROUPS = {
    "matmul": ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
    "sampling": ("aten::_log_softmax", "aten::log_softmax", "aten::cumsum", "aten::searchsorted", "aten::exp",
                 "aten::gather", "aten::minimum", "aten::nextafter", "aten::clamp", "aten::argmax"),
    "cache/copies": ("aten::copy_", "aten::cat", "aten::index", "aten::index_select", "aten::contiguous",
                     "aten::clone"),
}


def group_of(name: str) -> str:
    for g, prefixes in GROUPS.items():
        if any(name.startswith(p) for p in prefixes):
            return g
    return "other ops"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=256, help="image tokens (a 16 x tokens/16 grid)")
    ap.add_argument("--P", type=int, default=8)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--vocab", type=int, default=151_672, help="text vocabulary before the codebook")
    ap.add_argument("--no-visual-head", action="store_true", help="full LM head, then slice")
    ap.add_argument("--no-column-major", action="store_true",
                    help="keep the linear weights row-major (the engine's default outside rollout workers)")
    ap.add_argument("--no-gqa-decode", action="store_true",
                    help="decode with transformers' own SDPA path (K/V repeated to every head), for comparison")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=25, help="operators listed")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "profile_decode.txt"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from argrpo.rollout.engines.torch_engine import TorchEngine
    from argrpo.rollout.types import SamplingParams
    from torch.profiler import ProfilerActivity, profile

    from bench.rollout import CONFIGS, build, engine_flops
    from bench.scaling import matmul_peak_cpu

    if args.tokens % 16:
        ap.error("--tokens must be a multiple of 16")
    if args.no_gqa_decode:
        import argrpo.rollout.engines.torch_engine as te

        te._decode_attention.__enter__ = lambda self: None  # leave the config's "sdpa" in place
    cfg = replace(CONFIGS["full"], grid=(args.tokens // 16, 16), P=args.P, G=args.G, text_vocab=args.vocab)
    layout, model, prompts, uncond = build(cfg)
    engine = TorchEngine(model, layout, uncond_prompt_ids=uncond, visual_head=not args.no_visual_head,
                         column_major_weights=not args.no_column_major)
    sp = SamplingParams(temperature=1.0, cfg_scale=args.cfg, n=args.G, seed=0)
    engine.generate(prompts[:1], sp.with_(n=1))
    rows = args.P * args.G * (2 if sp.use_cfg else 1)

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        t0, c0 = time.perf_counter(), time.process_time()
        engine.generate(prompts, sp)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # the same call again without the profiler: the profiler's own overhead is not the engine's
    t1, c1 = time.perf_counter(), time.process_time()
    engine.generate(prompts, sp)
    wall_plain, cpu_plain = time.perf_counter() - t1, time.process_time() - c1

    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events) or 1.0
    groups = defaultdict(float)
    for e in events:
        groups[group_of(e.key)] += e.self_cpu_time_total
    fl = engine_flops(model, layout, prompts, args.G, sp.use_cfg)
    peak = matmul_peak_cpu(model, layout, rows=rows)
    N = layout.n_image_tokens
    lines = [
        f"torch engine decode profile: model size 'bench' ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"params, vocab {model.config.vocab_size}), {args.P} x {args.G} images (cfg {args.cfg:g}: {rows} rows per "
        f"step), {N} tokens, {args.threads} thread(s), visual head {not args.no_visual_head}, "
        f"GQA decode attention {not args.no_gqa_decode}, column-major weights {not args.no_column_major}, "
        f"1-min load {os.getloadavg()[0]:.1f}",
        f"profiled call: wall {wall:.2f}s, CPU {cpu:.2f}s; unprofiled: wall {wall_plain:.2f}s, CPU {cpu_plain:.2f}s "
        f"({cpu_plain / N * 1e3:.1f} ms CPU per decode step)",
        f"model FLOPs {fl / 1e9:.1f} G -> {fl / cpu_plain / 1e9:.1f} GFLOP/s per CPU-s; matmul peak on the same "
        f"shapes {peak / 1e9:.1f} GFLOP per CPU-s -> {fl / cpu_plain / peak:.1%} of peak",
        "",
        "self CPU time by group (profiled call):",
    ]
    for g, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {g:14s} {t / 1e6:8.2f}s  {t / total_self:6.1%}")
    lines += ["", prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)]
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
