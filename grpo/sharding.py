"""The learner's data-parallel strategy: DDP (a full replica per process) or FSDP2 (parameters, gradients and
optimizer state sharded over the processes), for GRPO, pretrain and SFT alike.

Both run on accelerate as transformers' ``Trainer`` drives it: ``fsdp`` / ``fsdp_config`` in the training
arguments become accelerate's ``FullyShardedDataParallelPlugin(fsdp_version=2)``, whose ``fsdp2_prepare_model``
applies torch's ``fully_shard`` to every decoder layer (the model's ``_no_split_modules``) and then to the model.

One gap is bridged here, and only on CPU: accelerate 1.16 turns a passed FSDP plugin into
``DistributedType.FSDP`` only for accelerator devices (``AcceleratorState.__init__`` checks it inside the
multi-GPU/-XPU/-NPU branch); a ``MULTI_CPU`` run silently drops the plugin and trains DDP. torch's ``fully_shard``
itself runs on CPU over gloo (forward, backward, an AdamW step and the full-state-dict gather were measured), so
:func:`enable_fsdp_on_cpu` completes what accelerate would have done on a GPU (set the distributed type, keep the
plugin, apply the trainer's mixed precision) right after the trainer creates its accelerator, before anything is
prepared. On GPUs nothing is changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import TrainerCallback

STRATEGIES = ("ddp", "fsdp")


@dataclass
class FSDPSettings:
    """FSDP2 options (used with ``strategy: fsdp``); accelerate's ``FullyShardedDataParallelPlugin`` names."""

    reshard_after_forward: bool = field(
        default=True,
        metadata={"help": "free each layer's gathered parameters after its forward and gather them again for the "
                          "backward (ZeRO-3); false keeps them until the backward (ZeRO-2 like: more memory, "
                          "fewer all-gathers)"})
    mixed_precision: Literal["no", "bf16"] = field(
        default="no",
        metadata={"help": "bf16: layers compute with bfloat16 copies of the float32 shards, gradients are reduced in "
                          "float32 (FSDP2 MixedPrecisionPolicy); no: compute in the weights' dtype"})
    cpu_offload: bool = field(
        default=False, metadata={"help": "keep parameter shards, gradients and optimizer state in CPU memory "
                                         "(FSDP2 CPUOffloadPolicy; GPU runs only, the optimizer steps on CPU)"})
    activation_checkpointing: bool = field(
        default=False, metadata={"help": "recompute each decoder layer's activations in the backward pass"})
    wrap: list[str] = field(
        default_factory=list,
        metadata={"help": "module class names sharded one by one (default: the model's _no_split_modules, e.g. "
                          "Qwen2DecoderLayer); the rest (embeddings, final norm, head) is sharded with the root"})


@dataclass
class DistributedConfig:
    """How several learner processes (``torch.distributed.run`` / ``accelerate launch``) share the model."""

    strategy: Literal["ddp", "fsdp"] = field(
        default="ddp", metadata={"help": "ddp: a full replica per process; fsdp: FSDP2 sharding (see fsdp.*)"})
    fsdp: FSDPSettings = field(default_factory=FSDPSettings, metadata={"help": "FSDP2 options"})

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"distributed.strategy: unknown {self.strategy!r}; use one of {list(STRATEGIES)}")
        if self.fsdp.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"distributed.fsdp.mixed_precision: unknown {self.fsdp.mixed_precision!r}; use no or "
                             f"bf16")


def training_arguments(cfg: DistributedConfig) -> dict:
    """The ``TrainingArguments`` / ``GRPOConfig`` keywords of a strategy: ``{}`` for DDP (accelerate's default for
    several processes), ``fsdp`` + ``fsdp_config`` for FSDP2."""
    if cfg.strategy != "fsdp":
        return {}
    f = cfg.fsdp
    fsdp_config = {"version": 2, "reshard_after_forward": f.reshard_after_forward, "cpu_offload": f.cpu_offload,
                   "activation_checkpointing": f.activation_checkpointing,
                   # a consolidated state dict is gathered where one is needed (final/, export, weight push);
                   # resumable checkpoints are written sharded by argrpo itself
                   "state_dict_type": "SHARDED_STATE_DICT"}
    if f.wrap:
        fsdp_config["transformer_layer_cls_to_wrap"] = list(f.wrap)
    return {"fsdp": True, "fsdp_config": fsdp_config}


