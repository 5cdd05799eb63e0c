"""Trainer callbacks: step timing, metrics.jsonl, image grids, a compact progress bar, checkpoints, evaluation.

With several learner processes (``torch.distributed.run``), only the main process (``state.is_world_process_zero``)
writes files, shows progress and evaluates; every process times its steps and pushes weights to its own rollout
pool, and the time budget stops all of them at the same step.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
from argrpo.grids import image_grid
from argrpo.grpo.stats import StepStats
from transformers import TrainerCallback


def _max_over_processes(value: float) -> float:
    """The largest ``value`` over all learner processes (itself when there is one): a decision to stop must be the
    same everywhere, or the processes that go on wait forever in the next collective."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _is_train_log(logs: dict) -> bool:
    return not any(k.startswith("eval_") for k in logs) and ("loss" in logs or "reward" in logs)


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step and its split: rollout (waiting for samples), reward, sync, learn.

    ``cpu/<phase>`` are process CPU seconds (every thread; robust to other processes sharing the machine).

    learn = step - rollout - reward - sync: the learner's forward/backward passes (old/ref log-probs included),
    the optimizer step and TRL's bookkeeping. Decoding runs inside the rollout workers, so ``time/decode`` and
    ``time/rollout_generate`` are the workers' own figures (parts of ``time/rollout`` in sync mode, overlapped
    with learning in async mode).
    """

    def __init__(self, stats: StepStats):
        self.stats = stats
        self._t0 = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is None:
            return
        total, cpu = time.perf_counter() - self._t0, time.process_time() - self._c0
        t, c = self.stats.times, self.stats.cpu
        learn = total - t.get("rollout", 0.0) - t.get("reward", 0.0) - t.get("sync", 0.0)
        # in sync mode nothing else runs during learning, so the remaining process CPU time is the learner's
        learn_cpu = cpu - c.get("rollout", 0.0) - c.get("reward", 0.0)
        self.stats.add_time("step", total, cpu=cpu)
        self.stats.add_time("learn", max(0.0, learn), cpu=max(0.0, learn_cpu))
        self._t0 = None


class WeightPusher(TrainerCallback):
    """Sync mode: after each optimizer step, send the new weights (version = step) to the rollout workers.

    The last step's weights are not sent (no rollout follows). Async mode leaves the push to the rollout function,
    which sends right after collecting the prefetched batch (pushing here would wait behind that batch and book
    the wait as sync time).
    """

    def __init__(self, trainer, sync, stats: StepStats):
        self.trainer, self.sync, self.stats = trainer, sync, stats

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            return
        self.sync.ensure(self.trainer.model, state.global_step)
        self.stats.add_time("sync", self.sync.take_seconds())


class TimeBudget(TrainerCallback):
    """Stops training after ``minutes`` of wall time or of this process's CPU time (evaluation and checkpoint time
    excluded: they are booked by their callbacks as ``time/eval`` / ``time/checkpoint``)."""

    def __init__(self, minutes: float, clock: str, stats: StepStats):
        self.limit, self.clock, self.stats = 60.0 * minutes, clock, stats
        self.used = 0.0
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        key = "cpu/step" if self.clock == "cpu" else "step"
        self.used = _max_over_processes(self.stats.totals.get(key, 0.0))
        self.stats.set("budget/used_minutes", self.used / 60.0)
        if self.used >= self.limit:
            control.should_training_stop = True
            self.stopped_at = state.global_step


class MetricsJsonl(TrainerCallback):
    """One JSON line per logged training step: ``{"step", "wall", <every metric>}``; easy to plot.

    On resume, lines past the checkpoint's step (written by the interrupted run) are dropped first, so the file
    reads as one run.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._start = time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= state.global_step:
                        keep.append(line)
                except json.JSONDecodeError:
                    continue
            self.path.write_text("".join(x + "\n" for x in keep))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not _is_train_log(logs) or not state.is_world_process_zero:
            return
        row = {"step": state.global_step, "wall": round(time.time() - self._start, 3)}
        for k, v in logs.items():
            if isinstance(v, (int, float)) and not (isinstance(v, float) and not math.isfinite(v)):
                row[k] = v
            elif v is None:
                row[k] = None
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def batch_grid(prompts: list[str], images, scores: dict[str, list], weights: dict[str, float], G: int,
               max_prompts: int = 4, tile: int = 128) -> np.ndarray:
    """One row per prompt: the caption, then its G images with their composite reward (and each reward).

    images: B uint8 [H, W, 3] in prompt order (prompt p owns rows p*G .. p*G+G-1) -> uint8 [H', W', 3].
    """
    n = min(max_prompts, len(prompts) // G)
    names = list(scores)

    def lines(i: int) -> list[str]:
        vals = {k: scores[k][i] for k in names}
        comp = sum(weights.get(k, 1.0) * v for k, v in vals.items() if v is not None)
        each = [f"{k[:12]}={'-' if v is None else f'{v:.2f}'}" for k, v in list(vals.items())[:3]] if len(names) > 1 else []
        return [f"R={comp:.3f}", *each]

    rows = [[images[p * G + g] for g in range(G)] for p in range(n)]
    return image_grid(rows, tile=tile, gap=4, captions=[prompts[p * G][:120] for p in range(n)],
                      notes=[[lines(p * G + g) for g in range(G)] for p in range(n)], font_size=max(10, tile // 10))


class ImageGridLogger(TrainerCallback):
    """Every ``every`` steps: a grid of the last scored batch to ``<dir>/step-N.png``, TensorBoard and W&B."""

    def __init__(self, stats: StepStats, out_dir: str | Path, every: int, G: int, weights: dict[str, float],
                 max_prompts: int = 4, tb_writer=None):
        self.stats, self.dir, self.every, self.G = stats, Path(out_dir), int(every), int(G)
        self.weights, self.max_prompts, self.tb_writer = weights, max_prompts, tb_writer
        self.written: list[Path] = []

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if not self.every or (step % self.every and step != 1) or self.stats.batch is None:
            return
        if not state.is_world_process_zero:
            return
        b = self.stats.batch
        grid = batch_grid(b["prompts"], b["images"], b["scores"], self.weights, self.G, self.max_prompts)
        from PIL import Image

        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step-{step:07d}.png"
        Image.fromarray(grid).save(path)
        self.written.append(path)
        if self.tb_writer is not None:
            self.tb_writer.add_image("rollouts", grid, step, dataformats="HWC")
            self.tb_writer.flush()
        if "wandb" in (args.report_to or []):
            try:
                import wandb

                if wandb.run is not None:
                    wandb.log({"rollouts": wandb.Image(grid)}, step=step)
            except ImportError:
                pass


class ProgressBar(TrainerCallback):
    """A one-line tqdm bar: step, mean reward, KL and seconds per step (replaces the per-log dict printing)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.enabled and state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="grpo", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs or not _is_train_log(logs):
            return
        post = {}
        for key, short in (("reward", "R"), ("kl", "kl"), ("time/step", "s/step"), ("eval/score", "eval")):
            if isinstance(logs.get(key), (int, float)):
                post[short] = f"{logs[key]:.3g}"
        self.bar.set_postfix(post, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Checkpointer(TrainerCallback):
    """Every ``every`` steps, a resumable checkpoint (grpo.checkpointing), keeping the newest ``keep``.

    It is written once the step's log line is out (this callback comes after MetricsJsonl), as Trainer itself does:
    a checkpoint then holds its step's metrics, and a kill between the two loses no step's line (the resumed run
    redoes and logs the step). Its own time goes into the next step's ``time/checkpoint``.
    """

    def __init__(self, trainer, root: str | Path, every: int, keep: int, stats: StepStats, state_fn=None,
                 **save_kwargs):
        self.trainer, self.root, self.every, self.keep = trainer, Path(root), int(every), int(keep)
        self.stats, self.save_kwargs = stats, save_kwargs
        self.state_fn = state_fn  # () -> dict merged into the run state at each save (state that changes)
        self.saved: list[Path] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not _is_train_log(logs) or not self.every or state.global_step % self.every:
            return
        from argrpo.grpo.sharding import is_fsdp

        # data-parallel replicas hold the same weights and optimizer state: the main process writes them alone;
        # FSDP2 shards are written by every process (grpo.checkpointing.save_sharded_checkpoint)
        sharded = is_fsdp(self.trainer.model)
        if not (state.is_world_process_zero or sharded):
            return
        from argrpo.grpo.checkpointing import prune_checkpoints, save_checkpoint, save_sharded_checkpoint

        t0 = time.perf_counter()
        kwargs = dict(self.save_kwargs)
        if self.state_fn is not None:
            kwargs["run_state"] = {**(kwargs.get("run_state") or {}), **self.state_fn()}
        save = save_sharded_checkpoint if sharded else save_checkpoint
        self.saved.append(save(self.trainer, self.root, **kwargs))
        if state.is_world_process_zero:
            prune_checkpoints(self.root, self.keep)
        self.stats.add_time("checkpoint", time.perf_counter() - t0)


class PeriodicEval(TrainerCallback):
    """Calls ``fn(step) -> {name: value}`` every ``every`` steps (and at the start) and logs ``eval/<name>``.

    The values go into the next training log line (so metrics.jsonl and TensorBoard hold them) and into
    ``history`` as (step, values).
    """

    def __init__(self, fn, every: int, stats: StepStats, at_start: bool = True):
        self.fn, self.every, self.stats, self.at_start = fn, int(every), stats, at_start
        self.history: list[tuple[int, dict]] = []

    def _run(self, step: int) -> dict:
        t0 = time.perf_counter()
        values = {k: float(v) for k, v in self.fn(step).items() if isinstance(v, (int, float))}
        self.history.append((step, values))
        for k, v in values.items():
            self.stats.set(f"eval/{k}", v)
        self.stats.add_time("eval", time.perf_counter() - t0)
        return values

    def on_train_begin(self, args, state, control, **kwargs):
        if self.every and self.at_start and state.global_step == 0 and state.is_world_process_zero:
            self._run(0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0 and state.is_world_process_zero:
            self._run(state.global_step)
