"""Shared fixtures: tiny models are built here, never downloaded."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(max(1, min(2, len(os.sched_getaffinity(0)))))
    yield


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster on CPU, shared by the tests that need one."""
    from argrpo.cluster import init_ray, shutdown_ray

    init_ray(num_cpus=4)
    yield
    shutdown_ray()


@pytest.fixture(scope="session")
def vq_dir(tmp_path_factory):
    """The shapes world's factorised VQ tokenizer, fitted on 200 training renders (tests only read it)."""
    from argrpo.data.shapes import ShapesWorld
    from argrpo.models.image_tokenizers.vq import VQTokenizer

    _, images, _ = ShapesWorld().sample("train", 200, seed=7)
    path = tmp_path_factory.mktemp("vq")
    VQTokenizer.fit(images).save_pretrained(path)
    return path
