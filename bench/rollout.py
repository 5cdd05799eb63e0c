"""Rollout throughput: images/s of the PyTorch engine, the vLLM engine and a SimpleAR-style baseline.

    python -m bench.rollout            # bench model: Qwen2 hidden 512, 8 layers, head_dim 64, 256 tokens, 8 x 8
    python -m bench.rollout --quick    # hidden 256, 4 layers, 64 tokens, 4 x 4
    python -m bench.rollout --config long   # hidden 256, 4 layers, 1,024 tokens, 2 x 4
    python -m bench.rollout --vocab small   # a 256-word text vocabulary instead of SimpleAR's 151,672
    python -m bench.rollout --config long --images 8 8 --engines torch   # 64 images a call

Every configuration uses SimpleAR's vocabulary proportions: 151,672 text ids, then 64,000 visual codes.

Every engine samples the same number of images (P prompts x G samples, fixed-length visual tokens) from the same
random-weight model, with CFG (scale 3) and without. Images/s counts sampled token grids; decoding codes to pixels
is the same for every engine and left out.

Baseline (how SimpleAR samples with Hugging Face): ``model.generate`` on the P*G rows at once, sampling over the
full vocabulary with two logits processors: HF's ``UnbatchedClassifierFreeGuidanceLogitsProcessor`` (a second
forward pass for the unconditional rows with its own KV cache, CFG on full-vocabulary log-probs) and a
``PrefixConstrainedLogitsProcessor`` that allows only visual ids. Its distribution equals the engine's (the
full-vocabulary normaliser is a per-row constant that the visual renormalisation removes); greedy tokens of both
are compared as the "equal outputs" check.

Model FLOP/s of the torch engine: linear FLOPs actually computed (2 * active params * token rows: decoder
linears for every row, the LM head only for visual rows) plus attention (QK^T and AV over the padded context),
divided by the best time; reported as a fraction of a ``torch.matmul`` peak measured in the same run on the
same shapes (one decode step's chain of ``[rows, in] @ [in, out]`` products; best of measurements before and
after the runs, since other processes on a shared machine only ever slow either down).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import tempfile
import time
from dataclasses import dataclass

import torch

from bench.common import environment, summarize, time_repeats, write_results


@dataclass
class BenchConfig:
    size: str  # models.policy size preset
    grid: tuple[int, int]
    P: int
    G: int
    text_vocab: int
    codebook: int
    prompt_len: tuple[int, int]  # min, max prompt tokens


CONFIGS = {
    "full": BenchConfig("bench", (16, 16), 8, 8, 151_672, 64_000, (12, 40)),
    "quick": BenchConfig("shapes", (8, 8), 4, 4, 151_672, 64_000, (8, 24)),
    # long images from a small model: the 64,000-row head read at every step dominates (a memory-bound case)
    "long": BenchConfig("shapes", (32, 32), 2, 4, 151_672, 64_000, (8, 24)),
}
# SimpleAR's proportions by default: 64,000 codes after Qwen2.5's 151,665 text ids + 7 special tokens;
# `--vocab small` puts a small word-level text vocabulary (like the shapes world's) before them
TEXT_VOCABS = {"simplear": 151_672, "small": 256}
CFG_SCALE = 3.0


def build(cfg: BenchConfig, seed: int = 0):
    from argrpo.models.layout import TokenLayout
    from argrpo.models.policy import build_policy

    layout = TokenLayout(name="custom", text_vocab_size=cfg.text_vocab, visual_offset=cfg.text_vocab,
                         codebook_size=cfg.codebook, grid=cfg.grid, image_size=(cfg.grid[0] * 16, cfg.grid[1] * 16))
    model = build_policy(layout, size=cfg.size, seed=seed)
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(cfg.prompt_len[0], cfg.prompt_len[1] + 1, (cfg.P,), generator=g).tolist()
    prompts = [torch.randint(3, cfg.text_vocab, (n,), generator=g).tolist() for n in lens]
    uncond = [1, 2]  # "<t2i><soi>": the empty caption
    return layout, model, prompts, uncond


# ---- the SimpleAR-style baseline ----------------------------------------------------------------------------
def left_pad(rows: list[list[int]], pad: int = 0):
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r)
        mask[i, L - len(r):] = 1
    return ids, mask


@torch.inference_mode()
def hf_generate(model, layout, prompts, G, uncond, cfg_scale, greedy=False):
    """P*G rows through ``model.generate`` with a CFG processor (second pass) and a visual-ids prefix constraint.

    Runs on ``model.device``; returns the generated ids [P*G, layout.n_image_tokens] there.
    """
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import (
        PrefixConstrainedLogitsProcessor,
        UnbatchedClassifierFreeGuidanceLogitsProcessor,
    )

    dev = model.device
    rows = [p for p in prompts for _ in range(G)]
    ids, mask = (t.to(dev) for t in left_pad(rows))
    B, N = len(rows), layout.n_image_tokens
    allowed = torch.arange(layout.visual_offset, layout.visual_end, device=dev)
    procs = LogitsProcessorList()
    if cfg_scale != 1.0:
        u = torch.tensor([uncond] * B, device=dev)
        procs.append(UnbatchedClassifierFreeGuidanceLogitsProcessor(cfg_scale, model, u, torch.ones_like(u), True))
    procs.append(PrefixConstrainedLogitsProcessor(lambda batch_id, sent: allowed, num_beams=1))
    # top_k=0: without it generate samples from HF's default top-50
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    out = model.generate(
        input_ids=ids, attention_mask=mask, logits_processor=procs, **sampling,
        max_new_tokens=N, min_new_tokens=N, eos_token_id=None, pad_token_id=0, use_cache=True,
    )
    return out[:, ids.shape[1]:]


# ---- FLOPs and the matmul peak ----------------------------------------------------------------------------------
def _shapes(model, layout):
    c = model.config
    H, F = c.hidden_size, c.intermediate_size
    hd = getattr(c, "head_dim", None) or H // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    layer = [(H, q), (H, kv), (H, kv), (q, H), (H, F), (H, F), (F, H)]
    return layer, c.num_hidden_layers, (H, layout.codebook_size), q


def engine_flops(model, layout, prompts, G, use_cfg) -> float:
    """FLOPs the torch engine computes for one call (see the module docstring)."""
    layer, n_layers, head, q = _shapes(model, layout)
    body = 2 * n_layers * sum(i * o for i, o in layer)  # per token row
    head_f = 2 * head[0] * head[1]
    N = layout.n_image_tokens
    seqs = list(prompts) + ([[1, 2]] if use_cfg else [])
    L = max(len(s) for s in seqs)
    rows = len(prompts) * G * (2 if use_cfg else 1)
    flops = len(seqs) * L * body + len(seqs) * head_f  # prefill of the distinct prompts (padded), first logits
    flops += rows * (N - 1) * (body + head_f)  # decode steps
    attn = 4 * q * n_layers  # QK^T + AV per (query, key) pair
    flops += attn * len(seqs) * L * L
    flops += attn * rows * sum(L + t + 1 for t in range(N - 1))
    return float(flops)


def _clock():
    """The clock FLOP/s are timed with: this process's CPU time when torch runs one thread (only the time the core
    was really ours; on a shared machine wall time is stretched by the load, 3-4x at load 8-10 on 2 cores, which
    deflates a wall-clock peak and flatters any fraction of it), else wall time."""
    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


def matmul_peak(model, layout, rows, repeats=5, iters=10) -> float:
    """FLOP/s of ``torch.matmul`` on one decode step's linear shapes ([rows, in] @ [in, out]), best of repeats.

    Single-threaded it is timed by this process's CPU clock (:func:`_clock`), like the engine it is compared with.
    """
    layer, n_layers, head, _ = _shapes(model, layout)
    shapes = layer * n_layers + [head]
    dtype = next(model.parameters()).dtype
    xs = {i: torch.randn(rows, i, dtype=dtype) for i, _ in shapes}
    ws = [torch.randn(i, o, dtype=dtype) for i, o in shapes]
    flops = sum(2 * rows * i * o for i, o in shapes) * iters
    best = float("inf")
    clock = _clock()
    for _ in range(repeats):
        t0 = clock()
        for _ in range(iters):
            for (i, _), w in zip(shapes, ws):
                torch.matmul(xs[i], w)
        best = min(best, clock() - t0)
    return flops / best


# ---- vLLM -------------------------------------------------------------------------------------------------------
def vllm_engine_or_reason(model, layout, rows):
    """(engine, startup seconds, None) or (None, None, why not)."""
    try:
        from argrpo.rollout.engines import get_engine

        cls = get_engine("vllm")
    except Exception as e:  # noqa: BLE001 - any import problem means "not available" here
        return None, None, f"not available ({type(e).__name__}: {e})"
    tmp = tempfile.mkdtemp(prefix="bench-vllm-")
    model.save_pretrained(tmp)
    try:
        t0 = time.perf_counter()
        engine = cls(tmp, layout, max_num_seqs=max(2 * rows, 2), kv_cache_gib=2.0)
        return engine, time.perf_counter() - t0, None
    except Exception as e:  # noqa: BLE001
        return None, None, f"failed to start ({type(e).__name__}: {str(e)[:200]})"


# ---- main -------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the same as --config quick")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="full",
                    help="full: hidden 512, 8 layers, 256 tokens, 8 x 8; quick: hidden 256, 4 layers, 64 tokens, "
                         "4 x 4; long: hidden 256, 4 layers, 1,024 tokens, 2 x 4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline-repeats", type=int, default=None,
                    help="timed repeats of hf_generate and vLLM (default: --repeats; each is minutes per call)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or 1)")
    ap.add_argument("--engines", default="torch,hf,vllm", help="comma list of torch, hf, vllm")
    ap.add_argument("--vocab", choices=sorted(TEXT_VOCABS), default="simplear",
                    help="text vocabulary before the codebook: SimpleAR's (151,672) or a small one (256)")
    ap.add_argument("--images", type=int, nargs=2, default=None, metavar=("P", "G"),
                    help="P prompts x G samples a call instead of the config's (results: <name>_<P*G>img)")
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = ap.parse_args(argv)

    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    from dataclasses import replace

    config = "quick" if args.quick else args.config
    name = "rollout" + ("" if config == "full" else f"_{config}") + (
        "" if args.vocab == "simplear" else f"_{args.vocab}_vocab")
    cfg = replace(CONFIGS[config], text_vocab=TEXT_VOCABS[args.vocab])
    if args.images is not None:
        cfg = replace(cfg, P=args.images[0], G=args.images[1])
        name += f"_{cfg.P * cfg.G}img"
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    layout, model, prompts, uncond = build(cfg)
    B, N = cfg.P * cfg.G, layout.n_image_tokens
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{name}] model {n_params / 1e6:.1f}M params, vocab {model.config.vocab_size}, {N} tokens/image, "
          f"{cfg.P} prompts x {cfg.G} = {B} images, {threads} threads", flush=True)

    from argrpo.rollout.engines.torch_engine import TorchEngine
    from argrpo.rollout.types import SamplingParams

    # the engine gets its own copy, as in a rollout worker (which owns the model it loaded): its CPU fast path
    # re-lays the linear weights (column_major_weights), which the baseline and vLLM's save must not see
    torch_engine = TorchEngine(copy.deepcopy(model), layout, uncond_prompt_ids=uncond, column_major_weights=True)
    results = {"config": {**cfg.__dict__, "params": n_params, "vocab_size": model.config.vocab_size,
                          "n_image_tokens": N, "images_per_call": B, "cfg_scale": CFG_SCALE, "threads": threads},
               "runs": {}, "checks": {}}
    rows = []

    def sp(cfg_scale, n=cfg.G, greedy=False):
        return SamplingParams(temperature=0.0 if greedy else 1.0, cfg_scale=cfg_scale, n=n, seed=0)

    # equal outputs: greedy tokens of the engine and of the baseline on 2 prompts, with and without CFG
    if "hf" in engines and "torch" in engines:
        for s in (1.0, CFG_SCALE):
            a = torch_engine.generate(prompts[:2], sp(s, n=1, greedy=True)).completion_ids
            b = hf_generate(model, layout, prompts[:2], 1, uncond, s, greedy=True)
            results["checks"][f"greedy_match_cfg{s:g}"] = float((a == b).float().mean())
            print(f"  greedy token match torch vs hf (cfg {s:g}): {results['checks'][f'greedy_match_cfg{s:g}']:.4f}")

    vllm_engine, vllm_reason = None, None
    if "vllm" in engines:
        vllm_engine, startup, vllm_reason = vllm_engine_or_reason(model, layout, B)
        results["vllm"] = {"startup_s": startup, "status": vllm_reason or "ok"}
        print(f"  vllm: {vllm_reason or f'started in {startup:.1f}s'}", flush=True)

    warm_prompts = prompts[:1]
    peaks = {s: matmul_peak(model, layout, rows=B * (2 if s != 1.0 else 1)) for s in (1.0, CFG_SCALE)}
    for s in (1.0, CFG_SCALE):
        label = "cfg" if s != 1.0 else "no_cfg"
        calls = {}
        if "torch" in engines:
            calls["torch"] = (lambda s=s: torch_engine.generate(prompts, sp(s)),
                              lambda s=s: torch_engine.generate(warm_prompts, sp(s, n=1)))
        if "hf" in engines:
            calls["hf_generate"] = (lambda s=s: hf_generate(model, layout, prompts, cfg.G, uncond, s),
                                    lambda s=s: hf_generate(model, layout, warm_prompts, 1, uncond, s))
        if vllm_engine is not None:
            calls["vllm"] = (lambda s=s: vllm_engine.generate(prompts, sp(s), uncond_prompt_ids=uncond),
                             lambda s=s: vllm_engine.generate(warm_prompts, sp(s, n=1), uncond_prompt_ids=uncond))
        for eng, (fn, warm) in calls.items():
            warm()
            gc.collect()
            cpu = []
            n_rep = args.repeats if eng == "torch" or args.baseline_repeats is None else args.baseline_repeats
            times, out = time_repeats(fn, repeats=n_rep, warmup=0, cpu=cpu)
            ids = out.completion_ids if hasattr(out, "completion_ids") else out
            assert ids.shape == (B, N) and bool(layout.is_visual(ids).all()), f"{eng} produced non-visual ids"
            stats = summarize(times)
            cpu_stats = summarize(cpu)
            results["runs"][f"{eng}/{label}"] = {"seconds": stats, "cpu_seconds": cpu_stats,
                                                 "images_per_s": B / stats["median"],
                                                 "images_per_cpu_s": B / cpu_stats["median"]}
            print(f"  {eng:12s} {label:7s} {B / stats['median']:8.3f} images/s  "
                  f"(median {stats['median']:.2f}s, spread {stats['spread']:.1%}; "
                  f"{B / cpu_stats['median']:.3f} images per CPU-s)", flush=True)
        base = results["runs"].get(f"hf_generate/{label}")
        for eng in calls:
            r = results["runs"][f"{eng}/{label}"]
            r["speedup_vs_hf"] = r["images_per_s"] / base["images_per_s"] if base else None
            r["cpu_speedup_vs_hf"] = r["images_per_cpu_s"] / base["images_per_cpu_s"] if base else None
            row = {"engine": eng, "cfg": s, "images/s": r["images_per_s"], "s/call (median)": r["seconds"]["median"],
                   "spread": r["seconds"]["spread"], "x hf_generate": r["speedup_vs_hf"],
                   "images/CPU-s": r["images_per_cpu_s"], "x hf (CPU time)": r["cpu_speedup_vs_hf"]}
            if eng == "torch":
                # contention from other processes only ever slows things down: best time vs best peak
                fl = engine_flops(model, layout, prompts, cfg.G, s != 1.0)
                peak = max(peaks[s], matmul_peak(model, layout, rows=B * (2 if s != 1.0 else 1)))
                best = r["cpu_seconds"]["min"] if threads == 1 else r["seconds"]["min"]  # the peak's clock
                r.update(flops=fl, flops_per_s=fl / best, matmul_peak_flops_per_s=peak,
                         fraction_of_peak=fl / best / peak)
                row["GFLOP/s"] = r["flops_per_s"] / 1e9
                row["peak GFLOP/s"] = peak / 1e9
                row["of matmul peak"] = r["fraction_of_peak"]
                print(f"  torch model FLOP/s {r['flops_per_s'] / 1e9:.2f} G = {r['fraction_of_peak']:.1%} of the "
                      f"matmul peak {peak / 1e9:.2f} G on the same shapes", flush=True)
            rows.append(row)
    if "vllm" in engines and vllm_engine is None:
        rows.append({"engine": "vllm", "cfg": None, "images/s": None, "x hf_generate": None,
                     "s/call (median)": None, "spread": None, "note": vllm_reason})
    if vllm_engine is not None and hasattr(vllm_engine, "close"):
        vllm_engine.close()

    env = environment(threads)
    results["environment"] = env
    notes = [
        f"model: models.policy size '{cfg.size}' (Qwen2), {n_params / 1e6:.1f}M params, vocab {model.config.vocab_size} "
        f"(text {cfg.text_vocab} + codebook {cfg.codebook}), {N} tokens/image, {cfg.P} prompts x {cfg.G} samples, "
        f"float32, {threads} torch threads, {args.repeats} timed repeats of the torch engine"
        + (f" ({args.baseline_repeats} of hf_generate and vLLM)" if args.baseline_repeats is not None else "")
        + " after a warm-up call; the torch engine runs its own copy of the weights with column_major_weights "
        "(as in a rollout worker)",
        "hf_generate: SimpleAR-style Hugging Face generate (CFG as a second pass with its own KV cache, "
        "full-vocabulary sampling restricted to visual ids by a prefix-constraint processor)",
        "images/CPU-s: images per second of this process's CPU time (vLLM's engine core runs in-process too); "
        "less sensitive than wall time to other processes on a shared machine",
        "GFLOP/s: the torch engine's model FLOPs over its best time; peak: best torch.matmul FLOP/s on one decode "
        "step's linear shapes, measured before and after the runs; both by this process's CPU clock when torch runs "
        "1 thread (wall clock otherwise)",
        "greedy token match torch vs hf_generate: " + ", ".join(f"{k} {v:.4f}" for k, v in results["checks"].items()),
    ]
    if "vllm" in results:
        notes.append(f"vllm: {results['vllm']['status']}" + (f", start-up {results['vllm']['startup_s']:.1f}s (not timed)"
                                                          if results["vllm"]["startup_s"] else ""))
    cols = ["engine", "cfg", "images/s", "s/call (median)", "spread", "x hf_generate", "images/CPU-s",
            "x hf (CPU time)", "GFLOP/s", "peak GFLOP/s", "of matmul peak"]
    if any("note" in r for r in rows):
        cols.append("note")
    json_path, md_path = write_results(name, results, rows, cols, notes, out_dir=args.out)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
