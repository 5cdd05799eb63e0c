"""``argrpo score``: score a folder of images with one or more rewards.

    argrpo score --reward geneval,clip --prompts prompts.jsonl --images samples/ --out scores/
    argrpo score --reward geneval --reward-kwargs 'geneval={detector: owlv2, detector_kwargs: {path: owl/}}' ...

Image folders: GenEval's output layout (``<index>/samples/<k>.png`` with the prompt's row in
``<index>/metadata.jsonl``, else row ``index`` of ``--prompts``), or a flat folder of images matched in name order
to the rows of ``--prompts``. Writes ``scores.jsonl`` (one row per image: path, prompt, tag, each reward's score and
extras) and ``summary.md`` (per reward: mean, std, count, mean per tag, and the mean over tags: GenEval's overall
score for ``geneval``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

from argrpo.recipes.commands import command

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reward", default=None,
                   help="reward names, comma separated (registered, or 'package.module:function')")
    p.add_argument("--reward-kwargs", action="append", default=[], metavar="NAME=YAML",
                   help="constructor arguments of one reward as a YAML mapping; repeatable")
    p.add_argument("--config", default=None, help="YAML with 'rewards:' (a list of {name, weight, kwargs, alias})")
    p.add_argument("--prompts", default=None, help="GenEval jsonl or text file (needed for flat folders)")
    p.add_argument("--images", required=True, help="image folder (GenEval layout or flat)")
    p.add_argument("--out", default=None, help="output folder (default: <images>/scores)")
    p.add_argument("--batch-size", type=int, default=16, help="images per reward call")
    p.add_argument("--actors", action="store_true", help="score on Ray reward actors, all rewards at once")


def _natural_key(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def collect_images(images_dir: str | Path, rows: list[dict] | None) -> list[dict]:
    """-> items ``{"path", "index", "row"}`` in a stable order; errors name the folder or file."""
    from argrpo.data.prompts import read_prompts

    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    folders = sorted((d for d in root.iterdir() if d.is_dir() and d.name.isdigit() and (d / "samples").is_dir()),
                     key=lambda d: int(d.name))
    items = []
    if folders:
        for d in folders:
            index = int(d.name)
            meta_file = d / "metadata.jsonl"
            if meta_file.is_file():
                row = read_prompts(meta_file)[0]
            elif rows is not None and index < len(rows):
                row = rows[index]
            else:
                raise ValueError(f"{d}: no metadata.jsonl and no row {index} in --prompts")
            for img in sorted((f for f in (d / "samples").iterdir() if f.suffix.lower() in IMAGE_SUFFIXES),
                              key=_natural_key):
                items.append({"path": img, "index": index, "row": row})
        return items
    files = sorted((f for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
    if not files:
        raise ValueError(f"{root}: no images (neither GenEval's <index>/samples/ layout nor image files)")
    if rows is None:
        raise ValueError(f"{root}: a flat image folder needs --prompts (row k for the k-th image in name order)")
    if len(files) != len(rows):
        raise ValueError(f"{root}: {len(files)} images but {len(rows)} prompt rows; a flat folder needs one each")
    return [{"path": f, "index": i, "row": r} for i, (f, r) in enumerate(zip(files, rows))]


def parse_reward_args(args: argparse.Namespace):
    """-> list of RewardSpec from --config or --reward/--reward-kwargs."""
    import yaml
    from argrpo.config import ConfigError, read_yaml
    from argrpo.rewards.base import as_specs

    if args.config:
        data = read_yaml(args.config)
        if "rewards" not in data:
            raise ConfigError(f"{args.config}: no 'rewards' key")
        try:
            return as_specs(data["rewards"])
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{args.config}: rewards: {e}") from e
    if not args.reward:
        raise ConfigError("name at least one reward: --reward NAME[,NAME] (or --config)")
    names = [n.strip() for n in args.reward.split(",") if n.strip()]
    kwargs = {}
    for item in args.reward_kwargs:
        name, sep, text = item.partition("=")
        if not sep or name not in names:
            raise ConfigError(f"--reward-kwargs {item!r}: expected NAME=YAML with NAME one of {names}")
        value = yaml.safe_load(text)
        if not isinstance(value, dict):
            raise ConfigError(f"--reward-kwargs {item!r}: the value must be a YAML mapping")
        kwargs[name] = value
    return as_specs([{"name": n, "kwargs": kwargs.get(n, {})} for n in names])


def summarize(rows: list[dict], keys: list[str]) -> str:
    """Markdown table: per reward, mean/std/count over images, mean per tag, and the mean of the tag means."""
    tags = sorted({r["tag"] for r in rows if r.get("tag")})
    head = ["reward", "mean", "std", "n", *tags] + (["mean over tags"] if tags else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def stats(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return None, None, 0
        m = sum(vals) / len(vals)
        return m, math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals)), len(vals)

    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    for key in keys:
        mean, std, n = stats([r["scores"][key] for r in rows])
        cells = [key, fmt(mean), fmt(std), str(n)]
        tag_means = []
        for t in tags:
            m, _, _ = stats([r["scores"][key] for r in rows if r.get("tag") == t])
            cells.append(fmt(m))
            if m is not None:
                tag_means.append(m)
        if tags:
            cells.append(fmt(sum(tag_means) / len(tag_means) if tag_means else None))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@command("score", help="score a folder of images with rewards (per-image jsonl + markdown summary)",
         configure=configure)
def run(args: argparse.Namespace) -> int:
    import numpy as np
    from argrpo.data.prompts import read_prompts
    from argrpo.errors import UserError
    from argrpo.rewards.base import build_reward
    from PIL import Image
    from tqdm import tqdm

    specs = parse_reward_args(args)
    out_dir = Path(args.out) if args.out else Path(args.images) / "scores"
    keys = [s.key for s in specs]
    pool = None
    try:
        rows = read_prompts(args.prompts) if args.prompts else None
        items = collect_images(args.images, rows)
        if args.actors:
            from argrpo.cluster import init_ray
            from argrpo.rewards.pool import RewardPool

            init_ray()
            pool = RewardPool(specs)
        else:
            rewards = {s.key: build_reward(s.name, name=s.key, **s.kwargs) for s in specs}
    except UserError:
        raise
    except (ValueError, FileNotFoundError) as e:  # reading the folder, the prompts or the reward settings
        raise UserError(str(e)) from e

    def score_batch(prompts, imgs, meta):
        if pool is not None:
            return pool.score_components(prompts, imgs, metadata=meta)
        return {k: r(prompts, imgs, metadata=meta) for k, r in rewards.items()}

    results = []
    try:
        with tqdm(total=len(items), desc="score", unit="image") as bar:
            for start in range(0, len(items), args.batch_size):
                batch = items[start:start + args.batch_size]
                imgs = []
                for it in batch:
                    try:
                        with Image.open(it["path"]) as im:
                            imgs.append(np.asarray(im.convert("RGB")))
                    except OSError as e:
                        raise ValueError(f"{it['path']}: cannot read image ({e})") from e
                prompts = [it["row"]["prompt"] for it in batch]
                meta = [json.dumps(it["row"]) for it in batch]
                outs = score_batch(prompts, imgs, meta)
                for j, it in enumerate(batch):
                    results.append({
                        "path": str(it["path"]), "index": it["index"], "prompt": it["row"]["prompt"],
                        "tag": it["row"].get("tag"),
                        "scores": {k: outs[k][j] for k in keys},
                        "extras": {f"{k}/{e}": v[j] for k in keys for e, v in outs[k].extras.items()},
                    })
                bar.update(len(batch))
    finally:
        if pool is not None:
            pool.shutdown()

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "scores.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in results))
    tmp.replace(out_dir / "scores.jsonl")
    summary = summarize(results, keys)
    (out_dir / "summary.md").write_text(f"# Scores of {args.images}\n\n{len(results)} images\n\n{summary}")
    print(summary, end="")
    print(f"argrpo score: {len(results)} images -> {out_dir}/scores.jsonl, {out_dir}/summary.md")
    return 0
