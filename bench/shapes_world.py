"""The shapes world, its VQ tokenizer and its detector, measured together.

    python -m bench.shapes_world           # 100 images per tag and split (1,200 renders), 600 random-code images
    python -m bench.shapes_world --quick   # 20 per tag and split

Writes bench/results/shapes_world.json (+ .md). Every figure is judged with the project's GenEval scorer
(``rewards.geneval``: GenEval's rules, thresholds 0.3 and 0.9 for counting) over the ``shapes`` detector:

- tokenizer: the `argrpo tokenizer train` step on the shipped config (time, codebook size), then held-out renders
  through encode -> decode: round-trip shapes, per-pixel palette-colour accuracy, objects kept (same class, colour
  and box detected in the reconstruction);
- detector: correct on images rendered from their own specs; incorrect on the same images judged against a
  perturbed spec (one wrong colour, count, class or relation); same verdict on VQ reconstructions; the score of
  images decoded from uniformly random codes, per tag; robustness to gaussian blur and noise (also after a trip
  through the tokenizer's nearest-code encoder); detector throughput.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter, defaultdict

import numpy as np
import torch

from bench.common import environment, markdown_table, write_results

TARGETS = {
    "recon_pixel_accuracy": (">=", 0.99),
    "recon_objects_kept": (">=", 0.98),
    "own_spec_correct": (">=", 0.99),
    "perturbed_incorrect": (">=", 0.99),
    "vq_same_verdict": (">=", 0.95),
    "random_codes_max_tag_score": ("<=", 0.02),
    "tokenizer_train_s": ("<=", 120.0),
}
CORRUPTIONS = [(0.7, 0.0), (0.0, 8.0), (0.7, 8.0), (1.0, 8.0), (0.7, 12.0)]


def _palette_index(images: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] -> nearest palette row per pixel, int [B, H, W]."""
    d = ((images[..., None, :].astype(np.int32) - colors.astype(np.int32)) ** 2).sum(-1)
    return d.argmin(-1)


