"""GenEval-style evaluation: prompts -> N samples each -> decode -> detector -> GenEval rules -> per-tag accuracy.

``evaluate(policy, image_tokenizer, prompts, cfg)`` is the library entry point (the ``argrpo eval`` command, the
GRPO learner's periodic evaluation and the pipeline all call it). Sampling settings live in the config, so a score
is reproducible: sample ``k`` of prompt ``i`` always uses seed ``sampling.seed + i * n + k``, whatever the batching.

Scores: a tag's accuracy is the fraction of its images judged correct; its standard error treats prompts as the
independent units (the spread of per-prompt accuracies / sqrt(#prompts)), because the samples of one prompt are
correlated. The overall score is GenEval's: the mean of the tag accuracies, with SE sqrt(sum SE_t^2) / #tags.

Outputs (when ``output_dir`` is set): ``results.json``, ``results.md`` (markdown table), ``samples.jsonl`` (one
verdict per image), ``grid_<tag>.png`` (rows = prompts, columns = samples, green/red frames = correct/wrong), and
with ``geneval_layout`` GenEval's own layout under ``images/``: ``<index:05d>/metadata.jsonl`` and
``<index:05d>/samples/<k:05d>.png``, which GenEval's evaluate_images.py reads as is.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from argrpo.config import require_at_least
from argrpo.rollout.types import SamplingParams

DEFAULT_SAMPLING = SamplingParams(n=4, seed=0, temperature=1.0, cfg_scale=1.0)


@dataclass
class EvalSettings:
    """How images are sampled and judged (everything that changes a score)."""

    sampling: SamplingParams = field(
        default_factory=lambda: SamplingParams(**asdict(DEFAULT_SAMPLING)),
        metadata={"help": "sampling: n = samples per prompt, seed, temperature, top_k, top_p, cfg_scale"},
    )
    batch_prompts: int = field(default=16, metadata={"help": "prompts per engine call"})
    max_batch_rows: int | None = field(default=None, metadata={"help": "most samples per forward pass"})
    detector: str = field(default="shapes", metadata={"help": "registered detector name or package.module:Class"})
    detector_kwargs: dict = field(default_factory=dict, metadata={"help": "detector constructor arguments"})
    color_classifier: dict | None = field(
        default=None,
        metadata={"help": "rewards.colors.ColorClassifier arguments for detectors that give no colours (OWLv2)"},
    )
    rules: dict = field(default_factory=dict, metadata={"help": "GenEvalRules overrides (thresholds)"})
    output_dir: str | None = field(default=None, metadata={"help": "where results are written (None: nowhere)"})
    geneval_layout: bool | None = field(
        default=None,
        metadata={"help": "also write GenEval's <index>/samples/<k>.png layout under output_dir/images "
                          "(None: on for GenEval files, off for generated shapes prompts)"},
    )
    grid_prompts: int = field(default=8, metadata={"help": "prompts (rows) in each tag's grid image"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        require_at_least(self, batch_prompts=1, grid_prompts=0)


@dataclass
class EvalRunConfig(EvalSettings):
    """`argrpo eval CONFIG`: a checkpoint, a prompt set and the evaluation settings."""

    policy: str = field(default="runs/shapes/sft", metadata={"help": "policy checkpoint directory"})
    image_tokenizer: str | None = field(
        default=None, metadata={"help": "image tokenizer directory (None: the one the checkpoint references)"}
    )
    prompts: str = field(
        default="shapes:heldout",
        metadata={"help": "GenEval jsonl file, or 'shapes:<split>' for a generated shapes prompt set"},
    )
    shapes_per_tag: int = field(default=20, metadata={"help": "'shapes:<split>' prompts per tag"})
    shapes_seed: int = field(default=0, metadata={"help": "'shapes:<split>' prompt set seed"})
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N prompts"})
    per_tag_limit: int | None = field(default=None, metadata={"help": "evaluate only the first N prompts of each tag"})
    tags: list[str] = field(default_factory=list, metadata={"help": "evaluate only these tags ([] = all)"})
    threads: int | None = field(default=None, metadata={"help": "torch threads (None: OMP_NUM_THREADS or cores)"})
    engine: str = field(default="torch", metadata={"help": "rollout engine that samples ('torch', 'vllm'), in this "
                                                           "process"})

    def __post_init__(self):
        super().__post_init__()
        if self.output_dir is None:
            self.output_dir = "runs/eval"
        for name in ("limit", "per_tag_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.shapes_per_tag < 1:
            raise ValueError(f"shapes_per_tag must be >= 1, got {self.shapes_per_tag}")


# ---- results ---------------------------------------------------------------------------------------------------
@dataclass
class TagScore:
    accuracy: float
    stderr: float
    n_prompts: int
    n_images: int


@dataclass
class EvalResult:
    """Per-tag accuracy and the overall score (mean over tags), with standard errors.

    samples: one dict per image (index, prompt, tag, sample, correct, reasons), in prompt order.
    """

    overall: float
    overall_stderr: float
    tags: dict[str, TagScore]
    n_prompts: int
    n_images: int
    sampling: dict
    detector: str
    timings: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list, repr=False)

    def tag_table(self) -> dict[str, tuple[float, float]]:
        """{tag: (accuracy, stderr)} (the shape ``grpo.report.StageScores.tags`` takes)."""
        return {t: (s.accuracy, s.stderr) for t, s in self.tags.items()}

    def to_dict(self) -> dict:
        return {
            "overall": self.overall,
            "overall_stderr": self.overall_stderr,
            "tags": {t: asdict(s) for t, s in self.tags.items()},
            "n_prompts": self.n_prompts,
            "n_images": self.n_images,
            "sampling": self.sampling,
            "detector": self.detector,
            "timings": self.timings,
        }

    def to_markdown(self, title: str | None = None) -> str:
        lines = [f"### {title}", ""] if title else []
        lines += ["| tag | accuracy | ± SE | prompts | images |", "|---|---|---|---|---|"]
        for t, s in self.tags.items():
            lines.append(f"| {t} | {s.accuracy:.3f} | {s.stderr:.3f} | {s.n_prompts} | {s.n_images} |")
        lines.append(f"| **overall** | **{self.overall:.3f}** | {self.overall_stderr:.3f} | {self.n_prompts} | "
                     f"{self.n_images} |")
        s = self.sampling
        lines += ["", f"sampling: n={s.get('n')}, cfg_scale={s.get('cfg_scale')}, temperature={s.get('temperature')}, "
                      f"top_k={s.get('top_k')}, top_p={s.get('top_p')}, seed={s.get('seed')}; detector: {self.detector}"]
        return "\n".join(lines) + "\n"


def summarize(samples: Sequence[dict]) -> tuple[float, float, dict[str, TagScore]]:
    """Per-image verdicts (``index``, ``tag``, ``correct``) -> (overall, overall SE, {tag: TagScore})."""
    by_tag: dict[str, dict[int, list[float]]] = {}
    for s in samples:
        by_tag.setdefault(s["tag"], {}).setdefault(s["index"], []).append(float(s["correct"]))
    tags = {}
    for tag in sorted(by_tag):
        per_prompt = [float(np.mean(v)) for v in by_tag[tag].values()]
        flat = [x for v in by_tag[tag].values() for x in v]
        acc = float(np.mean(flat))
        if len(per_prompt) > 1:
            se = float(np.std(per_prompt, ddof=1) / math.sqrt(len(per_prompt)))
        else:  # one prompt: only the spread between its samples is known
            se = float(math.sqrt(acc * (1 - acc) / len(flat)))
        tags[tag] = TagScore(acc, se, len(per_prompt), len(flat))
    if not tags:
        return 0.0, 0.0, tags
    overall = float(np.mean([s.accuracy for s in tags.values()]))
    overall_se = float(math.sqrt(sum(s.stderr**2 for s in tags.values())) / len(tags))
    return overall, overall_se, tags


# ---- prompts ---------------------------------------------------------------------------------------------------
def load_prompt_set(source: str, per_tag: int = 20, seed: int = 0) -> tuple[list[dict], bool]:
    """'shapes:<split>' or a GenEval jsonl path -> (specs, is_file)."""
    from argrpo.grpo.prompts import load_prompts

    return load_prompts(source, per_tag, seed, geneval=True), not source.startswith("shapes:")


def select_prompts(specs: list[dict], tags: Sequence[str] = (), per_tag_limit: int | None = None,
                   limit: int | None = None) -> list[tuple[int, dict]]:
    """(index in ``specs``, spec) pairs kept by a tag filter, a per-tag cap and an overall cap, in file order."""
    kept, per_tag = [], {}
    for i, s in enumerate(specs):
        if tags and s["tag"] not in tags:
            continue
        per_tag[s["tag"]] = per_tag.get(s["tag"], 0) + 1
        if per_tag_limit is not None and per_tag[s["tag"]] > per_tag_limit:
            continue
        kept.append((i, s))
    return kept[:limit] if limit is not None else kept


def _as_specs(prompts) -> list[dict]:
    if isinstance(prompts, (str, Path)):
        from argrpo.data.prompts import read_prompts

        return read_prompts(prompts, geneval=True)
    out = []
    for i, p in enumerate(prompts):
        spec = json.loads(p) if isinstance(p, str) else dict(p)
        if "prompt" not in spec or "tag" not in spec:
            raise ValueError(f"prompts row {i}: a GenEval row needs 'prompt' and 'tag', got keys {sorted(spec)}")
        out.append(spec)
    if not out:
        raise ValueError("no prompts to evaluate")
    return out


def _settings(cfg, overrides: dict) -> EvalSettings:
    from argrpo.config import from_dict, to_dict

    if cfg is None:
        return from_dict(EvalSettings, overrides, source="evaluate()")
    if isinstance(cfg, dict):
        return from_dict(EvalSettings, {**cfg, **overrides}, source="evaluate()")
    if overrides:
        data = {k: v for k, v in to_dict(cfg).items() if k in EvalSettings.__dataclass_fields__}
        return from_dict(EvalSettings, {**data, **overrides}, source="evaluate()")
    return cfg


# ---- images out ------------------------------------------------------------------------------------------------
def tag_grid(images: np.ndarray, correct: Sequence[bool], captions: Sequence[str], n: int) -> np.ndarray:
    """Rows of ``n`` samples per prompt, each framed green (correct) or red, with the prompt above its row.

    images: uint8 [R*n, H, W, 3] -> uint8 grid image.
    """
    from argrpo.grids import as_rows, image_grid

    H, W = images.shape[1:3]
    rows = as_rows(images[: len(images) // n * n], n)
    frames = [[(40, 170, 60) if ok else (220, 40, 40) for ok in row] for row in as_rows(correct[: len(rows) * n], n)]
    # small (64 px) images are enlarged so the grid is readable
    return image_grid(rows, scale=max(1, 128 // max(H, W)), gap=0, captions=[c[:80] for c in captions[: len(rows)]],
                      frames=frames)


def _write_geneval(root: Path, index: int, spec: dict, images: np.ndarray) -> None:
    from PIL import Image

    d = root / f"{index:05d}"
    (d / "samples").mkdir(parents=True, exist_ok=True)
    with open(d / "metadata.jsonl", "w") as f:
        json.dump(spec, f)
    for k, im in enumerate(images):
        Image.fromarray(im).save(d / "samples" / f"{k:05d}.png")


# ---- the evaluation --------------------------------------------------------------------------------------------
def evaluate(policy, image_tokenizer, prompts, cfg: EvalSettings | dict | None = None,
             indices: Sequence[int] | None = None, engine=None, **overrides: Any) -> EvalResult:
    """Sample, decode, detect and judge every prompt; write the outputs ``cfg.output_dir`` asks for.

    Args:
        policy: ``models.policy.LoadedPolicy`` (or anything with ``model``, ``tokenizer``, ``layout`` and
            optionally ``family``).
        image_tokenizer: an ImageTokenizer, its directory, or None for the policy's own decoder (Janus's VQ-VAE)
            or ``policy.image_tokenizer_path``.
        prompts: GenEval rows (dicts or JSON strings with ``prompt`` and ``tag``) or a GenEval jsonl path.
        cfg: EvalSettings (an EvalRunConfig works too) or a dict of its fields; ``overrides`` replace fields
            (``sampling`` as a dict), e.g. ``evaluate(p, tok, rows, sampling={"n": 2, "cfg_scale": 1.0})``.
        indices: each prompt's index in its source file (GenEval layout folder names); default 0..P-1.
        engine: a RolloutEngine to sample with (e.g. a vLLM engine already holding the weights); default a
            ``TorchEngine`` around ``policy.model``.
    """
    from argrpo.models.families import family_for_layout
    from argrpo.models.runtime import resolve_device
    from argrpo.rewards.geneval import GenEvalReward
    from argrpo.rollout.engines.torch_engine import TorchEngine
    from tqdm.auto import tqdm

    cfg = _settings(cfg, overrides)
    specs = _as_specs(prompts)
    indices = list(range(len(specs))) if indices is None else [int(i) for i in indices]
    if len(indices) != len(specs):
        raise ValueError(f"{len(indices)} indices for {len(specs)} prompts")
    family = getattr(policy, "family", None) or family_for_layout(policy.layout)
    if image_tokenizer is None and getattr(policy, "model", None) is not None:
        image_tokenizer = family.image_decoder(policy.model)
    if image_tokenizer is None or isinstance(image_tokenizer, (str, Path)):
        from argrpo.models.image_tokenizers import load_image_tokenizer

        path = image_tokenizer or getattr(policy, "image_tokenizer_path", None)
        if path is None:
            raise ValueError("no image tokenizer given and the policy references none")
        image_tokenizer = load_image_tokenizer(path)
    layout, tokenizer = policy.layout, policy.tokenizer
    if int(image_tokenizer.codebook_size) != layout.codebook_size or tuple(image_tokenizer.grid) != layout.grid:
        raise ValueError(f"image tokenizer (codebook {image_tokenizer.codebook_size}, grid {tuple(image_tokenizer.grid)})"
                         f" does not match the policy layout (codebook {layout.codebook_size}, grid {layout.grid})")

    device = resolve_device(cfg.device)
    model = getattr(policy, "model", None)
    was_training = bool(getattr(model, "training", False))
    if engine is None:
        engine = TorchEngine(model, layout, device=device, tokenizer=tokenizer, max_batch_rows=cfg.max_batch_rows,
                             family=family)
    reward = GenEvalReward(detector=cfg.detector, detector_kwargs=cfg.detector_kwargs,
                           color_classifier=cfg.color_classifier, rules=cfg.rules or None)
    n, base_seed = cfg.sampling.n, cfg.sampling.seed if cfg.sampling.seed is not None else 0
    out_dir = Path(cfg.output_dir) if cfg.output_dir else None
    geneval_root = out_dir / "images" if out_dir is not None and cfg.geneval_layout else None

    samples: list[dict] = []
    grid_rows: dict[str, list] = {}
    timings = {"generate": 0.0, "decode": 0.0, "judge": 0.0, "write": 0.0}
    bar = tqdm(total=len(specs), desc="eval prompts", disable=not cfg.progress)
    try:
        for start in range(0, len(specs), cfg.batch_prompts):
            chunk = specs[start : start + cfg.batch_prompts]
            t0 = time.perf_counter()
            ids = family.encode_prompts(tokenizer, [s["prompt"] for s in chunk])
            roll = engine.generate(ids, cfg.sampling.with_(seed=base_seed + start * n))
            t1 = time.perf_counter()
            with torch.inference_mode():
                images = image_tokenizer.decode(family.completion_codes(roll.completion_ids))
            images = np.asarray(images.cpu().numpy() if torch.is_tensor(images) else images, dtype=np.uint8)
            t2 = time.perf_counter()
            metadata = [s for s in chunk for _ in range(n)]
            verdicts = reward.judge(list(images), metadata)
            t3 = time.perf_counter()
            for j, spec in enumerate(chunk):
                idx = indices[start + j]
                block = images[j * n : (j + 1) * n]
                oks = []
                for k in range(n):
                    correct, details = verdicts[j * n + k]
                    oks.append(bool(correct))
                    samples.append({"index": idx, "prompt": spec["prompt"], "tag": spec["tag"], "sample": k,
                                    "correct": bool(correct), "fraction": details["fraction"],
                                    "reasons": details["reasons"]})
                if len(grid_rows.get(spec["tag"], ())) < cfg.grid_prompts:  # grid_prompts 0: no grid at all
                    grid_rows.setdefault(spec["tag"], []).append((spec["prompt"], block.copy(), oks))
                if geneval_root is not None:
                    _write_geneval(geneval_root, idx, spec, block)
            timings["generate"] += t1 - t0
            timings["decode"] += t2 - t1
            timings["judge"] += t3 - t2
            timings["write"] += time.perf_counter() - t3
            bar.update(len(chunk))
    finally:
        bar.close()
        if model is not None:
            model.train(was_training)  # TorchEngine switched it to eval mode; a learner calling us wants it back

    overall, overall_se, tags = summarize(samples)
    result = EvalResult(overall=overall, overall_stderr=overall_se, tags=tags, n_prompts=len(specs),
                        n_images=len(samples), sampling=asdict(cfg.sampling), detector=cfg.detector,
                        timings={k: round(v, 3) for k, v in timings.items()}, samples=samples)
    if out_dir is not None:
        write_outputs(result, out_dir, grid_rows, n)
    return result


def write_outputs(result: EvalResult, out_dir: Path, grid_rows: dict[str, list], n: int) -> None:
    """results.json, results.md, samples.jsonl and one grid PNG per tag."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result.to_dict(), indent=2))
    (out_dir / "results.md").write_text(result.to_markdown())
    with open(out_dir / "samples.jsonl", "w") as f:
        for s in result.samples:
            f.write(json.dumps(s) + "\n")
    for tag, rows in grid_rows.items():
        images = np.concatenate([r[1] for r in rows])
        correct = [ok for r in rows for ok in r[2]]
        grid = tag_grid(images, correct, [r[0] for r in rows], n)
        Image.fromarray(grid).save(out_dir / f"grid_{tag}.png")
