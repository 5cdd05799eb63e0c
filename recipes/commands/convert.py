"""`argrpo convert --simplear DIR --cosmos DIR --out DIR`: a released SimpleAR checkpoint -> an argrpo checkpoint.

A released SimpleAR directory (Qwen2 + tokenizer with 7 special tokens + 64,000 visual rows, no argrpo.json) already
loads with ``layout="simplear"``; converting it once writes argrpo.json and a reference to the Cosmos decoder, so every
command (rollout workers, vLLM, eval, GRPO) can take the directory as is.
"""

from __future__ import annotations

import argparse

from argrpo.recipes.commands import command


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--simplear", required=True, help="released SimpleAR checkpoint directory (HF format)")
    parser.add_argument("--cosmos", default=None,
                        help="Cosmos tokenizer directory (encoder.jit / decoder.jit); hard-linked into the checkpoint")
    parser.add_argument("--out", required=True, help="argrpo checkpoint directory to write")
    parser.add_argument("--resolution", type=int, default=1024, choices=(256, 512, 1024),
                        help="image size the checkpoint was trained at (1024 px = 64x64 codes)")


@command("convert", help="convert a released SimpleAR checkpoint (+ Cosmos decoder) into argrpo's format",
         configure=_configure)
def run(args) -> int:
    from argrpo.errors import UserError
    from argrpo.models.image_tokenizers.cosmos import CosmosTokenizer
    from argrpo.models.policy import load_policy, save_policy

    grid = args.resolution // 16  # Cosmos DV8x16x16: one code per 16x16 pixels
    layout_kwargs = {"grid": (grid, grid), "image_size": (args.resolution, args.resolution)}
    loaded = load_policy(args.simplear, layout="simplear", layout_kwargs=layout_kwargs)
    image_tokenizer = None
    if args.cosmos:
        # saved into the checkpoint's image_tokenizer/ with its config; the large .jit files are hard-linked
        image_tokenizer = CosmosTokenizer.from_pretrained(args.cosmos, image_size=(args.resolution, args.resolution))
        if tuple(image_tokenizer.grid) != tuple(loaded.layout.grid):
            raise UserError(f"{args.cosmos} gives a {image_tokenizer.grid} code grid at "
                             f"{args.resolution} px, the layout expects {loaded.layout.grid}")
    out = save_policy(args.out, loaded.model, loaded.tokenizer, loaded.layout, image_tokenizer=image_tokenizer)
    lay = loaded.layout
    print(f"wrote {out}: visual ids [{lay.visual_offset}, {lay.visual_end}), grid {lay.grid}, "
          f"image tokenizer {image_tokenizer if image_tokenizer else 'none'}")
    return 0
