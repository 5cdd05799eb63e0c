"""Emu3 rollouts: images/s of argrpo's torch engine against transformers' own Emu3 generation, at equal outputs.

    python -m bench.emu3_rollout --threads 1            # Emu3-Gen's shapes, 1 of its 32 decoder layers, 16 x 16 codes
    python -m bench.emu3_rollout --quick --threads 1    # hidden 1024, 2 layers (a smoke run)

Both sample the same P prompts x G images, greedy, CFG 3 with a negative prompt, from the same random-weight
``Emu3ForConditionalGeneration``: Emu3-Gen's language model shape (hidden 4,096, 32 heads, 8 KV heads, MLP 14,336,
vocabulary 184,622 of which 32,768 visual tokens) with fewer decoder layers (``--layers``) and a tiny VQ-VAE (decoding
codes to pixels is left out of both). An image of ``g x g`` codes is ``g * (g + 1) + 3`` tokens: a row-end token after
each row, then EOF, EOI, EOS.

Baseline: ``model.generate(input_ids, prefix_allowed_tokens_fn=..., negative_prompt_ids=..., guidance_scale=3,
do_sample=False)`` with the constraint function of transformers' Emu3 documentation (model_doc/emu3.md), which is
how transformers documents Emu3 image generation: full-vocabulary logits, a second unconditional forward per step
(``UnbatchedClassifierFreeGuidanceLogitsProcessor``) and the allowed-token mask built per row per step. Engine:
``TorchEngine`` through the Emu3 family: one batched forward for the conditional and unconditional rows, logits of the
32,768 visual rows only, row ends placed without sampling. Greedy tokens of both are compared ("equal outputs").
Wall seconds and this process's CPU seconds are both reported (CPU time is the figure robust to other processes).
"""

from __future__ import annotations

import argparse

import torch

from bench.common import environment, summarize, time_repeats, write_results

SHAPES = {
    # BAAI/Emu3-Gen-hf text_config, fewer layers
    "gen": dict(hidden=4096, heads=32, kv_heads=8, mlp=14336, vocab=184_622),
    "quick": dict(hidden=1024, heads=8, kv_heads=2, mlp=2816, vocab=184_622),
}
CODES = 32_768
VISUAL_START = 151_854  # Emu3's <|visual token 000000|>
IDS = {"<|endoftext|>": 151_643, "<image>": 151_646, "<|extra_200|>": 151_846, "<|extra_201|>": 151_847,
       "<|extra_203|>": 151_849, "<|extra_204|>": 151_850, "<|image token|>": 151_851, "<|image start|>": 151_852,
       "<|image end|>": 151_853}


class _Tokenizer:
    """What the Emu3 family asks a tokenizer for (token ids by name, sizes), at Emu3's real ids; prompts are built
    here as ids, so no text is ever tokenized."""

    def __init__(self, vocab: int):
        self.vocab = {**IDS, **{f"<|visual token {k:06d}|>": VISUAL_START + k for k in range(CODES)}}
        self.n = vocab
        self.unk_token, self.unk_token_id = None, -1
        self.bos_token_id, self.eos_token_id, self.pad_token_id = IDS["<|extra_203|>"], IDS["<|extra_204|>"], \
            IDS["<|endoftext|>"]
        self.eos_token = "<|extra_204|>"
        self.image_wrapper_token_id, self.eoi_token_id, self.eof_token_id = IDS["<|image token|>"], \
            IDS["<|image end|>"], IDS["<|extra_201|>"]

    def __len__(self) -> int:
        return self.n

    def convert_tokens_to_ids(self, token: str):
        return self.vocab.get(token)


