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


# ---- sharded (FSDP2) checkpoints ----------------------------------------------------------------------------------
# accelerate's directory names: Trainer's own resume (``_load_from_checkpoint``) recognises an FSDP checkpoint by the
# model one and loads both with torch.distributed.checkpoint, resharding to the processes it runs on.
SHARDED_MODEL_DIR = "pytorch_model_fsdp_0"
SHARDED_OPTIMIZER_DIR = "optimizer_0"


def is_sharded_checkpoint(path: str | Path) -> bool:
    return (Path(path) / SHARDED_MODEL_DIR).is_dir()


def _broadcast_from_rank0(value):
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_sharded_checkpoint(trainer, root: str | Path, *, run_state: dict | None = None, **_policy_files) -> Path:
    """Write ``root/step-<global_step>`` of an FSDP2 run atomically; every process calls it (a collective).

    Each process writes its own shards of the weights and the optimizer state (torch.distributed.checkpoint through
    accelerate's ``save_fsdp_model`` / ``save_fsdp_optimizer``, as Trainer writes them) and its RNG state, into one
    temp dir that the main process created; the main process adds the scheduler, trainer state, the starting
    policy's metadata (argrpo.json, so a resume checks the vocabulary layout) and the run file, and renames the
    dir into place once every process is done. No process ever holds the full weights. The consolidated policy
    comes from :func:`export_checkpoint` (``argrpo export``).
    """
    import shutil
    from contextlib import nullcontext

    import torch.distributed as dist
    from argrpo.models.checkpoint import atomic_dir
    from argrpo.models.policy import ARGRPO_FILE

    step = int(trainer.state.global_step)
    final = checkpoint_dir(root, step)
    main = trainer.is_world_process_zero()
    with atomic_dir(final) if main else nullcontext(None) as tmp:
        tmp = Path(_broadcast_from_rank0(str(tmp) if main else None))
        trainer._save_optimizer_and_scheduler(str(tmp))  # model + optimizer shards on every process
        trainer._save_rng_state(str(tmp))  # rng_state_<rank>.pth
        if main:
            state = dict(run_state or {})
            policy = Path(state.get("config", {}).get("policy", {}).get("checkpoint") or "")
            if (policy / ARGRPO_FILE).is_file():
                shutil.copyfile(policy / ARGRPO_FILE, tmp / ARGRPO_FILE)
            trainer.state.save_to_json(str(tmp / "trainer_state.json"))
            state["sharded"] = {"world_size": dist.get_world_size(), "strategy": "fsdp"}
            (tmp / RUN_FILE).write_text(json.dumps({"step": step, **state}, indent=2, default=str))
        dist.barrier()  # every process's shards are on disk before the main process renames the dir
    dist.barrier()
    return final


def check_sharding(path: str | Path, strategy: str, processes: int) -> None:
    """Refuse, naming the counts, a checkpoint that cannot resume with ``strategy`` on ``processes`` processes.

    torch.distributed.checkpoint reshards weights and optimizer state to any number of FSDP processes, so a
    checkpoint written by N processes resumes on M >= 2 (with the same global batch: check_resumable compares
    prompts_per_generation; ranks beyond N start from fresh RNG states). One process runs no FSDP and cannot load
    shards, and a DDP checkpoint (full weights, one optimizer state) does not load into shards: those are refused.
    """
    from argrpo.errors import UserFileError

    sharded = read_run_state(path).get("sharded")
    where = Path(path) / RUN_FILE
    if sharded and (strategy != "fsdp" or processes < 2):
        n = sharded["world_size"]
        raise UserFileError(
            f"{where}: written as FSDP shards by {n} learner processes; this run has {processes} process"
            f"{'es' if processes != 1 else ''} with distributed.strategy={strategy}, which cannot load shards. "
            f"Resume with distributed.strategy=fsdp on >= 2 processes (any count: the shards are redistributed), or "
            f"`argrpo export {path} OUT` and start a new run from OUT")
    if not sharded and strategy == "fsdp" and processes > 1:
        raise UserFileError(
            f"{where}: written by a {read_run_state(path).get('config', {}).get('distributed', {}).get('strategy', 'ddp')}"
            f" run (full weights); this run shards over {processes} processes (distributed.strategy=fsdp). Resume "
            f"with distributed.strategy=ddp, or start a new FSDP run from it (policy.checkpoint={path})")


def export_checkpoint(path: str | Path, out: str | Path) -> Path:
    """A sharded checkpoint -> a consolidated policy directory (``save_policy``: Hugging Face weights that
    transformers loads, tokenizer, argrpo.json; a LoRA run gives its adapter beside the base it names), in one
    process, no process group needed. An unsharded checkpoint (GRPO step-N or pretrain/SFT checkpoint-N) is
    rewritten as a policy too; a sharded pretrain/SFT checkpoint is refused (its config is not in it).

    The model is rebuilt as the run built it (the run file's ``policy`` config: the starting checkpoint, LoRA
    settings) and its weights are read from the shards with ``torch.distributed.checkpoint.load``.
    """
    from argrpo.config import from_dict
    from argrpo.errors import UserFileError
    from argrpo.models.policy import (
        PolicyConfig,
        is_peft_model,
        load_policy,
        policy_from_config,
        read_policy_meta,
    )

    path = Path(path)
    if not (path / RUN_FILE).is_file():  # a pretrain/SFT checkpoint-N (Trainer's files)
        if is_sharded_checkpoint(path):
            raise UserFileError(f"{path}: a pretrain/SFT checkpoint of shards; resume the stage from it "
                             f"(train.resume) on >= 2 processes: its run directory ends as a consolidated policy")
        step = json.loads((path / "trainer_state.json").read_text())["global_step"]
        loaded = load_policy(path)
        return save_policy_files(out, loaded.model, loaded.tokenizer, loaded.layout, loaded.image_tokenizer_path,
                                 (read_policy_meta(path) or {}).get("base_model"), extra={"stage_step": step})
    state = read_run_state(path)
    if not is_sharded_checkpoint(path):
        loaded = load_policy(path)
        return save_policy_files(out, loaded.model, loaded.tokenizer, loaded.layout, loaded.image_tokenizer_path,
                                 (read_policy_meta(path) or {}).get("base_model"), extra={"grpo_step": state["step"]})
    import torch.distributed.checkpoint as dcp

    policy_cfg = from_dict(PolicyConfig, state["config"]["policy"], source=str(path / RUN_FILE), prefix="policy")
    model, loaded = policy_from_config(policy_cfg)
    shards = model.state_dict()
    dcp.load({"model": shards}, checkpoint_id=str(path / SHARDED_MODEL_DIR))
    model.load_state_dict(shards)
    base_model = str(loaded.path) if is_peft_model(model) else None
    if is_peft_model(model) and (loaded.path / "adapter_config.json").is_file():
        base_model = (read_policy_meta(loaded.path) or {}).get("base_model")
    return save_policy_files(out, model.eval(), loaded.tokenizer, loaded.layout, loaded.image_tokenizer_path,
                             base_model, extra={"grpo_step": state["step"]})
