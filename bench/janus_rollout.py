"""Janus-Pro rollouts: images/s of argrpo's torch engine against transformers' own Janus image generation.

    python -m bench.janus_rollout             # Janus-Pro-1B's shapes, 2 of its 24 decoder layers, 576 tokens
    python -m bench.janus_rollout --quick     # hidden 512, 2 layers, 576 tokens (a smoke run)
    python -m bench.janus_rollout --jacobi    # also the engine with speculative Jacobi decoding

Measured (bench/results/janus_rollout.md, a 2-core EPYC under a load of 6-13): at batch 2 images (4 rows with CFG)
both samplers spend the same CPU time (about 75 s a call): transformers' Janus generation already runs the cond
and uncond rows in one forward with a static KV cache, and one decode step of a 1B-wide model is bound by reading
its weights, which neither avoids. The engine's gain is per-step overhead, which matters for small models only.

Both sample the same P prompts x G images, CFG 5, 576 image tokens (24 x 24), from the same random-weight
``JanusForConditionalGeneration``: Janus-Pro-1B's language model shape (Llama, hidden 2048, 16 heads, MLP 5,632,
vocabulary 102,400) and generation head / aligner / embeddings (16,384 codes), with fewer decoder layers (``--layers``)
and a one-layer understanding tower (image generation never runs it). Baseline: ``model.generate(input_ids,
generation_mode="image", do_sample=False, guidance_scale=5)`` on the P*G rows (transformers doubles the batch for
the unconditional rows and runs both in one forward with a static cache). Engine: ``TorchEngine`` greedy, CFG 5,
through the Janus family (models.families.janus). Greedy tokens of both are compared ("equal outputs").
Images/s counts sampled token grids; decoding codes to pixels (the same VQ-VAE for both) is left out. Both run
single-threaded; the speedup is taken on this process's CPU seconds (robust when other jobs share the machine),
wall seconds are reported beside them.
"""

from __future__ import annotations

import argparse
import copy

import torch

from bench.common import environment, summarize, time_repeats, write_results

SHAPES = {
    # Janus-Pro-1B (deepseek-community/Janus-Pro-1B config.json), fewer layers
    "1b": dict(hidden=2048, heads=16, kv_heads=16, mlp=5632, vocab=102_400),
    "quick": dict(hidden=512, heads=8, kv_heads=8, mlp=1376, vocab=102_400),
}


