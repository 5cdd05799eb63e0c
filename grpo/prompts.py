"""The training prompt stream: every generation's prompts, laid out in order as one ``datasets.Dataset``.

TRL reads its train dataset in order when ``shuffle_dataset=False``: generation ``k`` gets rows
``[k*P, (k+1)*P)`` (P prompts per generation), each repeated G times by TRL's sampler. Writing the whole schedule
out up front (a fresh seeded permutation of the prompt set per epoch, concatenated) makes the data order a pure
function of the seed, lets a resumed run continue at the same data position (TRL/transformers skip the consumed
batches), and lets async mode know the next generation's prompts before TRL asks for them.

Columns: ``prompt`` (the caption), ``metadata`` (the GenEval row as a JSON string: Arrow would otherwise pad
missing keys of dict rows with None), ``row`` (index in the prompt file).
"""

from __future__ import annotations

import json
import math

import numpy as np


def load_prompts(source: str, shapes_per_tag: int = 200, shapes_seed: int = 0, geneval: bool = False) -> list[dict]:
    """A prompt set -> rows with at least ``prompt``.

    ``shapes:<split>``: the shapes world's GenEval-schema prompt set (``shapes_per_tag`` rows per tag); else a prompt
    file as :func:`argrpo.data.prompts.read_prompts` reads it (``*.txt``: one caption a line; ``*.jsonl``: one
    object a line, GenEval rows validated; ``geneval=True``: every row must be one). Errors name the file and
    1-based row.
    """
    if source.startswith("shapes:"):
        from argrpo.data.shapes import ShapesWorld

        return ShapesWorld().prompt_set(source.split(":", 1)[1], shapes_per_tag, shapes_seed)
    from argrpo.data.prompts import read_prompts

    return read_prompts(source, geneval=geneval)


def weight_by_tag(specs: list[dict], weights: dict[str, float], where: str = "tag_weights") -> list[dict]:
    """The prompt set with each tag's rows drawn ``weights[tag]`` times as often (tags not named: 1).

    A tag with ``n`` rows and weight ``w`` keeps ``round(w * n)`` rows, taken in file order and cycling through them
    when ``w > 1``, so the result is a fixed list that the per-epoch shuffles of :func:`schedule` then permute.
    Rows keep their relative order. A weight naming a tag that no row carries is an error (a typo would otherwise
    silently train on the unweighted set).
    """
    by_tag: dict[str, list[int]] = {}
    for i, s in enumerate(specs):
        by_tag.setdefault(s.get("tag"), []).append(i)
    unknown = sorted(t for t in weights if t not in by_tag)
    if unknown:
        known = sorted(t for t in by_tag if t is not None)
        raise ValueError(f"{where}: no training prompt has tag {unknown[0]!r}; the prompts' tags: {known}")
    picked: list[int] = []
    for tag, rows in by_tag.items():
        n = round(float(weights.get(tag, 1.0)) * len(rows))
        picked += [rows[j % len(rows)] for j in range(n)]
    if not picked:
        raise ValueError(f"{where}: the weights leave no training prompt")
    return [specs[i] for i in sorted(picked)]


def schedule(n_prompts: int, total: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """Indices into the prompt set, ``[total]``: epoch after epoch, each a permutation seeded by (seed, epoch)."""
    if n_prompts < 1:
        raise ValueError("no prompts")
    epochs = math.ceil(total / n_prompts)
    parts = []
    for e in range(epochs):
        if shuffle:
            parts.append(np.random.default_rng([int(seed), e]).permutation(n_prompts))
        else:
            parts.append(np.arange(n_prompts))
    return np.concatenate(parts)[:total]


def prompt_stream(specs: list[dict], prompts_per_generation: int, generations: int, seed: int,
                  shuffle: bool = True):
    """GenEval specs -> ``datasets.Dataset`` holding ``generations + 2`` generations' worth of prompt rows.

    Two spare generations: async mode prefetches one ahead, and TRL's sampler drops an incomplete last chunk.
    """
    from datasets import Dataset

    if prompts_per_generation < 1 or generations < 1:
        raise ValueError("prompts_per_generation and generations must be >= 1")
    total = (generations + 2) * prompts_per_generation
    idx = schedule(len(specs), total, seed, shuffle)
    for i, spec in enumerate(specs):
        if not isinstance(spec.get("prompt"), str) or not spec["prompt"].strip():
            raise ValueError(f"prompt row {i + 1}: missing or empty 'prompt'")
    meta = [json.dumps(s, sort_keys=True) for s in specs]
    return Dataset.from_dict({
        "prompt": [specs[i]["prompt"] for i in idx],
        "metadata": [meta[i] for i in idx],
        "row": [int(i) for i in idx],
    })


def generation_prompts(captions: list[str], k: int, prompts_per_generation: int) -> list[str] | None:
    """Captions of generation ``k`` from the stream's caption column (None past its end)."""
    start, end = k * prompts_per_generation, (k + 1) * prompts_per_generation
    if k < 0 or end > len(captions):
        return None
    return list(captions[start:end])


def find_generation(captions: list[str], batch: list[str], prompts_per_generation: int,
                    hint: int | None = None) -> int | None:
    """Which generation ``k`` of the stream holds exactly ``batch`` (``hint`` is checked first); None if none."""
    n = len(captions) // prompts_per_generation
    order = ([hint] if hint is not None and 0 <= hint < n else []) + [k for k in range(n) if k != hint]
    for k in order:
        if generation_prompts(captions, k, prompts_per_generation) == batch:
            return k
    return None
