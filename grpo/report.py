"""The run report: a stage table, training curves and before/after image grids, as HTML (PNGs beside it) and markdown.

Inputs are plain data (scores per stage, metrics.jsonl files, image arrays), so any run can be reported, not only the
pipeline's.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from argrpo.grids import image_grid
from argrpo.jsonl import read_jsonl
from PIL import Image


@dataclass
class StageScores:
    """Held-out GenEval-style scores of one stage's checkpoint."""

    name: str
    overall: float
    overall_se: float
    tags: dict[str, tuple[float, float]]  # tag -> (accuracy, standard error)
    sampling: dict = field(default_factory=dict)
    n_samples: int = 0


def markdown_table(stages: list[StageScores]) -> str:
    """One row per stage: overall and per-tag accuracy, each ``mean ± se``."""
    tags = sorted({t for s in stages for t in s.tags})
    head = "| stage | overall | " + " | ".join(tags) + " | samples |"
    sep = "|" + "---|" * (len(tags) + 3)
    rows = [head, sep]
    for s in stages:
        cells = [f"{s.tags[t][0]:.3f} ± {s.tags[t][1]:.3f}" if t in s.tags else "-" for t in tags]
        rows.append(f"| {s.name} | **{s.overall:.3f} ± {s.overall_se:.3f}** | " + " | ".join(cells) + f" | {s.n_samples} |")
    return "\n".join(rows)


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [row for _, row in read_jsonl(path, ValueError)]


def plot_curves(runs: dict[str, list[dict]], keys: list[str], out_png: str | Path, title: str = "") -> Path | None:
    """Plot ``keys`` (each a metrics.jsonl field; a missing one is skipped) against ``step`` for every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [k for k in keys if any(k in r for rows in runs.values() for r in rows)]
    if not present:
        return None
    many = len(runs) > 4  # a sweep: the legend goes beside the plots, where it hides no curve
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present) + (3.5 if many else 0), 3.2),
                             squeeze=False)
    for ax, key in zip(axes[0], present):
        for label, rows in runs.items():
            pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows) if key in r and _finite(r[key])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=label, lw=1.4)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if many:
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    elif len(runs) > 1:
        axes[0][-1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def comparison_grid(images: dict[str, np.ndarray], prompts: list[str], scale: int = 2) -> Image.Image:
    """Rows are prompts, column blocks are stages (each block headed by its stage's name).

    images[stage]: uint8 [P, K, H, W, 3] (K samples of each of the same P prompts).
    """
    P, K = next(iter(images.values())).shape[:2]
    for stage, arr in images.items():
        if arr.shape[:2] != (P, K):
            raise ValueError(f"comparison_grid: stage {stage!r} has {arr.shape[:2]} images, expected {(P, K)}")
    rows = [[images[stage][p, k] for stage in images for k in range(K)] for p in range(P)]
    headers = [stage if k == 0 else "" for stage in images for k in range(K)]
    return Image.fromarray(image_grid(rows, scale=scale, labels=[_shorten(t, 34) for t in prompts], headers=headers))


def _shorten(text: str, n: int) -> str:
    text = text.removeprefix("a photo of ")
    return text if len(text) <= n else text[: n - 1] + "…"


# metrics.jsonl fields the report plots: TRL's names, plus argrpo's periodic evaluation. kl is logged when
# beta > 0 and the importance ratio when the correction is on; a field a run lacks is left out of its plot.
REWARD_CURVES = ["reward", "reward_std", "frac_reward_zero_std"]
POLICY_CURVES = ["kl", "entropy", "sampling/importance_sampling_ratio/mean", "clip_ratio/region_mean"]
EVAL_CURVES = ["eval/score"]


def write_report(
    out_dir: str | Path,
    stages: list[StageScores],
    curves: dict[str, list[dict]] | None = None,
    grid: Image.Image | None = None,
    title: str = "argrpo run report",
    notes: str = "",
) -> tuple[Path, str]:
    """Write ``index.html`` + PNGs + ``report.md`` under ``out_dir``; return (html path, markdown)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(stages)
    pngs: list[tuple[str, str]] = []
    if curves:
        reward_png = plot_curves(curves, REWARD_CURVES, out / "reward_curves.png", "GRPO reward")
        if reward_png:
            pngs.append(("Reward curves", reward_png.name))
        kl_png = plot_curves(curves, POLICY_CURVES, out / "kl_curves.png", "KL and policy statistics")
        if kl_png:
            pngs.append(("KL and policy statistics", kl_png.name))
        eval_png = plot_curves(curves, EVAL_CURVES, out / "eval_curve.png", "held-out score during GRPO")
        if eval_png:
            pngs.append(("Held-out score during GRPO", eval_png.name))
    if grid is not None:
        grid.save(out / "grid.png")
        pngs.append(("The same held-out prompts at each stage", "grid.png"))
    sampling = "; ".join(f"{s.name}: {json.dumps(s.sampling, sort_keys=True)}" for s in stages if s.sampling)
    md = f"# {title}\n\n{table}\n\nSampling: {sampling or 'n/a'}\n"
    if notes:
        md += f"\n{notes}\n"
    for caption, name in pngs:
        md += f"\n![{caption}]({name})\n"
    (out / "report.md").write_text(md)
    body = [f"<h1>{html.escape(title)}</h1>", _html_table(stages)]
    if sampling:
        body.append(f"<p><b>Sampling</b>: {html.escape(sampling)}</p>")
    if notes:
        body.append(f"<p>{html.escape(notes)}</p>")
    for caption, name in pngs:
        body.append(f"<h3>{html.escape(caption)}</h3><img src='{name}' style='max-width:100%'>")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>"
        + html.escape(title)
        + "</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>"
        + "\n".join(body)
        + "</body></html>"
    )
    (out / "index.html").write_text(page)
    return out / "index.html", md


def _html_table(stages: list[StageScores]) -> str:
    tags = sorted({t for s in stages for t in s.tags})
    head = "<tr><th>stage</th><th>overall</th>" + "".join(f"<th>{html.escape(t)}</th>" for t in tags) + "</tr>"
    rows = []
    for s in stages:
        cells = "".join(
            f"<td>{s.tags[t][0]:.3f} ± {s.tags[t][1]:.3f}</td>" if t in s.tags else "<td>-</td>" for t in tags
        )
        rows.append(f"<tr><td>{html.escape(s.name)}</td><td><b>{s.overall:.3f} ± {s.overall_se:.3f}</b></td>{cells}</tr>")
    return "<table>" + head + "".join(rows) + "</table>"
