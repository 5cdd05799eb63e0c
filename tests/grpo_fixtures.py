"""A tiny shapes-world policy on disk (random weights, real architecture) for the GRPO tests, plus plugin rewards."""

from __future__ import annotations

import textwrap
from pathlib import Path

PLUGIN_SOURCE = textwrap.dedent('''
    """Rewards that live outside the argrpo package (loaded as 'module:function' from a config)."""
    import numpy as np

    def redness(prompts, images, **kwargs):
        """Mean red channel minus mean blue: differs between samples, so groups have a spread."""
        return [float(np.asarray(im, dtype=np.float32)[..., 0].mean() - np.asarray(im, dtype=np.float32)[..., 2].mean()) / 255.0
                for im in images]

    def greenness(prompts, images, **kwargs):
        """Mean green channel: a second reward that disagrees with redness."""
        return [float(np.asarray(im, dtype=np.float32)[..., 1].mean()) / 255.0 for im in images]

    def constant(prompts, images, **kwargs):
        return [0.5 for _ in images]

    def nothing(prompts, images, **kwargs):
        return [None for _ in images]
''')


def build_world(root: Path) -> dict:
    """Writes ``policy/`` (tiny Qwen2 + VQ image tokenizer), ``prompts/{train,heldout}.jsonl`` and a plugin module."""
    from argrpo.data.shapes import ShapesWorld, write_prompt_sets
    from argrpo.models.image_tokenizers.vq import VQTokenizer
    from argrpo.models.layout import SHAPES_SPECIAL_TOKENS, layout_preset
    from argrpo.models.policy import build_policy, save_policy
    from argrpo.models.text_tokenizer import build_text_tokenizer

    root = Path(root)
    world = ShapesWorld()
    _, images, _ = world.sample("train", 32, seed=0)
    vq = VQTokenizer.fit(images)
    tok = build_text_tokenizer(world.vocabulary(), special_tokens=SHAPES_SPECIAL_TOKENS)
    layout = layout_preset("shapes", text_vocab_size=len(tok), codebook_size=vq.codebook_size)
    model = build_policy(layout, size="tiny", seed=0)
    save_policy(root / "policy", model, tok, layout, image_tokenizer=vq)
    prompts = write_prompt_sets(root / "prompts", world, train_per_tag=4, heldout_per_tag=2)
    plugins = root / "plugins"
    plugins.mkdir(exist_ok=True)
    (plugins / "user_rewards.py").write_text(PLUGIN_SOURCE)
    return {"root": root, "policy": root / "policy", "train": prompts["train"], "heldout": prompts["heldout"],
            "plugins": plugins, "layout": layout}


def run_overrides(world: dict, out: Path, **kw) -> list[str]:
    """``--set`` items of a fast tiny run (2 prompts x G=4 per step, in-process rollouts, plugin reward)."""
    base = {
        "output_dir": str(out),
        "seed": 0,
        "threads": 1,
        "policy.checkpoint": str(world["policy"]),
        "rewards": "[{name: 'user_rewards:redness'}]",
        "data.train_prompts": str(world["train"]),
        "rollout.num_workers": 0,
        "grpo.num_generations": 4,
        "grpo.per_device_train_batch_size": 8,
        "grpo.max_steps": 2,
        "grpo.learning_rate": 0.01,
        "grpo.loss_type": "grpo",
        "logging.report_to": "[]",
        "logging.image_every": 0,
        "logging.progress": False,
        "checkpoint.save_final": False,
    }
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


_WORLD: dict | None = None


def shared_world() -> dict:
    """build_world() once per test session (several test files use it), in a temp dir removed at exit."""
    global _WORLD
    if _WORLD is None:
        import atexit
        import shutil
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="argrpo-grpo-tests-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _WORLD = build_world(root)
    return _WORLD
