"""Process-level runtime settings: threads, seeds, devices."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


def set_threads(n: int | None = None) -> int:
    """Size torch's intra-op pool to the cores this process really has.

    Oversubscribed OpenMP pools stall small-op work badly on small machines (measured 10-40x), so default to
    ``OMP_NUM_THREADS`` when set (Ray sets 1 inside actors), else the affinity mask.
    """
    if n is None:
        env = os.environ.get("OMP_NUM_THREADS")
        n = int(env) if env else len(os.sched_getaffinity(0))
    n = max(1, int(n))
    torch.set_num_threads(n)
    return n


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# CPU features with native bfloat16 matmuls; without them oneDNN emulates bf16 in software
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags of this CPU (empty where /proc/cpuinfo is not readable)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def bf16_is_fast(device: torch.device | str) -> bool:
    """Whether bfloat16 autocast speeds ``device`` up rather than slowing it down.

    A CUDA device that supports bf16, or a CPU with AVX512-BF16 or AMX. Elsewhere (an AVX2-only CPU) bf16 matmuls
    are emulated: a GRPO step was measured 18x slower than in float32 (bench/NOTES.md).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(NATIVE_BF16_CPU_FLAGS & cpu_flags())
    return False


def resolve_bf16(value: bool | str, device: torch.device | str) -> bool:
    """A config's ``bf16`` setting (true, false or "auto") for ``device``; auto is :func:`bf16_is_fast`."""
    return bf16_is_fast(device) if value == "auto" else bool(value)
