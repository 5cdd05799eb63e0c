"""Speculative Jacobi decoding (SJD) vs plain sampling: forward passes, acceptance, wall time, distribution.

    python -m bench.jacobi                                   # shapes model + bench model
    python -m bench.jacobi --quick                           # fewer samples, shapes model only
    python -m bench.jacobi --shapes-checkpoint runs/demo/sft # a trained shapes policy (default: newest under runs/)

Models:
- ``shapes``: a trained shapes-world policy (``--shapes-checkpoint``, else the newest ``runs/**/argrpo.json`` with the
  shapes layout); without one, random weights of the shapes size (hidden 256, 4 layers, 64 tokens, 109 codes).
- ``bench``: random weights, hidden 512, 8 layers, 256 tokens (16 x 16), 16,384 codes.
Random weights give nearly flat next-token distributions, so almost every draft is accepted: their step counts say
what the machinery does, not what a trained model gains. Only a trained checkpoint's acceptance is representative.

Per model and CFG scale:
- steps: forward passes of one batched call (``P x G`` rows; plain needs ``N``; the batch runs until its slowest row),
  the per-row ratio (``N`` / mean passes per row), tokens gained per row per pass, acceptance per window offset
  (P(accept | checked)); for several windows and three draft proposals: the defaults (neighbour prior + coupled
  re-drafts), without the neighbour prior, and SJD as published (fresh re-drafts from the stale target);
- wall: median seconds of plain vs SJD at batch 1 (latency, SimpleAR's setting) and at the batch above;
- distribution: many samples of one prompt from SJD, from plain sampling and from plain sampling with another seed
  (the noise floor): per-position total variation of token frequencies, the smallest per-position chi-square
  p-value (Bonferroni over positions), per-position mean sampler logprob as a z-score of the difference;
- logprob err: largest difference between SJD's sampler logprobs and log p recomputed by full forwards (CFG incl.);
- greedy: fraction of rows where SJD greedy == plain greedy (exact in float64; float32 may flip near-ties);
- GenEval-shapes score of plain vs SJD (trained shapes checkpoint + the ``shapes`` detector), same prompts and seeds.

Writes bench/results/jacobi.json and jacobi.md (``--out`` for another directory).
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import time
from pathlib import Path

import torch

from bench.common import environment, summarize, time_repeats, write_results

BENCH_MODEL = dict(size="bench", grid=(16, 16), codebook=16_384, text_vocab=256)
SHAPES_RANDOM = dict(size="shapes", grid=(8, 8), codebook=109, text_vocab=64)
# draft proposals compared for pass counts: the defaults (neighbour prior + coupled re-drafts), no neighbour prior,
# and SJD as published (re-drafts sampled afresh from the stale target, no prior)
VARIANTS = {
    "default": {},
    "no-prior": {"copy_left": 0.0, "copy_up": 0.0},
    "plain-sjd": {"copy_left": 0.0, "copy_up": 0.0, "couple": False},
}


# ---- models -----------------------------------------------------------------------------------------------------
def find_shapes_checkpoint(root: str = "runs") -> str | None:
    """Newest trained checkpoint under ``root``: argrpo.json with the shapes layout and a training step recorded
    (``extra.stage_step`` or ``grpo_step``, which the training stages write; a freshly built policy has neither)."""
    import json

    best, best_t = None, -1.0
    for meta in glob.glob(os.path.join(root, "**", "argrpo.json"), recursive=True):
        try:
            data = json.loads(Path(meta).read_text())
        except (OSError, ValueError):
            continue
        d, extra = Path(meta).parent, data.get("extra") or {}
        trained = bool(extra.get("stage_step") or extra.get("grpo_step") or extra.get("step"))
        weights = (d / "model.safetensors").exists() or (d / "adapter_config.json").exists()
        if data.get("layout", {}).get("name") == "shapes" and trained and weights:
            t = d.stat().st_mtime
            if t > best_t:
                best, best_t = str(d), t
    return best


def random_model(spec: dict, seed: int = 0):
    from argrpo.models.layout import TokenLayout
    from argrpo.models.policy import build_policy

    layout = TokenLayout(name="custom", text_vocab_size=spec["text_vocab"], visual_offset=spec["text_vocab"],
                         codebook_size=spec["codebook"], grid=spec["grid"],
                         image_size=(spec["grid"][0] * 8, spec["grid"][1] * 8))
    model = build_policy(layout, size=spec["size"], seed=seed)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, spec["text_vocab"], (int(n),), generator=g).tolist()
               for n in torch.randint(6, 20, (8,), generator=g)]
    return model, layout, prompts


# ---- statistics -------------------------------------------------------------------------------------------------
def _chi2_sf(stat: float, df: int) -> float:
    """Chi-square survival function (Wilson-Hilferty normal approximation)."""
    df = max(df, 1)
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def compare_samples(a: torch.Tensor, b: torch.Tensor, la: torch.Tensor, lb: torch.Tensor, bins: int,
                    min_count: int = 10) -> dict:
    """Codes a [n, N], b [m, N] (already binned to ``bins``) and their sampler logprobs -> per-position statistics."""
    tvs, pvals, zs = [], [], []
    for t in range(a.shape[1]):
        ha = torch.bincount(a[:, t], minlength=bins).double()
        hb = torch.bincount(b[:, t], minlength=bins).double()
        tvs.append(0.5 * float((ha / len(a) - hb / len(b)).abs().sum()))
        big = (ha + hb) >= min_count
        ha, hb = torch.cat([ha[big], ha[~big].sum()[None]]), torch.cat([hb[big], hb[~big].sum()[None]])
        keep = (ha + hb) > 0
        ha, hb = ha[keep], hb[keep]
        tot = ha + hb
        ea, eb = tot * len(a) / (len(a) + len(b)), tot * len(b) / (len(a) + len(b))
        pvals.append(_chi2_sf(float(((ha - ea) ** 2 / ea + (hb - eb) ** 2 / eb).sum()), len(tot) - 1))
        xa, xb = la[:, t].double(), lb[:, t].double()
        se = math.sqrt(float(xa.var()) / len(xa) + float(xb.var()) / len(xb)) or 1e-12
        zs.append(float(xa.mean() - xb.mean()) / se)
    N = a.shape[1]
    return {
        "tv_mean": sum(tvs) / N,
        "tv_max": max(tvs),
        "min_pvalue_bonferroni": min(1.0, min(pvals) * N),
        "logprob_z_max_abs": max(abs(z) for z in zs),
        "logprob_z_rms": math.sqrt(sum(z * z for z in zs) / N),
        "mean_logprob_a": float(la.double().mean()),
        "mean_logprob_b": float(lb.double().mean()),
    }


# ---- one model --------------------------------------------------------------------------------------------------
class SJDEngine:
    """A TorchEngine whose generate runs SJD with a chosen window and collects its statistics (for evaluate())."""

    def __init__(self, engine, window: int, init: str = "last"):
        from argrpo.rollout.engines.jacobi import JacobiStats

        self.engine, self.window, self.init = engine, window, init
        self.stats = JacobiStats(window)
        self.weight_version = engine.weight_version

    def generate(self, prompt_ids, sampling):
        from argrpo.rollout.engines.jacobi import jacobi_generate

        return jacobi_generate(self.engine, prompt_ids, sampling, window=self.window, init=self.init,
                               stats=self.stats)


def bench_model(name, engine, prompts, trained, args, cfgs, policy=None) -> tuple[dict, list[dict]]:
    from argrpo.rollout.engines.jacobi import JacobiStats, jacobi_generate
    from argrpo.rollout.types import SamplingParams

    layout = engine.layout
    N, C = layout.n_image_tokens, layout.codebook_size
    P, G = min(args.prompts, len(prompts)), args.G
    batch = prompts[:P]
    results, rows = {"trained": trained, "n_tokens": N, "codebook": C, "batch": P * G}, []
    for cfg in cfgs:
        sp = SamplingParams(temperature=1.0, cfg_scale=cfg, n=G, seed=0)
        res = results[f"cfg{cfg:g}"] = {}
        # -- steps and acceptance for several windows
        for w in args.windows:
            for variant, kw in VARIANTS.items():
                st = JacobiStats(w)
                jacobi_generate(engine, batch, sp, window=w, stats=st, **kw)
                s = st.summary()
                s["row_step_ratio"] = N / s["mean_row_steps"]
                key = f"steps_w{w}" + ("" if variant == "default" else f"_{variant}")
                res[key] = {**s, "acceptance": [round(x, 4) for x in s["acceptance"]]}
                print(f"[{name} cfg {cfg:g} W={w} {variant}] passes {st.forward_steps} vs {st.plain_steps}: "
                      f"{s['step_ratio']:.2f}x fewer (per row {s['row_step_ratio']:.2f}x); "
                      f"{s['tokens_per_step']:.2f} tokens/row/pass; "
                      f"acceptance {[round(x, 2) for x in s['acceptance'][:6]]}", flush=True)
        # -- wall time: latency (batch 1) and throughput (the batch)
        W = args.window
        wall = {}
        for label, ids, n in (("batch1", batch[:1], 1), (f"batch{P * G}", batch, G)):
            spn = sp.with_(n=n)
            tp, _ = time_repeats(lambda ids=ids, spn=spn: engine.generate(ids, spn), repeats=args.repeats, warmup=1)
            tj, _ = time_repeats(lambda ids=ids, spn=spn: jacobi_generate(engine, ids, spn, window=W),  # noqa: B023
                                 repeats=args.repeats, warmup=1)
            wall[label] = {"plain_s": summarize(tp), "sjd_s": summarize(tj),
                           "wall_ratio": summarize(tj)["median"] / summarize(tp)["median"]}
            print(f"[{name} cfg {cfg:g} W={W}] wall {label}: plain {summarize(tp)['median']:.3f}s, "
                  f"SJD {summarize(tj)['median']:.3f}s (ratio {wall[label]['wall_ratio']:.2f})", flush=True)
        res["wall"] = wall
        # -- distribution: SJD vs plain, against plain vs plain (the noise floor)
        dist = None
        if args.dist_samples:
            t0 = time.perf_counter()
            spd = sp.with_(n=args.dist_samples)
            bins = min(C, 64)

            def binned(r, bins=bins):
                codes = r.completion_ids - layout.visual_offset
                return codes if C <= 64 else codes * bins // C

            pa = engine.generate(batch[:1], spd.with_(seed=10_000))
            pb = engine.generate(batch[:1], spd.with_(seed=20_000))
            sj = jacobi_generate(engine, batch[:1], spd.with_(seed=30_000), window=W)
            dist = {
                "samples": args.dist_samples,
                "bins": bins,
                "sjd_vs_plain": compare_samples(binned(sj), binned(pa), sj.logprobs, pa.logprobs, bins),
                "plain_vs_plain": compare_samples(binned(pb), binned(pa), pb.logprobs, pa.logprobs, bins),
                "seconds": time.perf_counter() - t0,
            }
            res["distribution"] = dist
            d, f = dist["sjd_vs_plain"], dist["plain_vs_plain"]
            print(f"[{name} cfg {cfg:g}] distribution ({args.dist_samples} samples): TV mean {d['tv_mean']:.3f} "
                  f"(plain-vs-plain {f['tv_mean']:.3f}), min p {d['min_pvalue_bonferroni']:.3g} "
                  f"({f['min_pvalue_bonferroni']:.3g}), logprob |z| max {d['logprob_z_max_abs']:.2f} "
                  f"({f['logprob_z_max_abs']:.2f})", flush=True)
        # -- sampler logprobs of SJD samples against a full-sequence recompute (CFG included)
        res["logprob_max_abs_err"] = logprob_error(engine, batch[:2], sp.with_(n=2, seed=7), W)
        # -- greedy equality
        g_sp = SamplingParams(temperature=0.0, cfg_scale=cfg, n=1)
        a = engine.generate(batch, g_sp).completion_ids
        b = jacobi_generate(engine, batch, g_sp, window=W).completion_ids
        res["greedy_rows_equal"] = float((a == b).all(-1).double().mean())
        # -- GenEval-shapes score
        if policy is not None and args.geneval_per_tag:
            res["geneval"] = geneval_both(policy, engine, sp, args)
        s = res[f"steps_w{W}"]
        row = {
            "model": name + ("" if trained else " (random)"), "cfg": cfg, "W": W,
            "passes SJD/plain": f"{s['forward_steps']}/{s['plain_steps']}", "step ratio": s["step_ratio"],
            "per-row ratio": s["row_step_ratio"],
            "step ratio no-prior / plain-sjd": (f"{res[f'steps_w{W}_no-prior']['step_ratio']:.2f} / "
                                                f"{res[f'steps_w{W}_plain-sjd']['step_ratio']:.2f}"),
            "tokens/row/pass": s["tokens_per_step"], "P(acc) off 0": s["acceptance"][0],
            "wall ratio b1": wall["batch1"]["wall_ratio"], "batch": P * G,
            "wall ratio batch": wall[f"batch{P * G}"]["wall_ratio"],
            "logprob err": res["logprob_max_abs_err"],
        }
        if dist:
            row["TV SJD (plain-plain)"] = f"{dist['sjd_vs_plain']['tv_mean']:.3f} ({dist['plain_vs_plain']['tv_mean']:.3f})"
            row["min p"] = dist["sjd_vs_plain"]["min_pvalue_bonferroni"]
        row["greedy equal"] = res["greedy_rows_equal"]
        if "geneval" in res:
            gv = res["geneval"]
            row["GenEval plain / SJD"] = (f"{gv['plain']['overall']:.3f}±{gv['plain']['stderr']:.3f} / "
                                          f"{gv['sjd']['overall']:.3f}±{gv['sjd']['stderr']:.3f}")
        rows.append(row)
    return results, rows


@torch.inference_mode()
def logprob_error(engine, prompts, sp, window) -> float:
    """Largest |SJD sampler logprob - log p recomputed by full forwards of prompt + image| over the rows."""
    from argrpo.rollout.engines.jacobi import jacobi_generate
    from argrpo.rollout.sampling import final_logprobs

    layout, model = engine.layout, engine.model
    out = jacobi_generate(engine, prompts, sp, window=window)
    N, vs = layout.n_image_tokens, layout.visual_slice
    uncond = engine._uncond_prompt_ids(sp) if sp.use_cfg else None
    worst = 0.0
    for r in range(len(out)):
        ids = out.completion_ids[r].tolist()
        dev = engine.device
        lc = model(torch.tensor([out.prompt_ids[r] + ids], device=dev)).logits[0, -N - 1 : -1]
        lu = model(torch.tensor([uncond + ids], device=dev)).logits[0, -N - 1 : -1] if uncond else None
        lp = final_logprobs(lc, lu, sp, vs).gather(-1, (out.completion_ids[r].to(dev) - vs.start)[:, None])[:, 0]
        worst = max(worst, float((lp.cpu() - out.logprobs[r]).abs().max()))
    return worst


def geneval_both(policy, engine, sp, args) -> dict:
    from argrpo.data.shapes import ShapesWorld
    from argrpo.grpo.evaluate import evaluate

    specs = ShapesWorld().prompt_set("heldout", args.geneval_per_tag, 0)
    out = {}
    for label, eng in (("plain", engine), ("sjd", SJDEngine(engine, args.window))):
        t0 = time.perf_counter()
        r = evaluate(policy, None, specs, engine=eng, sampling=sp.with_(n=args.geneval_n).__dict__,
                     output_dir=None, progress=False)
        out[label] = {"overall": r.overall, "stderr": r.overall_stderr, "tags": r.tag_table(),
                      "images": r.n_images, "seconds": time.perf_counter() - t0}
        if label == "sjd":
            out[label]["steps"] = eng.stats.summary()
        print(f"[geneval cfg {sp.cfg_scale:g}] {label}: {r.overall:.3f} ± {r.overall_stderr:.3f} "
              f"({r.n_images} images)", flush=True)
    return out


# ---- main -------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    from argrpo.rollout.engines.jacobi import DEFAULT_WINDOW

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples, shapes model only")
    ap.add_argument("--shapes-checkpoint", default=None, help="trained shapes policy (default: newest under runs/)")
    ap.add_argument("--models", default="shapes,bench", help="comma list of shapes, bench")
    ap.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="window for wall time and distribution")
    ap.add_argument("--windows", default="4,8,16,32", help="windows whose pass counts are measured")
    ap.add_argument("--prompts", type=int, default=8, help="prompts in the batched call")
    ap.add_argument("--G", type=int, default=4, help="samples per prompt in the batched call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dist-samples", type=int, default=600, help="samples per sampler for the distribution check")
    ap.add_argument("--geneval-per-tag", type=int, default=20, help="held-out shapes prompts per tag (0: skip)")
    ap.add_argument("--geneval-n", type=int, default=4, help="samples per GenEval prompt")
    ap.add_argument("--bench-batch", default="4x2", help="bench model: prompts x samples in the batched call")
    ap.add_argument("--bench-dist-samples", type=int, default=64, help="bench model: distribution-check samples")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:  # smaller defaults; options given explicitly still win
        ap.set_defaults(models="shapes", repeats=2, dist_samples=300, geneval_per_tag=4)
        args = ap.parse_args(argv)
    args.windows = sorted({int(w) for w in args.windows.split(",")} | {args.window})
    from argrpo.models.runtime import set_threads

    threads = set_threads(args.threads or int(os.environ.get("OMP_NUM_THREADS", "1")))
    from argrpo.rollout.engines.torch_engine import TorchEngine

    results = {"window": args.window, "windows": args.windows, "threads": threads}
    rows: list[dict] = []
    notes = []
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if "shapes" in models:
        ckpt = args.shapes_checkpoint or find_shapes_checkpoint()
        policy = None
        if ckpt:
            from argrpo.data.shapes import ShapesWorld
            from argrpo.models.policy import load_policy
            from argrpo.rollout.engines.base import encode_prompts

            policy = load_policy(ckpt)
            engine = TorchEngine(policy.model, policy.layout, tokenizer=policy.tokenizer)
            specs = ShapesWorld().prompt_set("heldout", 2, 1)
            prompts = encode_prompts(policy.tokenizer, policy.layout, [s["prompt"] for s in specs])
            import json

            extra = json.loads((Path(ckpt) / "argrpo.json").read_text()).get("extra") or {}
            notes.append(f"shapes: trained checkpoint {ckpt} ({', '.join(f'{k} {v}' for k, v in extra.items())})")
        else:
            model, layout, prompts = random_model(SHAPES_RANDOM)
            engine = TorchEngine(model, layout, uncond_prompt_ids=[1, 2])
            notes.append("shapes: no trained checkpoint found: RANDOM weights, acceptance not representative")
        res, r = bench_model("shapes", engine, prompts, ckpt is not None, args, (1.0, 3.0), policy)
        results["shapes"] = {"checkpoint": ckpt, **res}
        rows += r
    if "bench" in models:
        model, layout, prompts = random_model(BENCH_MODEL)
        engine = TorchEngine(model, layout, uncond_prompt_ids=[1, 2])
        bp, bg = (int(x) for x in args.bench_batch.split("x"))
        a = argparse.Namespace(**{**vars(args), "geneval_per_tag": 0, "dist_samples": args.bench_dist_samples,
                                  "prompts": bp, "G": bg, "repeats": max(1, args.repeats - 1),
                                  "windows": [args.window]})
        res, r = bench_model("bench", engine, prompts, False, a, (3.0,))
        results["bench"] = res
        rows += r
        notes.append("bench: RANDOM weights (nearly flat next-token distributions): acceptance is not representative")
    notes += [
        "step ratio = plain forward passes / SJD forward passes of one batched call (the batch runs until its "
        "slowest row; tokens/row/pass is the per-row gain)",
        "wall ratio = SJD seconds / plain seconds (< 1: SJD faster); CPU, a pass of W+1 tokens costs more than one",
        "TV = mean over positions of the total variation between per-position token histograms; in brackets the "
        "same for two plain runs with different seeds (the noise floor); min p: smallest per-position chi-square "
        "p-value x positions",
    ]
    env = environment(threads)
    results["environment"] = env
    write_results("jacobi", results, rows, notes=notes, out_dir=args.out)
    return results


if __name__ == "__main__":
    main()
