"""Resumable GRPO checkpoints: the policy in argrpo's format plus the trainer state, written atomically.

    <output_dir>/checkpoints/step-0000040/
        model.safetensors | adapter_model.safetensors, config.json, tokenizer files, argrpo.json   (save_policy)
        optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json          (transformers' own resume files)
        argrpo_run.json                                                         step, data position, config

The directory appears only when complete (temp dir + rename), so a run killed at any moment leaves the previous
checkpoint loadable. Because the policy files sit at the top level, ``load_policy`` reads a checkpoint directly
and ``Trainer.train(resume_from_checkpoint=...)`` restores weights, optimizer, scheduler, RNG and step from it; the
data position follows from the step (see grpo.prompts).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

RUN_FILE = "argrpo_run.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Image tokenizers smaller than this are copied into each checkpoint; larger ones are referenced by path.
COPY_IMAGE_TOKENIZER_BYTES = 64 << 20


def checkpoint_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{int(step):07d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / RUN_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def read_run_state(path: str | Path) -> dict:
    f = Path(path) / RUN_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{path}: not a GRPO checkpoint (no {RUN_FILE})")
    return json.loads(f.read_text())


# What a resumed run must share with the run that wrote the checkpoint: these fix the data order (grpo.prompts)
# and what one step trains on. Anything else (max_steps, learning rate, logging, ...) may change on resume.
RESUME_KEYS = ("seed", "prompts_per_generation", "grpo.num_generations", "data.train_prompts", "data.shuffle",
               "data.max_prompts", "data.shapes_per_tag", "data.shapes_seed", "data.tag_weights")


def _lookup(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def check_resumable(path: str | Path, config: dict, layout=None) -> None:
    """Raise, naming the checkpoint's file and the key, when continuing from ``path`` would not continue the same
    run: another data order or group size (``RESUME_KEYS``), or a policy of another vocabulary layout.

    config: the new run's config as a dict (with ``prompts_per_generation``); layout: the policy's TokenLayout, or
    None to skip that check.
    """
    path = Path(path)
    state = read_run_state(path)
    saved = {**state.get("config", {}), "prompts_per_generation": state.get("prompts_per_generation")}
    for key in RESUME_KEYS:
        old, new = _lookup(saved, key), _lookup(config, key)
        if old is not None and old != new:
            raise ValueError(f"{path / RUN_FILE}: {key} was {old!r} in the run that wrote this checkpoint, now "
                             f"{new!r}; resuming would not continue the same data order. Set it back, or start a "
                             f"new output_dir")
    if layout is not None:
        from argrpo.models.layout import TokenLayout
        from argrpo.models.policy import ARGRPO_FILE, read_policy_meta

        meta = read_policy_meta(path)
        if meta is None:
            raise FileNotFoundError(f"{path}: no {ARGRPO_FILE}; not a complete checkpoint")
        layout.check_compatible(TokenLayout.from_dict(meta["layout"]), what=f"checkpoint {path / ARGRPO_FILE}")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_policy_files(path: str | Path, model, tokenizer, layout, image_tokenizer_path=None,
                      base_model_path=None, extra: dict | None = None) -> Path:
    """The policy in argrpo's format (full weights, or the LoRA adapter referencing its base checkpoint)."""
    from argrpo.models.policy import save_policy

    image_tokenizer, copy = None, True
    if image_tokenizer_path is not None:
        image_tokenizer = Path(image_tokenizer_path)
        copy = _dir_bytes(image_tokenizer) <= COPY_IMAGE_TOKENIZER_BYTES
    return save_policy(path, model, tokenizer, layout, image_tokenizer=image_tokenizer, copy_image_tokenizer=copy,
                       base_model_path=base_model_path, extra=extra)


def save_checkpoint(trainer, root: str | Path, *, tokenizer, layout, image_tokenizer_path=None,
                    base_model_path=None, run_state: dict | None = None) -> Path:
    """Write ``root/step-<global_step>`` atomically; returns its path."""
    from argrpo.models.checkpoint import atomic_dir

    step = int(trainer.state.global_step)
    final = checkpoint_dir(root, step)
    model = trainer.accelerator.unwrap_model(trainer.model)
    with atomic_dir(final) as tmp:
        save_policy_files(tmp, model, tokenizer, layout, image_tokenizer_path, base_model_path,
                          extra={"grpo_step": step})
        # transformers' own resume files, written by its own (stable, if underscored) helpers
        trainer._save_optimizer_and_scheduler(str(tmp))
        trainer._save_rng_state(str(tmp))
        trainer.state.save_to_json(str(tmp / "trainer_state.json"))
        (tmp / RUN_FILE).write_text(json.dumps({"step": step, **(run_state or {})}, indent=2, default=str))
    return final


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (keep=0: delete none); returns the deleted paths."""
    from argrpo.models.checkpoint import recover_all, remove_dir

    recover_all(root)  # temp dirs of a writer or a deletion that was killed
    if keep <= 0:
        return []
    found = list_checkpoints(root)
    doomed = [p for _, p in found[:-keep]]
    for p in doomed:
        remove_dir(p)  # renamed away first: a kill mid-deletion never leaves a gutted step dir behind
    return doomed
