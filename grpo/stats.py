"""Per-step measurements that the rollout function, the rewards and the trainer share with the logging callbacks."""

from __future__ import annotations

from collections import defaultdict

import numpy as np


class StepStats:
    """Accumulates one optimizer step's timings (seconds), scalar metrics and the last scored batch.

    ``take()`` returns everything as a flat ``{name: float}`` and starts the next step; the trainer merges it into
    TRL's log line, so it reaches TensorBoard, W&B and metrics.jsonl with TRL's own metrics.
    """

    def __init__(self):
        self.times: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.values: dict[str, float] = {}
        self.batch: dict | None = None  # {"prompts": [B], "images": [B], "scores": {reward: [B]}}
        self.totals: dict[str, float] = defaultdict(float)  # run totals of the timings, for the final summary

    def add_time(self, key: str, seconds: float, cpu: float | None = None) -> None:
        """Wall seconds (``time/<key>``) and optionally process CPU seconds, all threads (``cpu/<key>``)."""
        self.times[key] += float(seconds)
        self.totals[key] += float(seconds)
        if cpu is not None:
            self.cpu[key] += float(cpu)
            self.totals[f"cpu/{key}"] += float(cpu)

    def set(self, key: str, value: float) -> None:
        self.values[key] = float(value)

    def record_advantages(self, advantages) -> None:
        """advantages: [B] (this process's completions, after group normalisation)."""
        a = np.asarray(advantages.detach().float().cpu() if hasattr(advantages, "detach") else advantages,
                       dtype=np.float64).reshape(-1)
        if a.size == 0:
            return
        self.values.update({
            "advantages/mean": float(a.mean()), "advantages/std": float(a.std()),
            "advantages/min": float(a.min()), "advantages/max": float(a.max()),
            "advantages/abs_mean": float(np.abs(a).mean()), "advantages/frac_zero": float((a == 0).mean()),
        })

    def record_scores(self, name: str, prompts, images, scores) -> None:
        if self.batch is None or self.batch.get("images") is not images:
            self.batch = {"prompts": list(prompts), "images": images, "scores": {}}
        self.batch["scores"][name] = list(scores)

    def take(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.times.items()}
        out.update({f"cpu/{k}": v for k, v in self.cpu.items()})
        out.update(self.values)
        self.times = defaultdict(float)
        self.cpu = defaultdict(float)
        self.values = {}
        return out