def build(shape: dict, layers: int, seed: int = 0):
    from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3TextConfig, Emu3VQVAEConfig

    text = Emu3TextConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["mlp"],
                          num_hidden_layers=layers, num_attention_heads=shape["heads"],
                          num_key_value_heads=shape["kv_heads"], max_position_embeddings=9216,
                          pad_token_id=IDS["<|endoftext|>"], bos_token_id=IDS["<|extra_203|>"],
                          eos_token_id=IDS["<|extra_204|>"], attention_dropout=0.0)
    vq = Emu3VQVAEConfig(codebook_size=CODES, embed_dim=4, latent_channels=4, base_channels=32,
                         channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[], hidden_size=64)
    vocab_map = {**IDS, **{f"<|visual token {k:06d}|>": VISUAL_START + k for k in range(CODES)}}
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(Emu3Config(text_config=text, vq_config=vq, vocabulary_map=vocab_map)).eval()
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = IDS["<|extra_203|>"], IDS["<|extra_204|>"], \
        IDS["<|endoftext|>"]
    return model


def documented_constraint(tok: _Tokenizer, visual_tokens: list[int], height: int, width: int):
    """The prefix_allowed_tokens_fn of transformers' Emu3 documentation, with its tokenizer look-ups as ids."""
    def prefix_allowed_tokens_fn(batch_id, input_ids):
        image_wrapper_token_id = torch.tensor([tok.image_wrapper_token_id], device=input_ids.device)
        eoi_token_id = torch.tensor([tok.eoi_token_id], device=input_ids.device)
        eos_token_id = torch.tensor([tok.eos_token_id], device=input_ids.device)
        pad_token_id = torch.tensor([tok.pad_token_id], device=input_ids.device)
        eof_token_id = torch.tensor([tok.eof_token_id], device=input_ids.device)
        eol_token_id = torch.tensor([IDS["<|extra_200|>"]])

        position = torch.nonzero(input_ids == image_wrapper_token_id, as_tuple=True)[0][0]
        offset = input_ids.shape[0] - position
        if offset % (width + 1) == 0:
            return (eol_token_id,)
        elif offset == (width + 1) * height + 1:
            return (eof_token_id,)
        elif offset == (width + 1) * height + 2:
            return (eoi_token_id,)
        elif offset == (width + 1) * height + 3:
            return (eos_token_id,)
        elif offset > (width + 1) * height + 3:
            return (pad_token_id,)
        else:
            return visual_tokens

    return prefix_allowed_tokens_fn


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--grid", type=int, default=16, help="codes per side (Emu3 at 512 px: 64)")
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--samples", type=int, default=2, help="images per prompt")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from argrpo.models.families.emu3 import Emu3Family, emu3_layout
    from argrpo.models.runtime import set_threads
    from argrpo.rollout.engines.torch_engine import TorchEngine
    from argrpo.rollout.types import SamplingParams

    threads = set_threads(args.threads)
    shape = SHAPES["quick" if args.quick else "gen"]
    model = build(shape, args.layers)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "vqmodel" not in n)
    tok = _Tokenizer(shape["vocab"])
    g = args.grid
    family = Emu3Family.resolve(emu3_layout(model.config, tok, grid=(g, g)), tok, shape["vocab"])
    P, G, T = args.prompts, args.samples, family.completion_length

    # prompts as Emu3's processor lays them out: BOS, 10-20 text tokens, <|image start|>, "g*g", <|image token|>
    gen = torch.Generator().manual_seed(0)
    size = [1000 + g, 9, 1000 + g]  # stand-ins for the size tokens "g", "*", "g"
    suffix = [IDS["<|image start|>"], *size, IDS["<|image token|>"]]
    prompts = [[IDS["<|extra_203|>"]] + torch.randint(1000, 90_000, (10 + (i * 7) % 11,), generator=gen).tolist()
               + suffix for i in range(P)]
    negative = [IDS["<|extra_203|>"]] + torch.randint(1000, 90_000, (24,), generator=gen).tolist() + suffix
    L = max(map(len, prompts))
    rows = [p for p in prompts for _ in range(G)]
    ids = torch.full((P * G, L), IDS["<|endoftext|>"])
    mask = torch.zeros(P * G, L, dtype=torch.long)
    for i, p in enumerate(rows):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    neg = torch.tensor([negative] * (P * G))

    # the same weights for both (no copy: Emu3-Gen's 184,622 x 4,096 embedding and head are 6 GB in float32)
    engine = TorchEngine(model, family.layout, uncond_prompt_ids=negative, family=family)
    sp = SamplingParams(n=G, temperature=0.0, cfg_scale=args.cfg)
    fn = documented_constraint(tok, model.vocabulary_mapping.image_tokens, g, g)

    def hf():
        with torch.inference_mode():
            return model.generate(ids, attention_mask=mask, max_new_tokens=T, do_sample=False,
                                  prefix_allowed_tokens_fn=fn, negative_prompt_ids=neg,
                                  negative_prompt_attention_mask=torch.ones_like(neg),
                                  guidance_scale=args.cfg)[:, L:]

    def ours():
        return engine.generate(prompts, sp)

    cpu_ours, cpu_hf = [], []
    t_ours, r_ours = time_repeats(ours, repeats=args.repeats, warmup=1, cpu=cpu_ours)
    t_hf, r_hf = time_repeats(hf, repeats=args.repeats, warmup=1, cpu=cpu_hf)
    got = family.to_lm_ids(r_ours.completion_ids)
    equal = got.shape == r_hf.shape and torch.equal(got, r_hf)
    match = float((got == r_hf).float().mean()) if got.shape == r_hf.shape else 0.0
    s_ours, s_hf, c_ours, c_hf = summarize(t_ours), summarize(t_hf), summarize(cpu_ours), summarize(cpu_hf)
    B = P * G
    results = {
        "config": {"shape": "quick" if args.quick else "Emu3-Gen", **shape, "codes": CODES, "layers": args.layers,
                   "grid": [g, g], "tokens_per_image": T, "prompts": P, "samples_per_prompt": G, "cfg": args.cfg,
                   "params_lm": n_params},
        "torch_engine_s": s_ours, "transformers_generate_s": s_hf,
        "torch_engine_cpu_s": c_ours, "transformers_generate_cpu_s": c_hf,
        "speedup": s_hf["median"] / s_ours["median"], "speedup_cpu": c_hf["median"] / c_ours["median"],
        "greedy_equal": equal, "greedy_token_match": match,
        "environment": environment(threads),
    }
    table = [
        {"sampler": "transformers generate + documented prefix_allowed_tokens_fn + CFG",
         "images/s": B / s_hf["median"], "s/call (median)": s_hf["median"], "CPU s/call": c_hf["median"],
         "spread": s_hf["spread"], "vs baseline (wall)": 1.0, "vs baseline (CPU)": 1.0},
        {"sampler": "argrpo torch engine (Emu3 family)", "images/s": B / s_ours["median"],
         "s/call (median)": s_ours["median"], "CPU s/call": c_ours["median"], "spread": s_ours["spread"],
         "vs baseline (wall)": s_hf["median"] / s_ours["median"],
         "vs baseline (CPU)": c_hf["median"] / c_ours["median"]},
    ]
    notes = [f"{'Emu3-Gen' if not args.quick else 'reduced'}-shaped random model with {args.layers} of 32 decoder "
             f"layers (hidden {shape['hidden']}, {shape['heads']} heads / {shape['kv_heads']} KV heads, MLP "
             f"{shape['mlp']:,}, vocabulary {shape['vocab']:,} with {CODES:,} visual tokens), {P} prompt(s) x {G} "
             f"images, CFG {args.cfg} with a negative prompt, {g} x {g} codes = {T} tokens per image, greedy; "
             f"{threads} thread(s)",
             f"greedy tokens equal (row ends, EOF, EOI, EOS included): {equal} (token match {match:.4f})"]
    name = "emu3_rollout_quick" if args.quick else "emu3_rollout"
    json_path, md_path = write_results(name, results, table, notes=notes, out_dir=args.out)
    print(md_path.read_text())
    return results


if __name__ == "__main__":
    main()
