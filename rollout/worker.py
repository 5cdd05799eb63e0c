"""A rollout worker: one engine plus the image tokenizer's decoder, turning captions into decoded images.

The same class runs in-process (``LocalRolloutPool``) or as a Ray actor (``RolloutPool`` wraps it with
``ray.remote``). A worker must be rebuildable from its constructor arguments alone (Ray re-runs the constructor
after a crash), so it takes either a checkpoint directory or a picklable :class:`PolicyComponents` (or a
zero-argument callable returning one); weights loaded later are the pool's job to re-send.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from argrpo.models.families import family_for_layout
from argrpo.models.layout import TokenLayout
from argrpo.rollout.engines import get_engine
from argrpo.rollout.types import Rollout, SamplingParams


@dataclass
class PolicyComponents:
    """What a worker needs, given as objects (tests, notebooks) instead of a checkpoint directory.

    model: HF causal LM or PeftModel; layout: its TokenLayout; tokenizer: text tokenizer (needed for string
    prompts and CFG); image_tokenizer: has ``decode(codes [B, h, w]) -> uint8 [B, H, W, 3]`` (None: no images);
    uncond_prompt_ids: the unconditional prompt's ids when there is no tokenizer; family: the model's
    ``models.families.ModelFamily`` (None: the shared-vocabulary family of ``layout``).
    """

    model: Any
    layout: TokenLayout
    tokenizer: Any = None
    image_tokenizer: Any = None
    uncond_prompt_ids: list[int] | None = None
    family: Any = None


def load_components(
    checkpoint: str | Path, device: str = "cpu", dtype: str | None = None, with_model: bool = True
) -> PolicyComponents:
    """A policy checkpoint directory (``models.policy.save_policy``) -> PolicyComponents with its image tokenizer.

    ``with_model=False`` reads only the layout, text tokenizer and image tokenizer (model=None).
    """
    from argrpo.models.image_tokenizers import load_image_tokenizer

    if with_model:
        from argrpo.models.policy import load_policy

        loaded = load_policy(checkpoint, device=device, dtype=dtype)
        return PolicyComponents(loaded.family.rollout_model(loaded.model), loaded.layout, loaded.tokenizer,
                                loaded.image_decoder(), family=loaded.family)
    else:
        from argrpo.models.policy import read_policy_meta
        from argrpo.models.text_tokenizer import load_text_tokenizer

        meta = read_policy_meta(checkpoint)
        if meta is None:
            raise ValueError(f"{checkpoint}: no argrpo.json; this engine needs an argrpo checkpoint directory")
        from argrpo.models.families import check_engine, detect_family

        # engines that read the directory themselves are vLLM's kind: refuse a family it cannot generate
        check_engine(detect_family(checkpoint, meta), "vllm")
        model, layout = None, TokenLayout.from_dict(meta["layout"])
        tokenizer = load_text_tokenizer(checkpoint)
        ref = meta.get("image_tokenizer")
        tok_path = None if not ref else (Path(ref) if Path(ref).is_absolute() else Path(checkpoint) / ref)
    image_tokenizer = load_image_tokenizer(tok_path) if tok_path is not None else None
    return PolicyComponents(model, layout, tokenizer, image_tokenizer)


def _loads_checkpoint(engine_cls) -> bool:
    """Whether an engine is built from a checkpoint directory rather than a model object.

    An engine says so with a ``loads_checkpoint`` class attribute; otherwise a constructor whose first argument
    is named ``checkpoint`` does.
    """
    flag = getattr(engine_cls, "loads_checkpoint", None)
    if flag is not None:
        return bool(flag)
    params = list(inspect.signature(engine_cls.__init__).parameters)
    return len(params) > 1 and params[1] == "checkpoint"


def engine_loads_checkpoint(engine: str) -> bool:
    """Whether the registered engine ``engine`` reads a checkpoint directory itself (vLLM): a caller then hands the
    worker the directory, not a model it built."""
    return _loads_checkpoint(get_engine(engine))


class RolloutWorker:
    """Holds an engine and a decoder.

    Args:
        policy: checkpoint directory, PolicyComponents, or a zero-argument callable returning PolicyComponents.
        engine: name in the ENGINES registry ("torch", "vllm").
        device: where the engine runs.
        engine_kwargs: extra engine constructor arguments (e.g. ``max_batch_rows``).
        num_threads: torch intra-op threads (None: leave the process's setting alone; the Ray pool passes its
            ``num_cpus_per_worker``).
        dtype: weights dtype when loading a checkpoint (None keeps the checkpoint's).
    """

    def __init__(
        self,
        policy: str | Path | PolicyComponents | Callable[[], PolicyComponents],
        engine: str = "torch",
        device: str = "cpu",
        engine_kwargs: dict | None = None,
        num_threads: int | None = None,
        dtype: str | None = None,
    ):
        if num_threads is not None:
            from argrpo.models.runtime import set_threads

            set_threads(num_threads)
        engine_cls = get_engine(engine)
        kwargs = dict(engine_kwargs or {})
        if _loads_checkpoint(engine_cls):
            # engines that read weights themselves (vLLM) get the directory; no model is built here
            if not isinstance(policy, (str, Path)):
                raise ValueError(f"rollout engine {engine!r} loads a checkpoint directory; pass its path as policy")
            comps = load_components(policy, device=device, dtype=dtype, with_model=False)
            self.engine = engine_cls(str(policy), comps.layout, **kwargs)
        else:
            if isinstance(policy, (str, Path)):
                comps = load_components(policy, device=device, dtype=dtype)
            elif isinstance(policy, PolicyComponents):
                comps = policy
            elif callable(policy):
                comps = policy()
            else:
                raise TypeError(
                    f"policy must be a checkpoint path, PolicyComponents or a callable, got {type(policy)}"
                )
            if comps.uncond_prompt_ids is not None:
                kwargs.setdefault("uncond_prompt_ids", comps.uncond_prompt_ids)
            if not isinstance(policy, PolicyComponents) and "column_major_weights" in inspect.signature(
                    engine_cls.__init__).parameters:
                kwargs.setdefault("column_major_weights", True)  # this worker built the model: nothing else trains it
            if comps.family is not None and "family" in inspect.signature(engine_cls.__init__).parameters:
                kwargs.setdefault("family", comps.family)
            self.engine = engine_cls(comps.model, comps.layout, device=device, tokenizer=comps.tokenizer, **kwargs)
        self.layout = comps.layout
        self.family = comps.family if comps.family is not None else family_for_layout(comps.layout)
        self.tokenizer = comps.tokenizer
        self.image_tokenizer = comps.image_tokenizer
        if self.image_tokenizer is not None:
            # its codebook and grid must be the layout's, or decoding fails (or scrambles) every image
            where = getattr(self.image_tokenizer, "path", None) or type(self.image_tokenizer).__name__
            self.layout.check_image_tokenizer(self.image_tokenizer, what=f"image tokenizer {where}")

    def generate(self, prompts: list[str] | list[list[int]], sampling: SamplingParams, decode: bool = True) -> Rollout:
        """P captions (or prompt token ids) -> Rollout of ``P * sampling.n`` rows with images uint8 [B, H, W, 3].

        timings: 'generate' (sampling) and 'decode' (codes -> pixels) seconds.
        """
        prompt_ids = self._encode(prompts)
        out = self.engine.generate(prompt_ids, sampling)
        t0 = time.perf_counter()
        if decode and self.image_tokenizer is not None:
            out.images = self.decode(out.completion_ids)
        out.timings["decode"] = time.perf_counter() - t0
        return out

    def decode(self, completion_ids: torch.Tensor) -> np.ndarray:
        """Completion ids int64 [B, T] (visual ids and any forced tokens) -> uint8 [B, H, W, 3]."""
        codes = self.family.completion_codes(completion_ids)
        with torch.inference_mode():
            images = self.image_tokenizer.decode(codes)
        images = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"image tokenizer decode returned {images.dtype} {images.shape}, expected uint8 [B,H,W,3]")
        return images

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int, adapter: bool = False) -> int:
        """Full state dict or LoRA adapter tensors; returns the new weight version."""
        self.engine.load_weights(state_dict, version, adapter=adapter)
        return self.engine.weight_version

    def weight_version(self) -> int:
        return self.engine.weight_version

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str | None:
        """The Ray node this worker runs on (hex id), or None outside Ray."""
        import sys

        ray = sys.modules.get("ray")  # an in-process worker must not start Ray by asking
        if ray is None or not ray.is_initialized():
            return None
        return ray.get_runtime_context().get_node_id()

    def info(self) -> dict:
        """Where and how this worker runs (process, threads, device, weights), for logs and checks."""
        return {"pid": os.getpid(), "torch_threads": torch.get_num_threads(),
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                "mkl_num_threads": os.environ.get("MKL_NUM_THREADS"), "node_id": self.node_id(), "engine": type(self.engine).__name__,
                "device": str(getattr(self.engine, "device", "")), "weight_version": self.weight_version()}

    def _encode(self, prompts) -> list[list[int]]:
        if not prompts:
            raise ValueError("no prompts given")
        if all(isinstance(p, str) for p in prompts):
            if self.tokenizer is None:
                raise ValueError("string prompts need a text tokenizer; pass token ids or a tokenizer")
            return self.family.encode_prompts(self.tokenizer, list(prompts))
        if any(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be all captions (str) or all token-id lists")
        return [list(p) for p in prompts]
