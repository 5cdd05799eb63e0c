"""Pretrain and SFT: causal-LM training on ``prompt + <soi> + codes`` with Hugging Face ``Trainer``.

Each training row is ``layout.format_prompt(caption)`` tokenized, then the image's ``h*w`` codes as visual ids.
Rows are left-padded, so the image tokens of every row occupy the last ``N = h*w`` positions and position
``T-N-1+k`` predicts image token ``k``. The loss is cross-entropy on the image tokens only (optionally plus a
weighted text loss on the prompt). Logits are computed only for the rows that need them:

    hidden = decoder(input_ids)                         [B, T, H]   (no LM head, no full-vocabulary logits)
    logits = hidden[:, -N-1:-1] @ lm_head.weight[visual_slice].T   [B, N, C]  (C = codebook size, not V)

Caption dropout swaps a caption for ``layout.uncond_caption`` (the same empty caption CFG's unconditional branch
uses); which rows are dropped depends only on (seed, epoch, row), so an interrupted run resumes identically.

Gradient accumulation, bf16 autocast, LR schedules, checkpoints, resume, TensorBoard and the progress bar are
Trainer's. Every ``checkpoint-N`` directory is also a policy checkpoint (``models.policy.save_policy``: HF weights,
text tokenizer, argrpo.json with the layout and the image tokenizer reference), and at the end ``output_dir``
itself becomes one, so ``load_policy(output_dir)`` loads the trained model.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from argrpo.data.captions import CaptionSource
from argrpo.grpo.sharding import DistributedConfig, set_plugin_precision, training_arguments
from argrpo.models.families import family_for_layout
from argrpo.models.policy import ARGRPO_FILE, PolicyConfig
from argrpo.models.unwrap import unwrap_model

CHECKPOINT_PREFIX = "checkpoint-"
SHARDED_MODEL_DIR = "pytorch_model_fsdp_0"  # accelerate's FSDP model shards (torch.distributed.checkpoint)


# ---- config ----------------------------------------------------------------------------------------------------
@dataclass
class TrainSettings:
    """Optimisation and bookkeeping, passed on to ``transformers.TrainingArguments``."""

    max_steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=64, metadata={"help": "rows per forward pass"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "forward passes per optimizer step"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Trainer scheduler name (cosine, linear, ...)"})
    warmup_steps: float = field(default=0.05, metadata={"help": "warmup: steps (>= 1) or a fraction of max_steps"})
    optim: str = field(
        default="adamw_torch_fused", metadata={"help": "Trainer optimizer name (the fused AdamW halves its CPU time)"}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    bf16: bool | Literal["auto"] = field(
        default="auto", metadata={"help": "bf16 autocast. auto: on where the device runs bf16 natively (a bf16 CUDA "
                                          "device, a CPU with AVX512-BF16 or AMX), off where it is emulated"})
    seed: int = field(default=0, metadata={"help": "seed of data order, caption dropout and Trainer's RNGs"})
    save_steps: int = field(default=200, metadata={"help": "checkpoint every N steps"})
    save_total_limit: int | None = field(default=2, metadata={"help": "keep the newest N checkpoints"})
    logging_steps: int = field(default=20, metadata={"help": "log loss/LR every N steps"})
    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"], metadata={"help": "Trainer loggers ([] = none)"}
    )
    resume: str = field(
        default="auto",
        metadata={"help": "'auto': continue from the newest complete checkpoint in output_dir if any; 'never'; "
                          "or a checkpoint path"},
    )
    threads: int | None = field(default=None, metadata={"help": "torch threads (None: OMP_NUM_THREADS or cores)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    trainer_args: dict = field(
        default_factory=dict, metadata={"help": "extra TrainingArguments fields, passed as given"}
    )

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"train.learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class LMStageConfig:
    """A causal-LM stage on image-caption data (shared by pretrain and SFT).

    output_dir ends as a policy checkpoint; Trainer's ``checkpoint-N`` directories and TensorBoard logs live
    inside it.
    """

    output_dir: str = field(default="runs/lm_stage", metadata={"help": "run directory; the final policy lands here"})
    policy: PolicyConfig = field(default_factory=PolicyConfig, metadata={"help": "the model to train"})
    image_tokenizer: str | None = field(
        default=None, metadata={"help": "image tokenizer directory; None: the one policy.checkpoint references"}
    )
    text_tokenizer: str | None = field(
        default=None,
        metadata={"help": "text tokenizer directory for a new policy; None: a word-level tokenizer over the shapes "
                          "world's vocabulary (shapes data) or the captions' words"},
    )
    layout: str = field(default="shapes", metadata={"help": "layout preset of a new policy"})
    data: CaptionSource = field(default_factory=CaptionSource, metadata={"help": "image-caption data"})
    cache_dir: str = field(default="runs/cache/codes", metadata={"help": "token cache directory (shared by runs)"})
    encode_batch_size: int = field(default=256, metadata={"help": "images per image-tokenizer call when caching"})
    caption_dropout: float = field(
        default=0.1, metadata={"help": "fraction of rows trained with the empty (CFG unconditional) caption"}
    )
    text_loss_weight: float = field(
        default=0.0, metadata={"help": "weight of the next-token loss on prompt text (0 = image tokens only)"}
    )
    copy_image_tokenizer: bool = field(
        default=True, metadata={"help": "copy the image tokenizer into checkpoints (False: reference its path)"}
    )
    visual_head: str = field(
        default="free",
        metadata={"help": "what the LM head's visual rows may express: 'free' (a vector per code) or 'factored' "
                          "(sums of the image tokenizer's code features, e.g. mask + colour; projected after "
                          "every step, models.visual_head)"},
    )
    train: TrainSettings = field(default_factory=TrainSettings, metadata={"help": "optimisation"})
    distributed: DistributedConfig = field(
        default_factory=DistributedConfig,
        metadata={"help": "several processes (torch.distributed.run): ddp replicas or fsdp (FSDP2) shards"})

    def __post_init__(self):
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.text_loss_weight < 0:
            raise ValueError(f"text_loss_weight must be >= 0, got {self.text_loss_weight}")
        if self.policy.checkpoint is None and self.image_tokenizer is None:
            raise ValueError("a new policy needs image_tokenizer (the directory `argrpo tokenizer train` wrote)")
        from argrpo.models.visual_head import check_name

        check_name(self.visual_head)
        if self.visual_head != "free" and self.policy.lora.enabled:
            raise ValueError(f"visual_head={self.visual_head!r} constrains the LM head, which LoRA adapters neither "
                             f"train nor save; use it with full training (policy.lora.enabled=false)")
        if self.visual_head != "free" and self.distributed.strategy == "fsdp":
            raise ValueError(f"visual_head={self.visual_head!r} rewrites the whole LM head after every step, which "
                             f"FSDP holds in shards; use distributed.strategy=ddp or visual_head=free")


@dataclass
class PretrainConfig(LMStageConfig):
    """Pretraining: a new (or given) policy on broad image-caption data."""


@dataclass
class SFTConfig(LMStageConfig):
    """Supervised fine-tuning: continues a pretrained policy (policy.checkpoint) on its own data and LR."""

    def __post_init__(self):
        if self.policy.checkpoint is None:
            raise ValueError("SFT starts from a pretrained policy: set policy.checkpoint")
        super().__post_init__()


# ---- data ------------------------------------------------------------------------------------------------------
class CodesDataset(torch.utils.data.Dataset):
    """Rows of (prompt ids, codes) from a token cache, with per-epoch caption dropout.

    Item: ``{"prompt_ids": list[int], "codes": int64 [N]}``. Row ``i`` of epoch ``e`` is dropped (its prompt is the
    family's unconditional prompt for it, the one CFG samples with) iff ``rng(seed, e).random(R)[i] < p``: a pure
    function of (seed, epoch, row). layout: the policy's ``ModelFamily`` or a bare ``TokenLayout``.
    """

    def __init__(self, cached, tokenizer, layout, caption_dropout: float = 0.0, seed: int = 0):
        captions = cached["caption"]
        uniq = sorted(set(captions))
        self.family = family_for_layout(layout)
        self.tokenizer = tokenizer
        ids = dict(zip(uniq, self.family.encode_prompts(tokenizer, uniq)))  # as the rollout engines build them
        self.prompt_ids = [ids[c] for c in captions]
        self._uncond: dict[tuple[int, ...], list[int]] = {}
        codes = cached.with_format("numpy", columns=["codes"])
        # Small caches (the shapes world: 64 codes a row) are read into memory once; large ones stay in Arrow.
        self.codes = codes["codes"] if len(codes) * len(codes[0]["codes"]) <= 64_000_000 else codes
        self.p = float(caption_dropout)
        self.seed = int(seed)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        rng = np.random.default_rng([self.seed, self.epoch, 17])
        self.dropped = rng.random(len(self.prompt_ids)) < self.p

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def uncond_prompt(self, prompt_ids: list[int]) -> list[int]:
        """The family's unconditional prompt for a row (one for all rows, or one per prompt length as Janus's)."""
        key = tuple(prompt_ids)
        if key not in self._uncond:
            self._uncond[key] = self.family.uncond_prompt_ids(self.tokenizer, prompt_ids)
        return self._uncond[key]

    def __getitem__(self, i: int) -> dict:
        prompt = self.uncond_prompt(self.prompt_ids[i]) if self.dropped[i] else self.prompt_ids[i]
        row = self.codes[int(i)]
        row = row["codes"] if isinstance(row, dict) else row
        return {"prompt_ids": prompt, "codes": torch.as_tensor(row, dtype=torch.long)}


class CodesCollator:
    """Left-pads prompts and appends the image ids (with the family's forced tokens, e.g. Emu3's row ends, in place).

    layout: the policy's ``ModelFamily`` or a bare ``TokenLayout`` (the shared-vocabulary family).
    Returns input_ids / attention_mask / position_ids int64 [B, L+T] (positions start at 0 on each row's first real
    token, as in the rollout engines; T = N codes plus the forced tokens) and image_codes int64 [B, N].
    """

    def __init__(self, layout, pad_token_id: int):
        self.family = family_for_layout(layout)
        self.layout = self.family.layout
        self.pad = int(pad_token_id)

    def __call__(self, items: list[dict]) -> dict:
        B, N = len(items), self.layout.n_image_tokens
        T = self.family.completion_length
        L = max(len(it["prompt_ids"]) for it in items)
        input_ids = torch.full((B, L + T), self.pad, dtype=torch.long)
        mask = torch.zeros((B, L + T), dtype=torch.long)
        codes = torch.stack([it["codes"] for it in items])
        if codes.shape[1] != N:
            raise ValueError(f"cached codes have {codes.shape[1]} tokens but the layout expects {N}")
        for i, it in enumerate(items):
            p = it["prompt_ids"]
            input_ids[i, L - len(p) : L] = torch.as_tensor(p, dtype=torch.long)
            mask[i, L - len(p) :] = 1
        if T == N:
            input_ids[:, L:] = codes + self.layout.visual_offset
        else:
            sampled = self.family.sampled_mask()
            image = torch.empty(B, T, dtype=torch.long)
            image[:, sampled] = codes + self.layout.visual_offset
            image[:, ~sampled] = torch.tensor([t for _, t in sorted(self.family.forced_tokens.items())])
            input_ids[:, L:] = image
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "image_codes": codes}


# ---- loss ------------------------------------------------------------------------------------------------------


def image_logits(model, batch: dict, layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the image positions over the visual codebook only (no full-vocabulary logits).

    batch: input_ids / attention_mask / position_ids [B, T], image_codes [B, N]; layout: the policy's
    ``ModelFamily`` (a bare ``TokenLayout``: the shared-vocabulary family).
    Returns (logits float32 [B, N, C] predicting image_codes, the decoder's hidden states [B, T, H]). A family's
    forced tokens are inputs only: no logits predict them (no loss).
    """
    family = family_for_layout(layout)
    hidden = family.decoder(model)(
        **family.decoder_inputs(model, batch["input_ids"]), attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"], use_cache=False,
    ).last_hidden_state  # [B, T, H]
    N = batch["image_codes"].shape[1]
    if family.forced_tokens:
        h = hidden[:, -family.completion_length - 1 : -1][:, family.sampled_mask().to(hidden.device)]
    else:
        h = hidden[:, -N - 1 : -1]
    rows = getattr(family, "visual_head_rows", None)
    if rows is None:
        return family.visual_logits(model, h).float(), hidden
    w, bias = rows(model)  # [C, H]: the visual rows of the LM head
    logits = h @ w.T  # [B, N, C]
    if bias is not None:
        logits = logits + bias
    return logits.float(), hidden


