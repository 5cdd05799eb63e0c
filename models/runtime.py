"""Process-level runtime settings: threads, seeds, devices."""

from __future__ import annotations

import os
import random

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
