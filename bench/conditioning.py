"""How much a shapes policy uses each part of its prompt, in nats per image.

    python -m bench.conditioning runs/demo/pretrain runs/demo/sft
    python -m bench.conditioning runs/demo/sft --per-composition 4    # fewer renders

For every tag and split, renders of each composition are scored by the policy (teacher-forced cross-entropy of the
image codes, summed over the 64 tokens) under three captions: the true prompt, the same prompt with one attribute
changed (``data.shapes.perturb_spec``: a wrong colour, class, count or relation) and the empty caption. The gap
"wrong - true" is what the policy has learned that attribute is worth; "empty - true" is what the whole prompt is
worth. A policy that ignores colour words has a colour gap near 0 even when its images look right, which the
held-out score alone does not say (a colour prompt is then right about one time in six). Meant for likelihood-
trained policies (pretrain, SFT): a GRPO policy has left the render distribution, so its nats on renders say little.

Writes bench/results/conditioning.json (+ .md).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from bench.common import environment, write_results

# the attribute each tag's prompts turn on (the one the "wrong" caption changes)
TAG_ATTRIBUTE = {
    "single_object": "class",
    "two_object": "class",
    "counting": "count",
    "colors": "color",
    "position": "position",
    "color_attr": "color",
}


def image_nats(policy, image_codes: torch.Tensor, captions: list[str], batch: int = 64) -> np.ndarray:
    """Teacher-forced cross-entropy of each row's image codes, summed over its tokens.

    image_codes: int64 [R, N]; captions: R strings. Returns float64 [R] (nats per image).
    """
    from argrpo.grpo.lm_stage import CodesCollator, image_logits
    from argrpo.rollout.engines import encode_prompts

    collate = CodesCollator(policy.layout, policy.tokenizer.pad_token_id)
    ids = encode_prompts(policy.tokenizer, policy.layout, captions)
    out = []
    with torch.inference_mode():
        for i in range(0, len(captions), batch):
            b = collate([{"prompt_ids": p, "codes": c} for p, c in zip(ids[i:i + batch], image_codes[i:i + batch])])
            logits, _ = image_logits(policy.model, b, policy.layout)  # [B, N, C]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), b["image_codes"], reduction="none")
            out.append(nll.sum(1).double().numpy())
    return np.concatenate(out)


def measure(policy_dir: str, per_composition: int = 8, seed: int = 0) -> list[dict]:
    """Rows (policy, split, tag, attribute, true / wrong-gap / empty-gap nats per image) for one policy."""
    from argrpo.data.shapes import TAGS, ShapesWorld, perturb_spec, spec_from_key
    from argrpo.models.image_tokenizers import load_image_tokenizer
    from argrpo.models.policy import load_policy

    policy = load_policy(policy_dir)
    policy.model.eval()
    if policy.image_tokenizer_path is None:
        raise ValueError(f"{policy_dir}: the checkpoint references no image tokenizer")
    image_tokenizer = load_image_tokenizer(policy.image_tokenizer_path)
    world = ShapesWorld()
    rng = np.random.default_rng(seed)
    rows = []
    for split in ("train", "heldout"):
        for tag in TAGS:
            kind = TAG_ATTRIBUTE[tag]
            specs = [spec_from_key(tag, k) for k in world.split_compositions(split, tag)
                     for _ in range(per_composition)]
            images = np.stack([world.render(s, int(rng.integers(2**31)))[0] for s in specs])
            codes = torch.as_tensor(image_tokenizer.encode(images)).reshape(len(specs), -1).long()  # [R, N]
            nats = {
                "true": image_nats(policy, codes, [s["prompt"] for s in specs]),
                "wrong": image_nats(policy, codes, [perturb_spec(world, s, rng, kind)["prompt"] for s in specs]),
                "empty": image_nats(policy, codes, [policy.layout.uncond_caption] * len(specs)),
            }
            gap = nats["wrong"] - nats["true"]
            rows.append({
                "policy": policy_dir, "split": split, "tag": tag, "attribute": kind, "images": len(specs),
                "true_nats": float(nats["true"].mean()),
                "wrong_attribute_gap": float(gap.mean()),
                "gap_se": float(gap.std(ddof=1) / np.sqrt(len(gap))),
                "empty_caption_gap": float((nats["empty"] - nats["true"]).mean()),
            })
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policies", nargs="+", help="policy checkpoint directories (shapes layout)")
    parser.add_argument("--per-composition", type=int, default=8, help="renders per composition")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default="conditioning", help="results file name under bench/results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for path in args.policies:
        rows += measure(path, args.per_composition, args.seed)
    columns = ["policy", "split", "tag", "attribute", "images", "true_nats", "wrong_attribute_gap", "gap_se",
               "empty_caption_gap"]
    results = {"per_composition": args.per_composition, "seed": args.seed, "environment": environment(args.threads)}
    notes = ["nats per image (64 codes): `true_nats` under the true prompt; `wrong_attribute_gap` = extra nats "
             "when the tag's attribute is changed in the prompt (± SE over images); `empty_caption_gap` = extra "
             "nats under the empty (unconditional) caption. A gap near 0: the policy ignores that attribute."]
    json_path, md_path = write_results(args.name, results, rows, columns, notes)
    print(md_path.read_text())
    return {**results, "table": rows}


if __name__ == "__main__":
    main()
