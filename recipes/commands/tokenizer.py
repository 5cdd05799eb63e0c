"""`argrpo tokenizer train CONFIG [--set key=value ...]`: fit the shapes world's factorised VQ image tokenizer.

Renders ``n_images`` training images of the shapes world, collects their patch masks and colours
(``VQTokenizer.fit``) and saves the tokenizer (safetensors + ``image_tokenizer.json``) atomically to ``output_dir``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from argrpo.data.shapes import ShapesWorld
from argrpo.models.image_tokenizers.vq import VQFitConfig
from argrpo.recipes.commands import add_config_args, command


@dataclass
class TokenizerTrainConfig:
    """Fit the VQ image tokenizer on rendered shapes-world images."""

    output_dir: str = field(default="runs/shapes/tokenizer", metadata={"help": "directory to write (replaced atomically)"})
    n_images: int = field(default=2000, metadata={"help": "training images to render"})
    seed: int = field(default=0, metadata={"help": "seed of the training specs and renders"})
    split: str = field(default="train", metadata={"help": "world split whose prompts are rendered"})
    world: ShapesWorld = field(default_factory=ShapesWorld, metadata={"help": "shapes world settings"})
    vq: VQFitConfig = field(default_factory=VQFitConfig, metadata={"help": "VQ fitting settings"})

    def __post_init__(self):
        if self.n_images < 1:
            raise ValueError(f"n_images must be >= 1, got {self.n_images}")
        if self.split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {self.split!r}")
        if self.vq.patch_size != self.world.cell:
            raise ValueError(f"vq.patch_size ({self.vq.patch_size}) must equal world.cell ({self.world.cell}): "
                             "objects sit on the patch grid, which is what makes the codebook exact")


def train_tokenizer(cfg: TokenizerTrainConfig):
    """Render, fit, save -> the fitted VQTokenizer."""
    import json

    import numpy as np
    from argrpo.config import to_dict
    from argrpo.data.shapes import render_seed
    from argrpo.models.checkpoint import atomic_dir
    from argrpo.models.image_tokenizers.vq import VQTokenizer
    from tqdm import tqdm

    specs = cfg.world.make_specs(cfg.split, cfg.n_images, cfg.seed)
    size = cfg.world.image_size
    images = np.empty((len(specs), size, size, 3), dtype=np.uint8)
    for i, spec in enumerate(tqdm(specs, desc="render", unit="img", mininterval=1.0)):
        images[i] = cfg.world.render(spec, render_seed(cfg.seed, i))[0]
    tok = VQTokenizer.fit(images, patch_size=cfg.vq.patch_size, max_codebook_size=cfg.vq.max_codebook_size,
                          background=cfg.world.background)
    with atomic_dir(cfg.output_dir) as tmp:
        tok.save_pretrained(tmp)
        (tmp / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    return tok


def _configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    add_config_args(sub.add_parser("train", help="render training images and fit the VQ codebook"))


@command("tokenizer", help="image tokenizer: `tokenizer train CONFIG` fits the shapes world's VQ", configure=_configure)
def run(args) -> int:
    import time

    from argrpo.config import load_config

    cfg = load_config(TokenizerTrainConfig, args.config, args.overrides)
    start = time.perf_counter()
    tok = train_tokenizer(cfg)
    print(f"{tok} fitted on {cfg.n_images} images in {time.perf_counter() - start:.1f} s -> {cfg.output_dir}")
    return 0
