"""``argrpo sample``: images for a prompt file, written in GenEval's output layout.

    argrpo sample --checkpoint runs/shapes/grpo/final --prompts prompts.jsonl --n 4 --cfg 3 --out samples/

    <out>/00000/metadata.jsonl      the prompt's row (GenEval jsonl) or {"prompt": ...} for a plain text file
    <out>/00000/samples/00000.png   ... one PNG per sample
    <out>/00000/grid.png            the prompt's samples side by side

Sample k of prompt i uses seed ``seed + i * n + k``, so a rerun (or ``--skip-existing`` after an interruption)
reproduces the same images. Each prompt folder appears atomically.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from argrpo.recipes.commands import command


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="policy checkpoint directory (save_policy / SimpleAR)")
    p.add_argument("--prompts", required=True, help="GenEval jsonl (objects with 'prompt') or a text file, one a line")
    p.add_argument("--out", required=True, help="output directory (GenEval layout)")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jacobi", action="store_true",
                   help="speculative Jacobi decoding (torch engine): fewer forward passes, same distribution")
    p.add_argument("--batch-prompts", type=int, default=8, help="prompts per generate call")
    p.add_argument("--engine", default="torch", help="rollout engine ('torch', 'vllm')")
    p.add_argument("--workers", type=int, default=0, help="Ray rollout workers (0 = in-process)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    p.add_argument("--layout", default=None, help="layout preset for checkpoints without argrpo.json ('simplear')")
    p.add_argument("--image-tokenizer", default=None, help="image tokenizer directory (default: the checkpoint's)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--skip-existing", action="store_true", help="keep prompt folders that are already complete")


def _complete(folder: Path, n: int) -> bool:
    return (folder / "metadata.jsonl").is_file() and all(
        (folder / "samples" / f"{k:05d}.png").is_file() for k in range(n)
    )


def _write_prompt_folder(folder: Path, row: dict, images) -> None:
    from argrpo.grids import as_rows, image_grid
    from argrpo.models.checkpoint import atomic_dir
    from PIL import Image

    with atomic_dir(folder) as tmp:
        (tmp / "samples").mkdir()
        (tmp / "metadata.jsonl").write_text(json.dumps(row) + "\n")
        for k, img in enumerate(images):
            Image.fromarray(img).save(tmp / "samples" / f"{k:05d}.png")
        Image.fromarray(image_grid(as_rows(images))).save(tmp / "grid.png")


@command("sample", help="sample images for a prompt file into GenEval's output layout", configure=configure)
def run(args: argparse.Namespace) -> int:
    from argrpo.data.prompts import read_prompts
    from argrpo.errors import UserError
    from argrpo.models.image_tokenizers import load_image_tokenizer
    from argrpo.models.policy import load_policy
    from argrpo.models.runtime import resolve_device, set_threads
    from argrpo.rollout.pool import RolloutConfig, build_rollout_pool
    from argrpo.rollout.types import SamplingParams
    from argrpo.rollout.worker import PolicyComponents, engine_loads_checkpoint
    from tqdm import tqdm

    if args.n < 1 or args.batch_prompts < 1:
        raise UserError("--n and --batch-prompts must be >= 1")
    if args.jacobi and args.engine != "torch":
        raise UserError(f"--jacobi needs --engine torch (got {args.engine!r})")
    rows = read_prompts(args.prompts)[: args.limit]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(len(rows)) if not (args.skip_existing and _complete(out / f"{i:05d}", args.n))]
    if not todo:
        print(f"argrpo sample: all {len(rows)} prompts already in {out}")
        return 0

    set_threads()
    device = str(resolve_device(args.device))
    if args.workers > 0 or engine_loads_checkpoint(args.engine):
        # each Ray worker, and an engine that reads the weights itself (vLLM, in this process), loads the checkpoint
        policy = str(args.checkpoint)
        if args.image_tokenizer or args.layout:
            raise UserError("--image-tokenizer / --layout need --workers 0 and --engine torch")
    else:
        loaded = load_policy(args.checkpoint, layout=args.layout, device=device)
        # the checkpoint's own decoder (Janus's VQ-VAE) or the image tokenizer directory it records
        image_tokenizer = load_image_tokenizer(args.image_tokenizer) if args.image_tokenizer else loaded.image_decoder()
        if image_tokenizer is None:
            raise UserError(f"{args.checkpoint} names no image tokenizer; pass --image-tokenizer DIR")
        policy = PolicyComponents(loaded.model, loaded.layout, loaded.tokenizer, image_tokenizer, family=loaded.family)
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg,
                              jacobi=args.jacobi)
    config = RolloutConfig(engine=args.engine, num_workers=args.workers, device=device, sampling=sampling)

    with build_rollout_pool(policy, config) as pool, tqdm(total=len(todo), desc="sample", unit="prompt") as bar:
        for s in range(0, len(todo), args.batch_prompts):
            batch = todo[s : s + args.batch_prompts]
            # consecutive prompt indices share one call; a gap (skipped folders) starts a new one
            runs, start = [], 0
            for j in range(1, len(batch) + 1):
                if j == len(batch) or batch[j] != batch[j - 1] + 1:
                    runs.append(batch[start:j])
                    start = j
            for idx in runs:
                res = pool.generate([rows[i]["prompt"] for i in idx], args.n,
                                    sampling.with_(seed=args.seed + idx[0] * args.n))
                if res.images is None:
                    raise SystemExit("argrpo sample: the rollout workers returned no images (no image tokenizer)")
                for j, i in enumerate(idx):
                    _write_prompt_folder(out / f"{i:05d}", rows[i], res.images[j * args.n : (j + 1) * args.n])
                bar.update(len(idx))
    print(f"argrpo sample: {len(todo)} prompts x {args.n} images -> {out}")
    return 0