def build(shape: dict, layers: int, grid: int, seed: int = 0):
    from transformers import (
        JanusConfig,
        JanusForConditionalGeneration,
        JanusVisionConfig,
        JanusVQVAEConfig,
        LlamaConfig,
    )

    h = shape["hidden"]
    text = LlamaConfig(vocab_size=shape["vocab"], hidden_size=h, intermediate_size=shape["mlp"],
                       num_hidden_layers=layers, num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["kv_heads"], max_position_embeddings=16384, pad_token_id=100_002,
                       bos_token_id=100_000, eos_token_id=None)
    vision = JanusVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                               image_size=grid * 16, patch_size=16, num_image_tokens=grid * grid, projection_dim=h)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=16384, base_channels=32, channel_multiplier=[1, 1, 2, 2, 4],
                          num_res_blocks=1, latent_channels=16, projection_dim=h, image_token_embed_dim=h,
                          num_patches=grid)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(JanusConfig(text_config=text.to_dict(), vision_config=vision,
                                                      vq_config=vq, image_token_id=100_581)).eval()
    gc = model.generation_config
    gc.bos_token_id, gc.pad_token_id = 100_000, 100_002
    gc.generation_kwargs = {"boi_token_id": 100_016}
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--grid", type=int, default=24, help="image tokens per side (Janus-Pro: 24 -> 576)")
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--samples", type=int, default=2, help="images per prompt")
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--jacobi", action="store_true",
                    help="also time the engine with speculative Jacobi decoding (greedy: the same tokens, fewer "
                         "forward passes when drafts are accepted)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from argrpo.models.families.janus import JanusFamily
    from argrpo.models.layout import TokenLayout
    from argrpo.models.runtime import set_threads
    from argrpo.rollout.engines.torch_engine import TorchEngine
    from argrpo.rollout.types import SamplingParams

    threads = set_threads(args.threads)
    shape = SHAPES["quick" if args.quick else "1b"]
    model = build(shape, args.layers, args.grid)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "vqmodel" not in n and "vision_model" not in n)
    P, G, N = args.prompts, args.samples, args.grid * args.grid
    # prompts: BOS, 10-20 text tokens, <begin_of_image> (Janus-Pro's conversation prompt is about this long)
    g = torch.Generator().manual_seed(0)
    prompts = []
    for i in range(P):
        n_text = 10 + (i * 7) % 11
        prompts.append([100_000] + torch.randint(1000, 90_000, (n_text,), generator=g).tolist() + [100_016])
    L = max(map(len, prompts))
    rows = [p for p in prompts for _ in range(G)]
    ids = torch.full((P * G, L), 100_002)
    mask = torch.zeros(P * G, L, dtype=torch.long)
    for i, p in enumerate(rows):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1

    layout = TokenLayout(name="janus", text_vocab_size=shape["vocab"], visual_offset=shape["vocab"],
                         codebook_size=16384, grid=(args.grid, args.grid), image_size=(args.grid * 16,) * 2,
                         prompt_template="<|User|>: {caption}\n\n<|Assistant|>:")

    class _Tok:  # the engine asks the tokenizer only for the ids of the unconditional prompt
        bos_token_id, pad_token_id, unk_token_id = 100_000, 100_002, 0

        def convert_tokens_to_ids(self, t):
            return 100_016

    engine = TorchEngine(copy.deepcopy(model), layout, tokenizer=_Tok(), family=JanusFamily(layout),
                         column_major_weights=True)
    sp = SamplingParams(n=G, temperature=0.0, cfg_scale=args.cfg)

    def hf():
        with torch.inference_mode():
            return model.generate(ids, attention_mask=mask, generation_mode="image", do_sample=False,
                                  guidance_scale=args.cfg)

    def ours():
        return engine.generate(prompts, sp)

    # CPU seconds of this (single-threaded) process are the figure other jobs on a shared machine cannot stretch
    c_ours, c_hf = [], []
    t_ours, r_ours = time_repeats(ours, repeats=args.repeats, warmup=args.warmup, cpu=c_ours)
    print(f"torch engine: wall {t_ours}, cpu {c_ours}", flush=True)
    t_hf, r_hf = time_repeats(hf, repeats=args.repeats, warmup=args.warmup, cpu=c_hf)
    print(f"transformers generate: wall {t_hf}, cpu {c_hf}", flush=True)
    sjd = None
    if args.jacobi:
        c_sjd = []
        t_sjd, r_sjd = time_repeats(lambda: engine.generate(prompts, sp.with_(jacobi=True)), repeats=args.repeats,
                                    warmup=args.warmup, cpu=c_sjd)
        sjd = {"wall": summarize(t_sjd), "cpu": summarize(c_sjd),
               "greedy_equal": torch.equal(r_sjd.completion_ids - layout.visual_offset, r_hf),
               "forward_steps": r_sjd.timings["jacobi_forward_steps"],
               "plain_steps": r_sjd.timings["jacobi_plain_steps"]}
        print(f"torch engine + SJD: wall {t_sjd}, cpu {c_sjd}", flush=True)
    equal = torch.equal(r_ours.completion_ids - layout.visual_offset, r_hf)
    match = float((r_ours.completion_ids - layout.visual_offset == r_hf).float().mean())
    s_ours, s_hf = summarize(t_ours), summarize(t_hf)
    cpu_ours, cpu_hf = summarize(c_ours), summarize(c_hf)
    B = P * G
    results = {
        "config": {"shape": "quick" if args.quick else "Janus-Pro-1B", **shape, "layers": args.layers,
                   "image_tokens": N, "prompts": P, "samples_per_prompt": G, "cfg": args.cfg,
                   "params_generation_path": n_params},
        "torch_engine_s": s_ours, "transformers_generate_s": s_hf,
        "torch_engine_cpu_s": cpu_ours, "transformers_generate_cpu_s": cpu_hf,
        "speedup": cpu_hf["median"] / cpu_ours["median"], "speedup_wall": s_hf["median"] / s_ours["median"],
        "greedy_equal": equal, "greedy_token_match": match, "jacobi": sjd,
        "environment": environment(threads),
    }
    table = [
        {"sampler": "transformers generate(generation_mode='image')", "images/CPU-s": B / cpu_hf["median"],
         "CPU s/call": cpu_hf["median"], "wall s/call": s_hf["median"], "vs baseline (CPU)": 1.0},
        {"sampler": "argrpo torch engine (Janus family)", "images/CPU-s": B / cpu_ours["median"],
         "CPU s/call": cpu_ours["median"], "wall s/call": s_ours["median"],
         "vs baseline (CPU)": cpu_hf["median"] / cpu_ours["median"]},
    ]
    if sjd is not None:
        table.append({"sampler": "argrpo torch engine + speculative Jacobi (greedy)",
                      "images/CPU-s": B / sjd["cpu"]["median"], "CPU s/call": sjd["cpu"]["median"],
                      "wall s/call": sjd["wall"]["median"], "vs baseline (CPU)": cpu_hf["median"] / sjd["cpu"]["median"]})
    notes = [f"Janus-Pro-1B-shaped random model with {args.layers} of 24 decoder layers (hidden {shape['hidden']}, "
             f"vocabulary {shape['vocab']:,}, 16,384 codes), {P} prompt(s) x {G} images, CFG {args.cfg}, {N} tokens, "
             f"greedy; {threads} thread(s)",
             f"greedy tokens equal: {equal} (token match {match:.4f})"]
    if sjd is not None:
        notes.append(f"speculative Jacobi: greedy tokens equal {sjd['greedy_equal']}, {sjd['forward_steps']:.0f} "
                     f"forward passes for {sjd['plain_steps']:.0f} tokens; a random-weight model repeats codes, so "
                     f"its acceptance says nothing about a trained checkpoint's")
    name = "janus_rollout_quick" if args.quick else "janus_rollout"
    json_path, md_path = write_results(name, results, table, notes=notes, out_dir=args.out)
    print(md_path.read_text())
    return results


if __name__ == "__main__":
    main()
