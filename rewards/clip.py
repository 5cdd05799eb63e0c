"""CLIPScore with open_clip, and the open_clip loading shared by the CLIP-based rewards.

``model`` is an open_clip model name (``ViT-L-14``, ``ViT-H-14``, ...) or a name for ``model_cfg``, a config dict in
open_clip's JSON format (``embed_dim``, ``vision_cfg``, ``text_cfg``) registered with ``open_clip.add_model_config``.
``pretrained`` is an open_clip pretrained tag (``openai``, ``laion2b_s32b_b82k``; open_clip fetches it on first use) or
a local checkpoint: ``.safetensors``, or a torch file read with ``weights_only=True`` (optionally under a
``state_dict`` key, with or without DataParallel's ``module.`` prefix).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from argrpo.rewards.base import Reward, register_reward, to_pil

_CFG_DIR: str | None = None
_CFG_LOCK = threading.Lock()


def register_open_clip_config(name: str, cfg: Mapping[str, Any]) -> str:
    """Make ``cfg`` available to open_clip as model ``name`` (a JSON file handed to ``open_clip.add_model_config``)."""
    import open_clip

    global _CFG_DIR
    with _CFG_LOCK:
        if _CFG_DIR is None:
            # open_clip re-reads every registered file on each registration, so the files must outlive this call;
            # they go when the process exits.
            _CFG_DIR = tempfile.mkdtemp(prefix="argrpo-open-clip-")
            atexit.register(shutil.rmtree, _CFG_DIR, ignore_errors=True)
        path = Path(_CFG_DIR) / f"{name}.json"
        path.write_text(json.dumps(dict(cfg)))
        open_clip.add_model_config(str(path))
    return name


def load_state_dict_file(path: str | os.PathLike) -> dict:
    """A weights file -> a flat state dict: safetensors, or torch.load with weights_only=True (never unpickling code)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"checkpoint {str(path)!r}: cannot be read with weights_only=True ({e}); "
                             f"convert it to safetensors") from e
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ValueError(f"checkpoint {str(path)!r}: expected a state dict, got {type(sd).__name__}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def resolve_dtype(dtype: Any):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


class _quiet_random_init:
    """Hide open_clip's "initialized randomly" warning: a local checkpoint is loaded right after."""

    def __enter__(self):
        import logging

        self.filter = lambda record: "initialized randomly" not in record.getMessage()
        logging.getLogger().addFilter(self.filter)

    def __exit__(self, *exc):
        import logging

        logging.getLogger().removeFilter(self.filter)


def _device(device: str):
    from argrpo.models.runtime import resolve_device

    return resolve_device(device)


class OpenClip:
    """An open_clip model with its own eval preprocessing and tokenizer, batched and gradient-free.

    ``image_features(images)``: B uint8 ``[H, W, 3]`` -> ``[B, D]``; ``text_features(texts)``: B strings ->
    ``[B, D]``. Both L2-normalised float32 on CPU.
    """

    def __init__(self, model: str = "ViT-L-14", pretrained: str | None = "openai", model_cfg: Mapping | None = None,
                 device: str = "auto", dtype: Any = "float32", batch_size: int = 32):
        import open_clip
        import torch

        if model_cfg is not None:
            register_open_clip_config(model, model_cfg)
        self.device = _device(device)
        self.dtype = resolve_dtype(dtype)
        self.batch_size = int(batch_size)
        local = pretrained is not None and (os.path.sep in str(pretrained) or Path(str(pretrained)).is_file())
        try:
            with _quiet_random_init():
                net, _, preprocess = open_clip.create_model_and_transforms(
                    model, pretrained=None if local else pretrained, device="cpu")
        except RuntimeError as e:
            raise ValueError(f"open_clip model {model!r} with pretrained={pretrained!r}: {e}") from e
        if local:
            sd = load_state_dict_file(pretrained)
            missing, unexpected = net.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise ValueError(f"checkpoint {pretrained!r} does not fit open_clip model {model!r}: "
                                 f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        self.model = net.to(self.device, self.dtype).eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model)
        self._torch = torch

    def pixel_values(self, images: Sequence[np.ndarray]):
        """B uint8 ``[H, W, 3]`` -> ``[B, 3, S, S]`` through open_clip's eval transform."""
        return self._torch.stack([self.preprocess(im) for im in to_pil(images)])

    def image_features(self, images: Sequence[np.ndarray]):
        torch = self._torch
        out = []
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                px = self.pixel_values(images[i:i + self.batch_size]).to(self.device, self.dtype)
                out.append(self.model.encode_image(px).float())
        feats = torch.cat(out) if out else torch.zeros(0)
        return torch.nn.functional.normalize(feats, dim=-1).cpu()

    def text_features(self, texts: Sequence[str]):
        torch = self._torch
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(list(texts[i:i + self.batch_size])).to(self.device)
                out.append(self.model.encode_text(tokens).float())
        feats = torch.cat(out) if out else torch.zeros(0)
        return torch.nn.functional.normalize(feats, dim=-1).cpu()


@register_reward("clip")
class ClipScore(Reward):
    """CLIPScore: ``w * max(cos(image, text), 0)`` (Hessel et al. 2021, w = 2.5), or the raw cosine.

    ``prompt_template`` formats each prompt before encoding (``"{}"`` keeps it). Extras: ``cosine``.
    """

    name = "clip"

    def __init__(self, model: str = "ViT-L-14", pretrained: str | None = "openai", model_cfg: Mapping | None = None,
                 device: str = "auto", dtype: Any = "float32", batch_size: int = 32, mode: str = "clipscore",
                 w: float = 2.5, prompt_template: str = "{}", name: str | None = None):
        super().__init__(name)
        if mode not in ("clipscore", "cosine"):
            raise ValueError(f"clip reward mode must be 'clipscore' or 'cosine', got {mode!r}")
        self.mode, self.w, self.prompt_template = mode, float(w), prompt_template
        self.clip = OpenClip(model, pretrained, model_cfg, device, dtype, batch_size)

    def score(self, prompts, images, **metadata):
        from argrpo.rewards.base import RewardOutput

        img = self.clip.image_features(images)  # [B, D]
        txt = self.clip.text_features([self.prompt_template.format(p) for p in prompts])  # [B, D]
        cos = (img * txt).sum(-1)
        scores = cos if self.mode == "cosine" else self.w * cos.clamp(min=0)
        return RewardOutput(scores.tolist(), {"cosine": cos.tolist()})