def visual_lm_loss(model, batch: dict, layout, text_loss_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Cross-entropy of the image codes (and optionally the prompt text) without full-vocabulary logits.

    batch: input_ids / attention_mask / position_ids [B, T], image_codes [B, N].
    Returns (loss, {"image_loss", "text_loss"} as floats).
    """
    logits, hidden = image_logits(model, batch, layout)
    codes = batch["image_codes"]  # [B, N]
    N = codes.shape[1] + len(family_for_layout(layout).forced_tokens)  # image tokens, forced ones included
    image_loss = F.cross_entropy(logits.flatten(0, 1), codes.flatten())
    metrics = {"image_loss": float(image_loss.detach())}
    loss = image_loss
    if text_loss_weight > 0:
        T = batch["input_ids"].shape[1]
        L = T - N
        m = batch["attention_mask"][:, :L].bool()
        valid = m[:, :-1] & m[:, 1:]  # [B, L-1]: position t predicts prompt token t+1
        if bool(valid.any()):
            tl = family_for_layout(layout).text_logits(model, hidden[:, : L - 1][valid])  # [K, text ids]
            text_loss = F.cross_entropy(tl.float(), batch["input_ids"][:, 1:L][valid])
            loss = loss + text_loss_weight * text_loss
            metrics["text_loss"] = float(text_loss.detach())
    return loss, metrics


def _sharded_loss(model):
    """``visual_lm_loss`` bound to ``model``, run where the data-parallel wrapper sees it as a forward pass.

    The loss calls the decoder and reads the LM head's rows itself, so a wrapper's hooks on ``forward`` would be
    bypassed: under DDP the gradients would never be all-reduced (each process would train on its own rows),
    under FSDP2 the root's parameters never gathered. DDP: the wrapped module's ``forward`` computes the loss when
    called with ``argrpo_visual_lm_loss=(batch, layout, text_loss_weight)``, and the loss goes through
    ``DistributedDataParallel.forward``. FSDP2: the loss is a registered forward method
    (``register_fsdp_forward_method``).
    """
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        inner = model.module
        if not hasattr(inner, "_argrpo_plain_forward"):
            inner._argrpo_plain_forward = inner.forward

            def forward(self, *args, argrpo_visual_lm_loss=None, **kwargs):
                if argrpo_visual_lm_loss is None:
                    return self._argrpo_plain_forward(*args, **kwargs)
                return visual_lm_loss(self, *argrpo_visual_lm_loss)

            inner.forward = types.MethodType(forward, inner)
        return lambda batch, layout, w: model(argrpo_visual_lm_loss=(batch, layout, w))
    if not isinstance(model, FSDPModule):
        return lambda batch, layout, w: visual_lm_loss(model, batch, layout, w)
    if not hasattr(model, "argrpo_visual_lm_loss"):
        model.argrpo_visual_lm_loss = types.MethodType(
            lambda self, batch, layout, w: visual_lm_loss(self, batch, layout, w), model)
        register_fsdp_forward_method(model, "argrpo_visual_lm_loss")
    return model.argrpo_visual_lm_loss


# ---- trainer ---------------------------------------------------------------------------------------------------
def _trainer_class():
    from transformers import Trainer, TrainerCallback

    class EpochCallback(TrainerCallback):
        """Tells the dataset which epoch starts (caption dropout depends on it)."""

        def __init__(self, dataset):
            self.dataset = dataset

        def on_epoch_begin(self, args, state, control, **kwargs):
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(int(math.floor(state.epoch + 1e-6)))

    class VisualLMTrainer(Trainer):
        """Trainer with the visual-slice loss and policy-format checkpoints."""

        def __init__(self, *args, family, text_loss_weight=0.0, image_tokenizer_ref=None,
                     copy_image_tokenizer=True, **kwargs):
            super().__init__(*args, **kwargs)
            self.family = family
            self.text_loss_weight = float(text_loss_weight)
            self.image_tokenizer_ref = image_tokenizer_ref
            self.copy_image_tokenizer = copy_image_tokenizer
            # compute_loss returns a per-batch mean: Trainer must divide by the accumulation steps itself.
            self.model_accepts_loss_kwargs = False
            self._metric_sums: dict[str, float] = {}
            self._metric_count = 0
            self.add_callback(EpochCallback(self.train_dataset))
            if self.is_fsdp_enabled:
                from argrpo.grpo.sharding import UnshardOutputHead

                self.add_callback(UnshardOutputHead())  # the loss reads lm_head.weight rows without calling lm_head

        def create_accelerator_and_postprocess(self):
            from argrpo.grpo.sharding import enable_fsdp_on_cpu

            super().create_accelerator_and_postprocess()
            enable_fsdp_on_cpu(self)  # accelerate drops an FSDP plugin on CPU (grpo.sharding says why)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # Accelerate applies mixed precision by wrapping model.forward; the visual-slice loss calls the decoder
            # directly, so it enters the accelerator's autocast itself (else bf16: true would train in float32).
            with self.accelerator.autocast():
                loss, metrics = _sharded_loss(model)(inputs, self.family, self.text_loss_weight)
            for k, v in metrics.items():
                self._metric_sums[k] = self._metric_sums.get(k, 0.0) + v
            self._metric_count += 1
            return (loss, None) if return_outputs else loss

        def log(self, logs, start_time=None):
            if self._metric_count and "loss" in logs:
                for k, v in self._metric_sums.items():
                    logs[k] = round(v / self._metric_count, 4)
                self._metric_sums, self._metric_count = {}, 0
            super().log(logs, start_time)

        _staging: Path | None = None

        def _get_output_dir(self, trial):
            return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            """Trainer's checkpoint, written in a temp dir and renamed into place when complete.

            Trainer writes ``checkpoint-N`` in place, file after file, and rotates old ones with a plain recursive
            delete; a kill in either leaves a directory that is neither complete nor absent. Here Trainer writes
            into ``<tmp>/checkpoint-N`` (``_get_output_dir`` points at the temp dir meanwhile), the files move up
            into the temp dir, which ``atomic_dir`` renames to ``checkpoint-N``; old checkpoints beyond
            ``save_total_limit`` are renamed away before they are deleted.
            """
            from argrpo.models.checkpoint import atomic_dir, recover_all, remove_dir
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            run_dir = Path(super()._get_output_dir(trial))
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            if self.args.world_size > 1:
                return self._save_checkpoint_together(model, trial, run_dir, name)
            recover_all(run_dir)  # temp dirs of a save or a deletion that was killed
            with atomic_dir(run_dir / name) as tmp:
                self._staging = tmp
                try:
                    super()._save_checkpoint(model, trial)
                finally:
                    self._staging = None
                written = tmp / name
                for entry in list(written.iterdir()):
                    os.replace(entry, tmp / entry.name)
                written.rmdir()
            limit = self.args.save_total_limit
            if limit:
                for old in complete_checkpoints(run_dir)[:-limit]:
                    remove_dir(old)

        def _save_rng_state(self, output_dir):
            # several processes: straight into the shared temp dir, not into its checkpoint-N subdir, which the
            # main process's save_policy (atomic) may replace after another process wrote its RNG state there
            if self._staging is not None and self.args.world_size > 1:
                output_dir = str(self._staging)
            super()._save_rng_state(output_dir)

        def _save_checkpoint_together(self, model, trial, run_dir: Path, name: str):
            """Several processes: every one writes its part (its RNG state; under FSDP2 its weight and optimizer
            shards) into one temp dir the main process created, which it renames into place once all are done (a
            temp dir per process would each be renamed to ``checkpoint-N`` in turn, keeping one process's part)."""
            from contextlib import nullcontext

            import torch.distributed as dist
            from argrpo.models.checkpoint import atomic_dir, recover_all, remove_dir

            main = self.is_world_process_zero()
            if main:
                recover_all(run_dir)
            with atomic_dir(run_dir / name) if main else nullcontext(None) as tmp:
                box = [str(tmp) if main else None]
                dist.broadcast_object_list(box, src=0)
                self._staging = Path(box[0])
                try:
                    super()._save_checkpoint(model, trial)
                finally:
                    self._staging = None
                dist.barrier()  # every process's shards are on disk
                if main:
                    written = tmp / name
                    for entry in list(written.iterdir()):
                        os.replace(entry, tmp / entry.name)
                    written.rmdir()
            dist.barrier()
            limit = self.args.save_total_limit
            if limit and main:
                for old in complete_checkpoints(run_dir)[:-limit]:
                    remove_dir(old)

        def _save(self, output_dir=None, state_dict=None):
            self.family.save(
                output_dir or self.args.output_dir, self.model, self.processing_class,
                image_tokenizer=self.image_tokenizer_ref, copy_image_tokenizer=self.copy_image_tokenizer,
                extra={"stage_step": int(self.state.global_step)},
            )

    return VisualLMTrainer


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-N`` dirs that a finished save left behind (trainer_state.json, written last, parses), oldest
    first. A save interrupted by a kill lacks it and is skipped."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", p.name)
        if not m or not p.is_dir():
            continue
        try:
            json.loads((p / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if (p / ARGRPO_FILE).is_file() or (p / SHARDED_MODEL_DIR).is_dir():
            out.append((int(m.group(1)), p))
    return [p for _, p in sorted(out)]


def _finished(checkpoint: str | Path, max_steps: int) -> bool:
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"] >= max_steps


def _resume_point(cfg: LMStageConfig) -> str | None:
    r = cfg.train.resume
    if r == "never":
        return None
    if r == "auto":
        done = complete_checkpoints(cfg.output_dir)
        return str(done[-1]) if done else None
    if not (Path(r) / "trainer_state.json").is_file():
        raise FileNotFoundError(f"train.resume: {r} is not a complete Trainer checkpoint (no trainer_state.json)")
    return r


def _publish(output_dir: Path, model, tokenizer, family, image_tokenizer_ref, copy: bool, extra: dict) -> None:
    """Make ``output_dir`` itself a policy checkpoint (in ``family``'s own format) without disturbing the run files
    inside it.

    The policy is written atomically next to it, then moved in entry by entry with argrpo.json last (and the old
    one removed first), so the directory only ever looks like a complete policy when it is one.
    """
    staging = output_dir.parent / f".{output_dir.name}.final-{os.getpid()}"
    family.save(staging, model, tokenizer, image_tokenizer=image_tokenizer_ref, copy_image_tokenizer=copy, extra=extra)
    (output_dir / ARGRPO_FILE).unlink(missing_ok=True)
    entries = sorted(staging.iterdir(), key=lambda p: p.name == ARGRPO_FILE)
    for entry in entries:
        dst = output_dir / entry.name
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        os.replace(entry, dst)
    shutil.rmtree(staging, ignore_errors=True)


# ---- the stage -------------------------------------------------------------------------------------------------
@dataclass
class LMStageResult:
    output_dir: Path
    global_step: int
    train_loss: float | None
    train_seconds: float
    rows: int
    log_history: list = field(default_factory=list)


def _words(captions) -> list[str]:
    return sorted({w for c in captions for w in re.findall(r"\w+|[^\w\s]+", c.lower())})


def build_text_tokenizer_for(cfg: LMStageConfig, captions, special_tokens) -> object:
    """The text tokenizer of a new policy: a given directory, or a word-level one over the data's vocabulary."""
    from argrpo.models.text_tokenizer import build_text_tokenizer, load_text_tokenizer

    if cfg.text_tokenizer:
        return load_text_tokenizer(cfg.text_tokenizer)
    if cfg.data.kind == "shapes":
        from argrpo.data.shapes import ShapesWorld

        words = ShapesWorld(**cfg.data.shapes_world).vocabulary()
    else:
        words = _words(captions["caption"])
    return build_text_tokenizer(words, special_tokens=special_tokens)


def prepare_policy(cfg: LMStageConfig, captions, device="cpu"):
    """(model, text tokenizer, family, image tokenizer, image tokenizer dir) for a stage.

    The family is the checkpoint's ``ModelFamily`` (a new policy's: the shared-vocabulary one). The image tokenizer
    is ``cfg.image_tokenizer``, else the directory the checkpoint references, else the checkpoint's own (Janus's
    and Emu3's VQ-VAE, ``ModelFamily.image_decoder``); its directory is None in that last case.
    """
    from argrpo.models.image_tokenizers import load_image_tokenizer
    from argrpo.models.layout import layout_preset
    from argrpo.models.policy import policy_from_config
    from argrpo.models.visual_init import init_visual_rows

    if cfg.policy.checkpoint is not None:
        model, loaded = policy_from_config(cfg.policy, device=device)
        tokenizer, family, layout = loaded.tokenizer, loaded.family, loaded.layout
        tok_dir = Path(cfg.image_tokenizer) if cfg.image_tokenizer else loaded.image_tokenizer_path
        if tok_dir is not None:
            image_tokenizer = load_image_tokenizer(tok_dir)
        else:
            image_tokenizer = family.image_decoder(model)
            if image_tokenizer is None or not hasattr(image_tokenizer, "encode"):
                raise ValueError(f"{cfg.policy.checkpoint}: the checkpoint neither references nor holds an image "
                                 f"tokenizer that encodes; set image_tokenizer")
        where = tok_dir if tok_dir is not None else f"of checkpoint {cfg.policy.checkpoint}"
        for key, have in (("codebook_size", image_tokenizer.codebook_size), ("grid", tuple(image_tokenizer.grid))):
            if getattr(layout, key) != have:
                raise ValueError(f"image tokenizer {where}: {key} {have} does not match the policy's layout "
                                 f"({getattr(layout, key)})")
        return model, tokenizer, family, image_tokenizer, tok_dir
    tok_dir = Path(cfg.image_tokenizer)
    image_tokenizer = load_image_tokenizer(tok_dir)
    geometry = dict(codebook_size=int(image_tokenizer.codebook_size), grid=tuple(image_tokenizer.grid),
                    image_size=tuple(image_tokenizer.image_size))
    special = layout_preset(cfg.layout, text_vocab_size=0, **geometry).special_tokens
    tokenizer = build_text_tokenizer_for(cfg, captions, special)
    layout = layout_preset(cfg.layout, text_vocab_size=len(tokenizer), **geometry)
    model, _ = policy_from_config(cfg.policy, layout=layout, device=device)
    base = unwrap_model(model)
    init_visual_rows(base, layout, image_tokenizer, cfg.policy.visual_init, seed=cfg.policy.seed)
    for conf in (base.config, getattr(base, "generation_config", None)):
        if conf is not None:  # the new text tokenizer's pad id, so Trainer has nothing to "align"
            conf.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, family_for_layout(layout), image_tokenizer, tok_dir


def run_lm_stage(cfg: LMStageConfig, callbacks=(), prepared=None) -> LMStageResult:
    """Build everything ``cfg`` names, train, and leave a policy checkpoint in ``cfg.output_dir``.

    ``prepared``: optional ``(model, tokenizer, layout, image_tokenizer, image_tokenizer_dir)`` to train instead of
    building them from the config (library use and tests). ``callbacks``: extra ``TrainerCallback``s.
    """
    from argrpo.data.captions import load_caption_dataset
    from argrpo.data.token_cache import build_token_cache
    from argrpo.models.runtime import resolve_bf16, resolve_device, seed_everything, set_threads
    from argrpo.models.visual_head import visual_head_callbacks
    from transformers import TrainingArguments

    set_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    output_dir = Path(cfg.output_dir).absolute()
    output_dir.mkdir(parents=True, exist_ok=True)

    captions = load_caption_dataset(cfg.data)
    model, tokenizer, family, image_tokenizer, tok_dir = prepared or prepare_policy(cfg, captions, device=device)
    tok_ref = str(tok_dir.absolute()) if tok_dir is not None else None  # None: the checkpoint holds its own
    from accelerate import PartialState

    # several processes share cache_dir: the main one writes the cache, the others then read it. On CPU accelerate
    # sees the processes only when told (cpu=True); else main_process_first is no barrier and all of them write.
    with PartialState(cpu=device.type == "cpu").main_process_first():
        cached = build_token_cache(captions, image_tokenizer, cfg.cache_dir, batch_size=cfg.encode_batch_size)
    dataset = CodesDataset(cached, tokenizer, family, cfg.caption_dropout, seed=cfg.train.seed)
    if len(dataset) < cfg.train.batch_size:
        raise ValueError(f"{len(dataset)} training rows < train.batch_size {cfg.train.batch_size} (the last "
                         f"incomplete batch of an epoch is dropped)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    t = cfg.train
    # the train section's keys that are TrainingArguments' own, under the same names
    same = ("max_steps", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_steps", "optim",
            "weight_decay", "adam_beta2", "max_grad_norm", "save_steps", "save_total_limit", "logging_steps")
    args = TrainingArguments(
        output_dir=str(output_dir),
        **{name: getattr(t, name) for name in same},
        bf16=resolve_bf16(t.bf16, device),
        per_device_train_batch_size=t.batch_size,
        use_cpu=device.type == "cpu",
        seed=t.seed,
        data_seed=t.seed,
        save_strategy="steps",
        report_to=list(t.report_to) or "none",
        dataloader_drop_last=True,
        remove_unused_columns=False,
        label_names=["image_codes"],
        **t.trainer_args,
        **training_arguments(cfg.distributed),
    )
    set_plugin_precision(args, cfg.distributed)
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=dataset, data_collator=CodesCollator(family, pad),
        processing_class=tokenizer,
        callbacks=[*callbacks, *visual_head_callbacks(cfg.visual_head, model, family.layout, image_tokenizer)],
        family=family, text_loss_weight=cfg.text_loss_weight, image_tokenizer_ref=tok_ref,
        copy_image_tokenizer=cfg.copy_image_tokenizer,
    )
    resume = _resume_point(cfg)
    t0 = time.perf_counter()
    if resume is not None and _finished(resume, t.max_steps):
        # Nothing left to train. Trainer would still take one step past max_steps from a checkpoint that already
        # has them all (its stop check runs after a step), so the checkpoint's weights are taken as they are.
        from argrpo.models.policy import load_policy
        from transformers import TrainerState

        trainer.model.load_state_dict(load_policy(resume, device=str(device)).model.state_dict())
        trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
        out = None
    else:
        out = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - t0
    from argrpo.grpo.sharding import consolidated_model

    model = consolidated_model(trainer.model)  # under FSDP2 a collective: the main process gets the full weights
    if trainer.is_world_process_zero():  # replicas hold the same weights; FSDP2 gathered them here
        _publish(output_dir, model, tokenizer, family, tok_ref, cfg.copy_image_tokenizer,
                 extra={"stage_step": int(trainer.state.global_step)})
    trainer.accelerator.wait_for_everyone()  # the next stage may load output_dir on any process
    return LMStageResult(
        output_dir=output_dir, global_step=int(trainer.state.global_step),
        train_loss=getattr(out, "training_loss", None), train_seconds=seconds, rows=len(dataset),
        log_history=list(trainer.state.log_history),
    )