def _by_tag(specs, values) -> dict[str, float]:
    acc = defaultdict(list)
    for s, v in zip(specs, values):
        acc[s["tag"]].append(float(v))
    return {t: float(np.mean(v)) for t, v in sorted(acc.items())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 images per tag and split instead of 100")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    from argrpo.config import load_config
    from argrpo.data.shapes import TAGS, ShapesWorld, blur_and_noise, perturb_spec
    from argrpo.models.runtime import set_threads
    from argrpo.recipes.commands.tokenizer import TokenizerTrainConfig, train_tokenizer
    from argrpo.rewards.detectors.shapes import ShapesDetector
    from argrpo.rewards.geneval import score_batch

    threads = set_threads(args.threads)
    per_tag = 20 if args.quick else 100
    world = ShapesWorld()
    det = ShapesDetector(world)
    results: dict = {"per_tag_per_split": per_tag, "targets": {k: list(v) for k, v in TARGETS.items()}}

    def verdicts(specs, images=None, detections=None):
        detections = det.detect(images) if detections is None else detections
        return np.array([ok for ok, _ in score_batch(specs, detections)])

    # ---- tokenizer: the real training step ------------------------------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(TokenizerTrainConfig, "recipes/configs/shapes/tokenizer.yaml", [f"output_dir={tmp}/tok"])
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            tok = train_tokenizer(cfg)
            times.append(time.perf_counter() - t0)
    results["tokenizer"] = {
        "method": "exact collection of patch masks x colours (factorised codebook)",
        "n_images": cfg.n_images, "train_s": float(np.median(times)), "train_s_runs": times,
        "codebook_size": tok.codebook_size, "n_masks": int(tok.masks.shape[0]), "n_colors": int(tok.colors.shape[0]),
    }
    print(f"tokenizer: {tok} trained on {cfg.n_images} images in {np.median(times):.2f} s (median of 3)")

    # ---- renders ---------------------------------------------------------------------------------------------------
    specs, images, records = [], [], []
    for split, seed in (("train", 101), ("heldout", 102)):
        s, im, rec = world.sample(split, per_tag * len(TAGS), seed)
        specs += s
        images.append(im)
        records += rec
    images = np.concatenate(images)
    n = len(specs)
    held = slice(n // 2, n)

    # ---- reconstruction of held-out images -------------------------------------------------------------------------
    t0 = time.perf_counter()
    codes = tok.encode(images[held])
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    recon_t = tok.decode(codes)
    t_dec = time.perf_counter() - t0
    recon = recon_t.numpy()
    shapes_ok = (tuple(images[held].shape) == tuple(recon.shape) and tuple(codes.shape) == (n - n // 2, 8, 8)
                 and codes.dtype == torch.int64 and recon_t.dtype == torch.uint8)
    pal = np.array([*world.palette.values(), world.background])
    pix_acc = float(np.mean(_palette_index(images[held], pal) == _palette_index(recon, pal)))
    recon_dets = det.detect(recon)
    kept = []
    for rec, dets in zip(records[held], recon_dets):
        have = {(d.label, d.color, tuple(d.box)) for d in dets if d.score > 0.9}
        kept += [(o["class"], o["color"], tuple(float(v) for v in o["box"])) in have for o in rec["objects"]]
    results["reconstruction"] = {
        "images": n - n // 2, "round_trip_shapes_ok": shapes_ok, "pixel_exact": float(np.mean(recon == images[held])),
        "palette_pixel_accuracy": pix_acc, "objects": len(kept), "objects_kept": float(np.mean(kept)),
        "encode_ms_per_image": 1e3 * t_enc / (n - n // 2), "decode_ms_per_image": 1e3 * t_dec / (n - n // 2),
    }
    print(f"reconstruction: shapes ok {shapes_ok}, palette accuracy {pix_acc:.4f}, objects kept {np.mean(kept):.4f}")

    # ---- verdicts ---------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    clean_dets = det.detect(images)
    t_det = time.perf_counter() - t0
    own = verdicts(specs, detections=clean_dets)
    rng = np.random.default_rng(0)
    wrong_specs = [perturb_spec(world, s, rng) for s in specs]
    kinds = []
    for a, b in zip(specs, wrong_specs):
        for k in ("class", "color", "count", "position"):
            if [r.get(k) for r in a["include"]] != [r.get(k) for r in b["include"]]:
                kinds.append(k)
                break
    wrong = verdicts(wrong_specs, detections=clean_dets)
    all_recon = tok.decode(tok.encode(images)).numpy()
    via_vq = verdicts(specs, all_recon)
    results["verdicts"] = {
        "images": n,
        "own_spec_correct": float(own.mean()), "own_spec_correct_by_tag": _by_tag(specs, own),
        "perturbed_incorrect": float(1 - wrong.mean()), "perturbed_incorrect_by_tag": _by_tag(specs, 1 - wrong),
        "perturbation_kinds": dict(Counter(kinds)),
        "vq_same_verdict": float(np.mean(via_vq == own)), "vq_correct": float(via_vq.mean()),
        "detector_ms_per_image": 1e3 * t_det / n,
    }
    print(f"own specs correct {own.mean():.4f}; perturbed judged incorrect {1 - wrong.mean():.4f}; "
          f"VQ same verdict {np.mean(via_vq == own):.4f}; detector {1e3 * t_det / n:.2f} ms/image")

    # ---- random codes -----------------------------------------------------------------------------------------------
    g = torch.Generator().manual_seed(0)
    rand_specs = world.make_specs("train", per_tag * len(TAGS), seed=103)
    rand_images = tok.decode(torch.randint(0, tok.codebook_size, (len(rand_specs), 8, 8), generator=g)).numpy()
    rand = verdicts(rand_specs, rand_images)
    rand_by_tag = _by_tag(rand_specs, rand)
    n_rand_dets = sum(len(d) for d in det.detect(rand_images))
    results["random_codes"] = {"images": len(rand_specs), "score": float(rand.mean()), "score_by_tag": rand_by_tag,
                               "max_tag_score": max(rand_by_tag.values()), "detections": n_rand_dets}
    print(f"random codes: score {rand.mean():.4f}, by tag {rand_by_tag}")

    # ---- robustness -------------------------------------------------------------------------------------------------
    rob = {}
    for sigma, std in CORRUPTIONS:
        bad = blur_and_noise(images, sigma, std, seed=7)
        v = verdicts(specs, bad)
        scores = [d.score for ds in det.detect(bad) for d in ds]
        v_vq = verdicts(specs, tok.decode(tok.encode(bad)).numpy())
        rob[f"blur{sigma}_noise{std}"] = {
            "correct": float(v.mean()), "correct_by_tag": _by_tag(specs, v),
            "object_score_p1": float(np.percentile(scores, 1)), "object_score_min": float(min(scores)),
            "correct_after_vq_encode": float(v_vq.mean()),
        }
        print(f"blur {sigma} noise {std}: correct {v.mean():.4f} (after VQ encode {v_vq.mean():.4f}), "
              f"1st-percentile object score {np.percentile(scores, 1):.3f}")
    results["robustness"] = rob

    # ---- targets ----------------------------------------------------------------------------------------------------
    measured = {
        "recon_pixel_accuracy": pix_acc, "recon_objects_kept": float(np.mean(kept)),
        "own_spec_correct": float(own.mean()), "perturbed_incorrect": float(1 - wrong.mean()),
        "vq_same_verdict": float(np.mean(via_vq == own)),
        "random_codes_max_tag_score": results["random_codes"]["max_tag_score"],
        "tokenizer_train_s": results["tokenizer"]["train_s"],
    }
    rows = []
    for key, (op, target) in TARGETS.items():
        val = measured[key]
        ok = val >= target if op == ">=" else val <= target
        rows.append({"measure": key, "value": val, "target": f"{op} {target}", "ok": "yes" if ok else "NO"})
    rows.append({"measure": "round_trip_shapes", "value": str(shapes_ok), "target": "[B,64,64,3]->[B,8,8]->[B,64,64,3]",
                 "ok": "yes" if shapes_ok else "NO"})
    for name, r in rob.items():
        rows.append({"measure": f"correct_{name}", "value": r["correct"], "target": "(report)", "ok": ""})
    results["measured"] = measured
    results["all_targets_met"] = all(r["ok"] != "NO" for r in rows)
    results["environment"] = environment(threads)
    json_path, _ = write_results(
        "shapes_world", results, rows, ["measure", "value", "target", "ok"],
        notes=[f"{n} renders ({per_tag} per tag per split), {len(rand_specs)} random-code images; "
               f"codebook {tok.codebook_size} codes; GenEval rules from rewards.geneval"],
    )
    print(markdown_table(rows, ["measure", "value", "target", "ok"]))
    print(f"all targets met: {results['all_targets_met']} -> {json_path}")
    return results


if __name__ == "__main__":
    main()
