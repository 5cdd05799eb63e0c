"""Per-process memory of the GRPO learner: DDP against FSDP2, 2 processes (gloo on CPU), full and LoRA.

    python -m bench.fsdp_memory                       # bench model (hidden 512, 8 layers), 32,000 text ids + 4,096 codes
    python -m bench.fsdp_memory --variants fsdp/full ddp/full

Each variant is one ``python -m torch.distributed.run --nproc_per_node 2 -m bench.fsdp_memory --child VARIANT``
launch, so peaks never mix. Every rank builds the same policy and the project's learner
(``grpo.trainer.ARGRPOTrainer``, i.e. TRL's GRPOTrainer, with ``distributed.strategy`` ddp or fsdp), fed by a
rollout function that returns fixed random visual completions (rollout engines live elsewhere) and a random
reward, and runs ``--steps`` optimizer steps. Measured per rank:

- params + grads + optimizer state: bytes of the tensors this process holds (for FSDP2 the local shard of each
  ``DTensor``), counted right before the last optimizer step, when all three are alive (AdamW allocates its state
  in the first step). DDP's gradient buckets (a second copy of the gradients) are not in this count; they are in
  the RSS;
- peak RSS during the steps (``VmHWM`` reset just before training) and RSS before them;
- the time of the last step (the first one allocates the optimizer state).

Writes bench/results/fsdp_memory.json and fsdp_memory.md. The target (DESIGN.md): FSDP2 <= 0.6x DDP per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("ddp/full", "fsdp/full", "ddp/lora", "fsdp/lora")
NPROC = 2


def _tensor_bytes(t) -> int:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def learner_bytes(model, optimizer) -> dict:
    """Bytes of parameters, gradients and optimizer state held by this process (local shards under FSDP2)."""
    seen, params, grads = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        params += _tensor_bytes(p)
        if p.grad is not None:
            grads += _tensor_bytes(p.grad)
    state = 0
    for s in optimizer.state.values():
        for v in s.values():
            if hasattr(v, "numel") and v.numel() > 1:  # skip the scalar step counters
                state += _tensor_bytes(v)
    return {"params_mib": params / 2**20, "grads_mib": grads / 2**20, "optimizer_mib": state / 2**20,
            "learner_mib": (params + grads + state) / 2**20}


def run_rank(variant: str, steps: int, out: Path) -> None:
    """One rank of a variant (under torch.distributed.run)."""
    import torch

    torch.set_num_threads(1)
    from argrpo.grpo.sharding import DistributedConfig, set_plugin_precision, training_arguments
    from argrpo.grpo.trainer import ARGRPOTrainer
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig

    from bench.memory import bench_policy, peak_rss_mib, reset_peak_rss, rss_mib

    strategy, tuning = variant.split("/")
    rank = int(os.environ["RANK"])
    text_vocab, codebook, grid, G, prompt_len = 32_000, 4_096, (16, 16), 4, 24
    layout, model, peft_config, tok = bench_policy(text_vocab, codebook, grid, "bench", tuning)
    n_params = sum(p.numel() for p in model.parameters())
    N, B = layout.n_image_tokens, G  # one prompt group per rank and step
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, text_vocab, (prompt_len,), generator=g).tolist()
    completions = (torch.randint(0, codebook, (B, N), generator=g) + layout.visual_offset).tolist()

    def rollout_func(prompts, trainer):
        return {"prompt_ids": [list(prompt) for _ in prompts], "completion_ids": [list(c) for c in completions],
                "logprobs": None}

    rng = torch.Generator().manual_seed(1 + rank)

    def random_reward(prompts, completions, **kwargs):
        return torch.rand(len(prompts), generator=rng).tolist()

    dist_cfg = DistributedConfig(strategy=strategy)
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-fsdp-"), per_device_train_batch_size=B,
        gradient_accumulation_steps=1, num_generations=G, max_completion_length=N, max_steps=steps,
        learning_rate=1e-6, loss_type="grpo", beta=0.0, temperature=1.0, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, disable_tqdm=True, remove_unused_columns=False, shuffle_dataset=False,
        dataloader_num_workers=0, log_completions=False, seed=0, **training_arguments(dist_cfg))
    set_plugin_precision(args, dist_cfg)
    dataset = Dataset.from_dict({"prompt": ["a photo of"] * (NPROC * (steps + 1))})
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    trainer = ARGRPOTrainer(model=model, reward_funcs=[random_reward], args=args, train_dataset=dataset,
                            processing_class=tok, peft_config=peft_config, rollout_func=rollout_func, layout=layout)
    record: dict = {}

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            record["t0"] = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            record["bytes"] = learner_bytes(trainer.model, trainer.optimizer)  # the last step's count wins

        def on_step_end(self, args, state, control, **kwargs):
            record["step_seconds"] = time.perf_counter() - record["t0"]

    trainer.add_callback(Probe())
    import gc

    gc.collect()
    rss_before = rss_mib()
    reset_peak_rss()
    trainer.train()
    result = {"variant": variant, "rank": rank, "params": n_params,
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "rss_before_mib": rss_before, "peak_rss_mib": peak_rss_mib(), **record["bytes"],
              "last_step_seconds": record["step_seconds"], "steps": steps}
    (out / f"{variant.replace('/', '_')}_rank{rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variant(variant: str, steps: int, out: Path, timeout: float) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(NPROC), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "bench.fsdp_memory", "--child", variant,
           "--child-out", str(out), "--steps", str(steps)]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return [json.loads((out / f"{variant.replace('/', '_')}_rank{r}.json").read_text()) for r in range(NPROC)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"any of {VARIANTS}")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per variant (>= 2)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per variant")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_rank(args.child, args.steps, Path(args.child_out))
        return 0

    from bench.common import environment, write_results

    rows, raw = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in args.variants:
            ranks = run_variant(v, args.steps, Path(tmp), args.timeout)
            raw[v] = ranks
            worst = max(ranks, key=lambda r: r["learner_mib"])
            rows.append({"variant": v, "params": worst["params"], "trainable": worst["trainable_params"],
                         "params_MiB": worst["params_mib"], "grads_MiB": worst["grads_mib"],
                         "optimizer_MiB": worst["optimizer_mib"], "learner_MiB": worst["learner_mib"],
                         "peak_rss_MiB": max(r["peak_rss_mib"] for r in ranks),
                         "step_s": max(r["last_step_seconds"] for r in ranks)})
            print(json.dumps(rows[-1]), flush=True)
    by = {r["variant"]: r for r in rows}
    ratios = {}
    for tuning in ("full", "lora"):
        d, f = by.get(f"ddp/{tuning}"), by.get(f"fsdp/{tuning}")
        if d and f:
            ratios[tuning] = {"learner_fsdp_over_ddp": f["learner_MiB"] / d["learner_MiB"],
                              "peak_rss_fsdp_over_ddp": f["peak_rss_MiB"] / d["peak_rss_MiB"],
                              "step_time_fsdp_over_ddp": f["step_s"] / d["step_s"]}
            for key, val in ratios[tuning].items():
                by[f"fsdp/{tuning}"][key.split("_fsdp")[0] + "_x_ddp"] = round(val, 3)
    notes = ["learner = params + grads + optimizer state held by one process (FSDP2: its shards), largest rank, "
             "counted before the last optimizer step; DDP's gradient buckets are in the RSS only",
             "step_s: the last of the steps (the first allocates AdamW's state), slowest rank; 2 processes x 1 "
             "thread on a 2-core CPU shared with other jobs, so times are indicative",
             "target: FSDP2 learner memory <= 0.6x DDP per rank; measured: "
             + ", ".join(f"{t} {r['learner_fsdp_over_ddp']:.2f}x" for t, r in ratios.items())]
    write_results("fsdp_memory", {"ratios": ratios, "ranks": raw, "environment": environment(threads=1)}, rows,
                  ["variant", "params", "trainable", "params_MiB", "grads_MiB", "optimizer_MiB", "learner_MiB",
                   "learner_x_ddp", "peak_rss_MiB", "peak_rss_x_ddp", "step_s", "step_time_x_ddp"], notes)
    print(json.dumps(ratios, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
