"""Which object a shapes policy draws first on "a <colour> <shape> and a <colour> <shape>", and in which colour.

    python -m bench.draw_order runs/demo/sft runs/demo/grpo/final
    python -m bench.draw_order runs/demo/grpo/final --split heldout --prompts 20

A shapes-world code is one (mask, colour) pair, so an object's first image token carries its shape and its colour
at once. A factored head (``visual_head: factored``) scores that token as ``h . u_mask + h . v_colour``: shape and
colour are sampled independently given the hidden state. If the policy may start either object first, the first
token's shape and colour come out mismatched about half the time, and the prompt's colours land on the wrong
objects. Rendering the objects in the order they are named (``ShapesWorld(object_order="named")``) lets the policy
fix the first object from the word order. This bench measures both halves per policy, on ``color_attr`` prompts:

- ``first_is_first_named``: the first detected object in raster order (top, then left) is the first-named class;
- ``first_in_own_colour``: that first object has the colour its own phrase names;
- ``correct``: the GenEval verdict on the whole image.

Writes bench/results/<name>.json (+ .md).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from bench.common import environment, write_results


def first_object(spec: dict, detections) -> tuple[bool, bool] | None:
    """For the object drawn first (the topmost box, then the leftmost): (is it the class named first, does it have
    the colour its own phrase names); None when nothing was detected."""
    if not detections:
        return None
    first = min(detections, key=lambda d: (d.box[1], d.box[0]))
    named = [j for j, req in enumerate(spec["include"]) if req["class"] == first.label]
    return named[:1] == [0], bool(named) and spec["include"][named[0]].get("color") == first.color


def measure(policy_dir: str, split: str, n_prompts: int, samples: int, seed: int) -> dict:
    """One policy -> its row of the table (fractions over images with at least one detected object)."""
    import tempfile
    from pathlib import Path

    from argrpo.data.shapes import ShapesWorld
    from argrpo.grpo.evaluate import evaluate
    from argrpo.models.policy import load_policy
    from argrpo.rewards.detectors.shapes import ShapesDetector
    from PIL import Image

    specs = [s for s in ShapesWorld().prompt_set(split, n_prompts, seed) if s["tag"] == "color_attr"]
    detector = ShapesDetector()
    first_named = own_colour = correct = n = 0
    with tempfile.TemporaryDirectory() as tmp:
        # the evaluator samples and judges exactly as `argrpo eval` does (default sampling: temperature 1, no CFG);
        # it keeps no boxes, so the images it leaves in GenEval's folder layout are detected again for their order
        result = evaluate(load_policy(policy_dir), None, specs, output_dir=tmp, geneval_layout=True,
                          progress=False, grid_prompts=0, sampling={"n": samples, "seed": seed})
        for i, spec in enumerate(specs):
            files = sorted((Path(tmp) / "images" / f"{i:05d}" / "samples").glob("*.png"))
            images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])  # [n, H, W, 3]
            for k, dets in enumerate(detector(images)):
                first = first_object(spec, dets)
                if first is None:
                    continue
                n += 1
                first_named += first[0]
                own_colour += first[1]
                correct += result.samples[i * samples + k]["correct"]

    def frac(k: int) -> float:
        return round(k / n, 3) if n else math.nan

    return {"policy": policy_dir, "split": split, "prompts": len(specs), "images": n,
            "first_is_first_named": frac(first_named), "first_in_own_colour": frac(own_colour),
            "correct": frac(correct)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policies", nargs="+", help="policy checkpoint directories (shapes layout)")
    parser.add_argument("--split", default="train", choices=["train", "heldout"])
    parser.add_argument("--prompts", type=int, default=30, help="color_attr prompts per policy")
    parser.add_argument("--samples", type=int, default=8, help="images per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default="draw_order", help="results file name under bench/results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(p, args.split, args.prompts, args.samples, args.seed) for p in args.policies]
    results = {"split": args.split, "samples": args.samples, "seed": args.seed,
               "environment": environment(args.threads)}
    notes = ["color_attr prompts; fractions over images with at least one detected object"]
    _, md_path = write_results(args.name, results, rows, None, notes)
    print(md_path.read_text())
    return {**results, "table": rows}


if __name__ == "__main__":
    main()