def set_plugin_precision(args, cfg: DistributedConfig) -> None:
    """Put the FSDP2 mixed-precision policy into ``args.fsdp_plugin_args`` (``TrainingArguments`` has no key for
    it; the plugin takes it as ``mixed_precision_policy``)."""
    if cfg.strategy == "fsdp" and cfg.fsdp.mixed_precision == "bf16" and args.fsdp_plugin_args is not None:
        args.fsdp_plugin_args["mixed_precision_policy"] = {"param_dtype": torch.bfloat16,
                                                           "reduce_dtype": torch.float32}


def enable_fsdp_on_cpu(trainer) -> None:
    """After ``Trainer.create_accelerator_and_postprocess``: where accelerate dropped the FSDP plugin because the
    processes run on CPU (``MULTI_CPU``), switch the accelerator to FSDP with that plugin, as accelerate does for
    GPUs. Does nothing when no FSDP was asked for, or when accelerate already took it."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin_args = getattr(trainer.args, "fsdp_plugin_args", None)
    state = trainer.accelerator.state
    if plugin_args is None or state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    if state.mixed_precision != "no" and plugin.mixed_precision_policy is None:
        plugin.set_mixed_precision(state.mixed_precision)
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    trainer.is_fsdp_enabled = True
    if plugin.activation_checkpointing and trainer.args.gradient_checkpointing:
        raise ValueError("distributed.fsdp.activation_checkpointing and gradient_checkpointing are the same thing; "
                         "set one of them")


def is_fsdp(model) -> bool:
    """Whether ``model`` (or the module under a peft wrapper) was sharded by ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The consolidated state dict of an FSDP2 ``model``, gathered tensor by tensor onto rank 0's CPU (torch's
    ``get_model_state_dict`` with ``full_state_dict`` + ``cpu_offload``): a collective, every process calls it;
    rank 0 gets ``{name: full CPU tensor}``, the others ``{}``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _unsharded_class(module) -> type:
    """The class ``fully_shard`` subclassed (it swaps ``module.__class__`` for ``FSDP<cls>``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def consolidated_model(model):
    """An unsharded CPU copy of an FSDP2 ``model`` (a Hugging Face model, or a peft model around one) holding the
    full weights, for ``save_policy``: a collective (see :func:`full_state_dict`); rank 0 gets the copy, the other
    processes None. A model that is not sharded is returned as it is on every process."""
    if not is_fsdp(model):
        return model
    import copy

    import torch.distributed as dist

    state = full_state_dict(model)
    if dist.get_rank() != 0:
        return None
    peft_config = getattr(model, "peft_config", None)
    base = model.get_base_model() if peft_config is not None else model
    dtype = next(iter(state.values())).dtype if state else torch.float32
    config = copy.deepcopy(base.config)
    fresh = _unsharded_class(base)(config).to(dtype)
    fresh.name_or_path = base.name_or_path
    if peft_config is not None:
        from peft import get_peft_model

        fresh = get_peft_model(fresh, copy.deepcopy(peft_config["default"]))
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(config, "tie_word_embeddings", False) \
        else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"consolidating {type(base).__name__}: missing {sorted(set(missing) - tied)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    return fresh.eval()


def unshard_output_head(model) -> bool:
    """Keep a separately sharded output embedding gathered for forwards that read its weight without calling it.

    argrpo's visual heads multiply hidden states with rows of ``lm_head.weight`` (grpo.logprobs, the pretrain/SFT
    loss) and never call ``lm_head`` itself, so its FSDP2 hooks never gather it. accelerate shards the LM head in
    one "tail" unit with the final norm (gathered when the norm runs, kept until the backward: the unit does not
    reshard after forward), but it finds the norm by ``base_model_prefix``, which a peft model hides; the head then
    forms a unit alone. For that case this registers a forward pre-hook on the root that gathers the head
    (``FSDPModule.unshard``); FSDP2's end-of-backward callback reduce-scatters its gradient (if any) and reshards it,
    as for any unit whose forward did not run. Returns whether a hook was registered.
    """
    from torch.distributed.fsdp import FSDPModule

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, FSDPModule) or getattr(model, "_argrpo_head_unshard", False):
        return False
    group = head._get_fsdp_state()._fsdp_param_groups
    others = {id(m) for g in group for m in g.modules} - {id(head)}
    if others:  # shares its unit with the final norm (or the tied embedding): gathered when those run
        return False
    model.register_forward_pre_hook(lambda module, args: head.unshard())
    model._argrpo_head_unshard = True
    return True


class UnshardOutputHead(TrainerCallback):
    """Applies :func:`unshard_output_head` once the trainer has sharded its model (at the start of training)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and is_fsdp(model):
            unshard_output_head(model)
