"""Peak RSS of GRPO learner steps: full fine-tuning vs LoRA, visual-slice head vs full-vocabulary logits.

    python -m bench.memory             # bench model (hidden 512, 8 layers), SimpleAR vocabulary, 8 x 256-token samples
    python -m bench.memory --quick     # shapes-size model (hidden 256, 4 layers), 64-token samples
    python -m bench.memory --variants full/visual lora/visual

Each variant runs in a fresh subprocess (``--child``), so peaks never mix and nothing is shared but the disk.
The child builds the policy, then the project's learner, ``grpo.trainer.ARGRPOTrainer`` (TRL's GRPOTrainer),
fed by a rollout function that hands back fixed random visual completions (no engine lives in the process, as
with Ray rollout workers), and a random reward (non-zero advantages). It resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``) just before ``trainer.train()`` and runs ``--steps`` optimizer steps (two by default:
AdamW allocates its state in the first, so the second step is the steady-state peak). Reported per variant:
RSS before training (weights + libraries), peak RSS during the steps, and the difference.

Heads (how the learner turns hidden states into per-token log-probs, the variable of the second comparison):
- ``visual``: argrpo's ``grpo.logprobs`` head: only the ``C`` visual rows of the LM head, in row chunks under
  activation checkpointing (no ``[*, V]`` tensor; see tests/test_no_full_vocab_logits.py);
- ``trl_fused``: TRL 1.16's own fused head: the FULL vocabulary in tiles (no whole logits tensor, but every tile
  spans all ``V`` ids, and the softmax normalises over text ids the sampler never draws);
- ``full_logits``: the Hugging Face forward's float32 logits ``[B, N+1, V]`` for the completion positions, then
  ``gather - logsumexp`` (how SimpleAR's GRPO and TRL before its fused head scored completions).

Writes bench/results/memory.json and memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HEADS = ("visual", "trl_fused", "full_logits")
DEFAULT_VARIANTS = ("full/visual", "lora/visual", "full/full_logits", "lora/full_logits", "full/trl_fused")


@dataclass
class MemConfig:
    size: str  # models.policy size preset
    grid: tuple[int, int]
    text_vocab: int
    codebook: int
    P: int  # prompts per step
    G: int  # samples per prompt; one step = P*G completions in one micro-batch
    prompt_len: int
    steps: int


CONFIGS = {
    # SimpleAR's text vocabulary (Qwen2.5's 151,665 + 7 special tokens) before a 16,384-code visual block
    "full": MemConfig("bench", (16, 16), 151_672, 16_384, 1, 8, 24, 2),
    "quick": MemConfig("shapes", (8, 8), 151_672, 4_096, 1, 8, 16, 2),
}


# ---- peak RSS --------------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mib() -> float:
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else float("nan")


def peak_rss_mib() -> float:
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux; lifetime peak, not resettable
    return kib / 1024


# ---- the child: one variant ------------------------------------------------------------------------------------
def install_full_logits_head(model, n_completion: int, temperature: float) -> None:
    """Route TRL's ``fused_lm_head=True`` calls through the plain forward's float32 logits ``[B, N+1, V]``.

    Returns the fields TRL reads (log_probs / entropy ``[B, T-1]``, zero where the label is -100). The entropy is
    computed row by row without gradient, as TRL did, so the variant's extra memory is the logits and their grad.
    """
    import types

    import torch
    from argrpo.grpo.logprobs import VisualHeadOutput

    previous = model.forward
    temp = float(temperature)

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head:
            return previous(*args, labels=labels, **kwargs) if labels is not None else previous(*args, **kwargs)
        kwargs["use_cache"] = False
        logits = previous(*args, logits_to_keep=n_completion + 1, **kwargs).logits[:, :-1].float()  # [B, N, V]
        if temp != 1.0:
            logits = logits / temp
        target = labels[:, -n_completion:]  # [B, N]
        mask = target != -100
        logp = logits.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        with torch.no_grad():
            ent = torch.stack([torch.distributions.Categorical(logits=row).entropy() for row in logits])
        B, T = labels.shape
        log_probs = logp.new_zeros(B, T - 1)
        entropy = ent.new_zeros(B, T - 1)
        log_probs[:, -n_completion:] = logp * mask
        entropy[:, -n_completion:] = ent * mask
        return VisualHeadOutput(loss=-log_probs.sum() / mask.sum().clamp(min=1), log_probs=log_probs,
                                entropy=entropy)

    model.forward = types.MethodType(forward, model)



def bench_policy(text_vocab: int, codebook: int, grid: tuple[int, int], size: str, tuning: str):
    """A random policy in a custom layout -> (layout, model, peft config or None, word-level text tokenizer).

    ``tuning == "lora"`` returns the base model with the adapter's config, as grpo.trainer.build_run hands a fresh
    adapter to TRL, which wraps the model itself.
    """
    from argrpo.models.layout import TokenLayout
    from argrpo.models.policy import apply_lora, build_policy
    from argrpo.models.text_tokenizer import build_text_tokenizer

    layout = TokenLayout(name="custom", text_vocab_size=text_vocab, visual_offset=text_vocab, codebook_size=codebook,
                         grid=grid, image_size=(grid[0] * 8, grid[1] * 8))
    model = build_policy(layout, size=size, seed=0)
    peft_config = None
    if tuning == "lora":
        wrapped = apply_lora(model)
        peft_config = wrapped.peft_config["default"]
        model = wrapped.unload()
    return layout, model, peft_config, build_text_tokenizer(["a", "photo", "of"], special_tokens=("<|pad|>",))


def run_variant(cfg: MemConfig, tuning: str, head: str, threads: int) -> dict:
    """Build the policy and learner in this process, run ``cfg.steps`` learner steps, return the RSS figures."""
    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(threads)
    from argrpo.grpo.trainer import ARGRPOTrainer
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    rss_imports = rss_mib()
    layout, model, peft_config, tok = bench_policy(cfg.text_vocab, cfg.codebook, cfg.grid, cfg.size, tuning)
    n_params = sum(p.numel() for p in model.parameters())

    N, B = layout.n_image_tokens, cfg.P * cfg.G
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, cfg.text_vocab, (cfg.prompt_len,), generator=g).tolist()
    completions = (torch.randint(0, cfg.codebook, (B, N), generator=g) + layout.visual_offset).tolist()

    def rollout_func(prompts, trainer):
        return {"prompt_ids": [list(prompt) for _ in prompts], "completion_ids": [list(c) for c in completions],
                "logprobs": None}

    rng = torch.Generator().manual_seed(1)

    def random_reward(prompts, completions, **kwargs):
        return torch.rand(len(prompts), generator=rng).tolist()

    out_dir = tempfile.mkdtemp(prefix="bench-memory-")
    args = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=B, gradient_accumulation_steps=1, num_generations=cfg.G,
        max_completion_length=N, max_steps=cfg.steps, learning_rate=1e-6, loss_type="grpo", beta=0.0,
        temperature=1.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        remove_unused_columns=False, shuffle_dataset=False, dataloader_num_workers=0, log_completions=False,
        seed=0,
    )
    dataset = Dataset.from_dict({"prompt": ["a photo of"] * (cfg.P * (cfg.steps + 1))})
    common = dict(model=model, reward_funcs=[random_reward], args=args, train_dataset=dataset,
                  processing_class=tok, peft_config=peft_config, rollout_func=rollout_func)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if head == "visual":
        trainer = ARGRPOTrainer(**common, layout=layout)
    else:
        trainer = GRPOTrainer(**common)  # TRL's own fused full-vocabulary head
        if head == "full_logits":
            from argrpo.grpo.trainer import _hf_model

            install_full_logits_head(_hf_model(trainer.model), N, 1.0)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    import gc

    gc.collect()
    rss_before = rss_mib()
    resettable = reset_peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = peak_rss_mib()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "tuning": tuning, "head": head, "params": n_params, "trainable_params": trainable,
        "rss_after_imports_mib": rss_imports, "rss_before_steps_mib": rss_before, "peak_rss_mib": peak,
        "step_increment_mib": peak - rss_before, "peak_is_step_only": resettable, "steps": cfg.steps,
        "completions_per_step": B, "train_seconds": seconds, "train_cpu_seconds": cpu, "losses": losses,
        "child_seconds": time.perf_counter() - t_start,
    }


# ---- the parent ------------------------------------------------------------------------------------------------
def run_child(variant: str, quick: bool, threads: int, timeout: float) -> dict:
    tuning, head = variant.split("/")
    with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
        cmd = [sys.executable, "-m", "bench.memory", "--child", variant, "--child-out", f.name,
               "--threads", str(threads)] + (["--quick"] if quick else [])
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0:
            return {"tuning": tuning, "head": head, "error": (proc.stderr or proc.stdout)[-1500:],
                    "wall_s": time.perf_counter() - t0}
        return json.loads(Path(f.name).read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shapes-size model, 64-token samples")
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                    help=f"tuning/head pairs; tuning in full, lora; head in {', '.join(HEADS)}")
    ap.add_argument("--repeats", type=int, default=2,
                    help="fresh subprocesses per visual-head variant (the full vs LoRA comparison); median and spread")
    ap.add_argument("--head-repeats", type=int, default=1,
                    help="fresh subprocesses per other-head variant (slow: the full-vocabulary heads)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per child")
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cfg = CONFIGS["quick" if args.quick else "full"]

    if args.child:
        tuning, head = args.child.split("/")
        result = run_variant(cfg, tuning, head, args.threads)
        Path(args.child_out).write_text(json.dumps(result))
        return 0

    for v in args.variants:
        tuning, _, head = v.partition("/")
        if tuning not in ("full", "lora") or head not in HEADS:
            ap.error(f"variant {v!r}: expected <full|lora>/<{'|'.join(HEADS)}>")

    from bench.common import environment, summarize, write_results

    name = "memory_quick" if args.quick else "memory"
    load_start = os.getloadavg()[0]
    print(f"[{name}] {cfg}", flush=True)
    runs: dict[str, list[dict]] = {}
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency of transformers; keep working without it anyway
        def tqdm(x, **_):
            return x
    def repeats(v):
        return args.repeats if v.endswith("/visual") else min(args.repeats, args.head_repeats)

    # repeats interleaved, so anything drifting on the machine hits every variant alike
    jobs = [(v, r) for r in range(args.repeats) for v in args.variants if r < repeats(v)]
    for v, _ in tqdm(jobs, desc="memory variants", unit="child"):
        res = run_child(v, args.quick, args.threads, args.timeout)
        runs.setdefault(v, []).append(res)
        if "error" in res:
            print(f"  {v}: FAILED\n{res['error']}", flush=True)
        else:
            print(f"  {v:18s} before {res['rss_before_steps_mib']:7.0f} MiB  peak {res['peak_rss_mib']:7.0f} MiB  "
                  f"(+{res['step_increment_mib']:.0f})  trainable {res['trainable_params'] / 1e6:.1f}M  "
                  f"{res['train_seconds']:.0f}s", flush=True)

    summary: dict[str, dict] = {}
    for v, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            summary[v] = {"error": rs[-1]["error"]}
            continue
        summary[v] = {
            "peak_rss_mib": summarize([r["peak_rss_mib"] for r in ok]),
            "rss_before_steps_mib": summarize([r["rss_before_steps_mib"] for r in ok]),
            "step_increment_mib": summarize([r["step_increment_mib"] for r in ok]),
            "trainable_params": ok[0]["trainable_params"], "params": ok[0]["params"],
            "train_seconds": summarize([r["train_seconds"] for r in ok]),
        }

    def med(v, key):
        s = summary.get(v, {})
        return s[key]["median"] if key in s else None

    ratios = {}
    for head in HEADS:
        full, lora = med(f"full/{head}", "peak_rss_mib"), med(f"lora/{head}", "peak_rss_mib")
        if full and lora:
            ratios[f"lora_over_full/{head}"] = lora / full
    for tuning in ("full", "lora"):
        vis = med(f"{tuning}/visual", "peak_rss_mib")
        for head in ("full_logits", "trl_fused"):
            other = med(f"{tuning}/{head}", "peak_rss_mib")
            if vis and other:
                ratios[f"visual_over_{head}/{tuning}"] = vis / other
    ratio = ratios.get("lora_over_full/visual")
    targets = {"lora_peak_over_full <= 0.6": None if ratio is None else {"value": ratio, "met": ratio <= 0.6}}

    rows = []
    for v in args.variants:
        s = summary.get(v, {})
        if "error" in s:
            rows.append({"variant": v, "note": "failed: " + s["error"].strip().splitlines()[-1][:120]})
            continue
        tuning, head = v.split("/")
        full_peak = med(f"full/{head}", "peak_rss_mib")
        rows.append({
            "variant": v, "trainable params (M)": s["trainable_params"] / 1e6,
            "RSS before steps (MiB)": s["rss_before_steps_mib"]["median"],
            "peak RSS (MiB)": s["peak_rss_mib"]["median"], "spread": s["peak_rss_mib"]["spread"],
            "step increment (MiB)": s["step_increment_mib"]["median"],
            "x full, same head": s["peak_rss_mib"]["median"] / full_peak if full_peak else None,
            "s for steps": s["train_seconds"]["median"],
        })
    env = environment(args.threads)
    env["load_average_1m_start"] = load_start
    n_params = next((s["params"] for s in summary.values() if "params" in s), None)
    notes = [
        f"model: models.policy size '{cfg.size}' (Qwen2), {n_params / 1e6 if n_params else float('nan'):.1f}M params, "
        f"vocab {cfg.text_vocab} text + {cfg.codebook} codes, {cfg.grid[0] * cfg.grid[1]} tokens/image; "
        f"{cfg.P * cfg.G} completions per step (one micro-batch), {cfg.steps} optimizer steps (AdamW), float32",
        "each variant in a fresh subprocess; peak = VmHWM after resetting it just before trainer.train() "
        f"(median of {args.repeats} subprocesses for the visual-head variants, {min(args.repeats, args.head_repeats)} "
        "for the others); 'before' = RSS with weights, libraries and trainer built",
        "LoRA: r=16, alpha=32 on q,k,v,o,gate,up,down (models.policy defaults); embeddings and lm_head frozen",
        "ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()),
    ]
    results = {"config": asdict(cfg), "runs": runs, "summary": summary, "ratios": ratios, "targets": targets,
               "environment": env}
    json_path, md_path = write_results(name, results, rows, notes=notes, out_dir=args.out)
    print(md_path.read_text())
    return 0 if all("error" not in r for rs in runs.values() for r in rs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
