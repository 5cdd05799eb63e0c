"""Learner -> rollout workers: versioned weight pushes, and the picklable recipe workers build their policy from.

After every optimizer step the rollout engines must sample from the new weights. Full fine-tuning sends the whole
state dict (``lm_head.weight`` included even when tied: vLLM keeps a separate copy); LoRA sends only the adapter
tensors (``get_peft_model_state_dict``), which the workers load into their own LoRA-wrapped copy of the base.
The version is the learner's optimizer step count, so a rollout's ``weight_version`` tells how stale it is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from argrpo.models.unwrap import unwrap_model


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(unwrap_model(model, keep_peft=True), PeftModel)


def sync_state(model) -> tuple[dict[str, torch.Tensor], bool]:
    """(tensors to send, adapter?) for the learner ``model``.

    Full: the base model's state dict ``{name: [..]}`` with every key the engine's model has (tied ones too).
    LoRA: the trained adapter's tensors only (peft names without the adapter name), a few MB instead of GBs.
    Tensors are detached CPU tensors; on CPU they share storage with the learner (receivers copy them).
    Under FSDP2 every process must call this together: the shards are gathered parameter by parameter
    (:func:`gathered`), and every process gets the full tensors (each feeds its own rollout pool).
    """
    model = unwrap_model(model, keep_peft=True)
    if is_peft(model):
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, adapter_name="default")
        adapter = True
    else:
        state = model.state_dict(keep_vars=False)
        adapter = False
    return {k: gathered(v).to("cpu") for k, v in state.items()}, adapter


def gathered(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of one parameter: a plain tensor as it is (detached), an FSDP2 shard (``DTensor``) gathered
    from every process (a collective: every process calls it for the same parameters in the same order).

    Under FSDP2 ``model.state_dict()`` holds shards, and :func:`sync_state` gathers them one parameter at a time and
    moves each to CPU at once, so the learner's device holds its shards plus one gathered parameter, never a second
    full copy. A shard offloaded to CPU goes through the accelerator the process group reduces on (NCCL has no CPU
    tensors).
    """
    from torch.distributed.tensor import DTensor

    t = t.detach()
    if not isinstance(t, DTensor):
        return t
    import torch.distributed as dist

    if t.device.type == "cpu" and dist.get_backend() == "nccl":
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    return t.full_tensor()


class WeightSync:
    """Pushes the learner's weights to a rollout pool when the pool's version is behind.

    ``ensure(model, version)`` is idempotent: it sends only when ``version`` differs from the last one sent, so it
    can be called before every rollout. ``seconds`` accumulates the time spent sending (for the step time split).
    """

    def __init__(self, pool):
        self.pool = pool
        self.version: int | None = None  # unknown until the first push: the workers may hold older weights
        self.seconds = 0.0
        self.pushes = 0
        self.bytes = 0

    def push(self, model, version: int) -> None:
        t0 = time.perf_counter()
        state, adapter = sync_state(model)
        self.pool.load_weights(state, int(version), adapter=adapter)
        self.version = int(version)
        self.pushes += 1
        self.bytes = sum(t.numel() * t.element_size() for t in state.values())
        self.seconds += time.perf_counter() - t0

    def ensure(self, model, version: int) -> bool:
        """Push unless the pool already holds ``version``; returns whether weights were sent."""
        if self.version == int(version):
            return False
        self.push(model, version)
        return True

    def take_seconds(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s


@dataclass(frozen=True)
class WorkerPolicy:
    """What a rollout worker builds its policy from; picklable, so Ray can rebuild a crashed worker from it.

    checkpoint: the run's starting policy (its weights are replaced by the first push); layout: as for
    ``load_policy`` (e.g. "simplear" for a released checkpoint without argrpo.json); lora: the learner's
    ``LoraSettings`` when it trains a fresh adapter (the worker wraps its copy the same way, so adapter tensors
    load by name), else None; dtype: weights dtype; layout_kwargs: the run's ``policy.layout_options`` (how a
    checkpoint without argrpo.json lays out its image: Emu3's grid, the extended family's visual ids).
    """

    checkpoint: str
    layout: str | None = None
    lora: object | None = None
    dtype: str | None = None
    device: str = "cpu"
    layout_kwargs: dict | None = None

    def __call__(self):
        from argrpo.models.policy import load_policy
        from argrpo.rollout.worker import PolicyComponents

        loaded = load_policy(self.checkpoint, layout=self.layout, device=self.device, dtype=self.dtype,
                             layout_kwargs=self.layout_kwargs)
        model = loaded.family.rollout_model(loaded.model)
        if self.lora is not None:
            from argrpo.models.policy import apply_lora

            model = apply_lora(model, r=self.lora.r, alpha=self.lora.alpha, dropout=self.lora.dropout,
                               target_modules=self.lora.target_modules, family=loaded.family)
        model.eval()
        return PolicyComponents(model, loaded.layout, loaded.tokenizer, loaded.image_decoder(), family=loaded.family)


def worker_policy(checkpoint: str, engine: str, layout: str | None = None, lora=None, dtype: str | None = None,
                  layout_kwargs: dict | None = None):
    """The ``policy`` argument of the rollout pool: engines that read a checkpoint directory themselves (vLLM)
    get its path; the others a :class:`WorkerPolicy`."""
    from argrpo.rollout.engines import get_engine
    from argrpo.rollout.worker import _loads_checkpoint

    if _loads_checkpoint(get_engine(engine)):
        return str(checkpoint)
    return WorkerPolicy(str(checkpoint), layout=layout, lora=lora, dtype=dtype, layout_kwargs=layout_kwargs or None)
