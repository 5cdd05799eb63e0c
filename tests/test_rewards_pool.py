"""The Ray reward pool on a local CPU cluster: same numbers as in-process, concurrency, restarts, errors."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from argrpo.rewards.base import CompositeReward, RewardError, RewardSpec
from argrpo.rewards.pool import RewardPool, RewardPoolConfig

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

PLUGIN = """
    import os, time
    import numpy as np

    def brightness(prompts, images, **metadata):
        return [float(np.asarray(im).mean()) / 255 for im in images]

    def wait_for_peer(prompts, images, me, peer, folder, **metadata):
        # both rewards must be running at once: each waits for the other's flag
        open(os.path.join(folder, me), "w").close()
        deadline = time.time() + 60
        while not os.path.exists(os.path.join(folder, peer)):
            if time.time() > deadline:
                raise TimeoutError(f"{peer} never ran while {me} was running")
            time.sleep(0.01)
        return [1.0] * len(prompts)

    def crash_once(prompts, images, folder, **metadata):
        flag = os.path.join(folder, "crashed")
        if not os.path.exists(flag):
            open(flag, "w").close()
            os._exit(1)  # the whole actor process dies mid-call
        return [float(os.getpid())] * len(prompts)

    def broken(prompts, images, folder, **metadata):
        with open(os.path.join(folder, "broken_calls"), "a") as f:
            f.write("x")
        raise KeyError("no such column")

    class BadInit:
        def __init__(self):
            raise FileNotFoundError("no weights at /x")

"""

CFG = RewardPoolConfig(num_cpus=0.25, max_restarts=1, retries=1, timeout_s=120)


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugins")
    (path / "pool_plugins.py").write_text(textwrap.dedent(PLUGIN))
    return path


@pytest.fixture
def env(plugin_path, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_path))
    return {"env_vars": {"PYTHONPATH": str(plugin_path)}}


def test_pool_matches_in_process(ray_cluster, env, tmp_path, monkeypatch):
    import open_clip
    import ray
    import torch
    from argrpo.data.shapes import ShapesWorld, perturb_spec
    from argrpo.rewards.clip import register_open_clip_config
    from safetensors.torch import save_file

    register_open_clip_config("tiny-clip-pool", TINY_CLIP)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip-pool", pretrained=None)
    ckpt = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))

    specs = [
        RewardSpec("clip", weight=0.5, kwargs={"model": "tiny-clip-pool", "model_cfg": TINY_CLIP,
                                               "pretrained": str(ckpt), "device": "cpu"}),
        RewardSpec("geneval", weight=2.0, kwargs={"detector": "shapes"}),
        RewardSpec("pool_plugins:brightness", alias="bright", normalize="none"),  # its own setting wins
    ]
    world = ShapesWorld()
    batches = [world.sample("train", 6, seed=s) for s in (0, 1)]
    local = CompositeReward(specs, normalize="running")
    pool = RewardPool(specs, normalize="running", config=CFG, runtime_env=env)
    puts = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda v, **kw: (puts.append(type(v)), real_put(v, **kw))[1])
    try:
        for k, (rows, images, _) in enumerate(batches):
            prompts = [r["prompt"] for r in rows]
            # half the batch asks for something else, so the geneval component varies
            rng = np.random.default_rng(k)
            meta = [json.dumps(perturb_spec(world, r, rng) if i % 2 else r) for i, r in enumerate(rows)]
            got = pool(prompts=prompts, images=images, metadata=meta)
            want = local(prompts=prompts, images=images, metadata=meta)
            np.testing.assert_allclose(list(got), list(want), rtol=1e-6, atol=1e-7)
            assert set(got.extras) == set(want.extras) and "bright/norm" not in got.extras
            for key in want.extras:
                np.testing.assert_allclose(np.array(got.extras[key], float), np.array(want.extras[key], float),
                                           rtol=1e-6, atol=1e-7)
            assert len(puts) == k + 1 and puts[-1] is np.ndarray  # the images travelled once per batch
        for key, stats in local.state_dict().items():
            assert pool.state_dict()[key] == pytest.approx(stats)
        assert set(want.extras["geneval"]) == {0.0, 1.0}
        comps = pool.score_components(prompts, images, metadata=meta)
        assert set(comps) == {"clip", "geneval", "bright"} and comps["geneval"] == want.extras["geneval"]
    finally:
        pool.shutdown()


def test_rewards_run_concurrently(ray_cluster, env, tmp_path):
    specs = [RewardSpec("pool_plugins:wait_for_peer", alias=me, kwargs={"me": me, "peer": peer, "folder": str(tmp_path)})
             for me, peer in (("a", "b"), ("b", "a"))]
    with RewardPool(specs, config=CFG, runtime_env=env) as pool:
        out = pool(["p", "q"], np.zeros((2, 4, 4, 3), np.uint8))
    assert list(out) == [2.0, 2.0]


def test_dead_actor_is_restarted_and_the_call_retried(ray_cluster, env, tmp_path):
    spec = RewardSpec("pool_plugins:crash_once", alias="crashy", kwargs={"folder": str(tmp_path)})
    with RewardPool([spec], config=CFG, runtime_env=env) as pool:
        before = pool.pids()["crashy"]
        out = pool(["p"], np.zeros((1, 4, 4, 3), np.uint8))
        after = pool.pids()["crashy"]
    assert (tmp_path / "crashed").exists()
    assert after != before and list(out) == [float(after)]


def test_reward_errors_are_named_and_not_retried(ray_cluster, env, tmp_path):
    with RewardPool([RewardSpec("pool_plugins:broken", kwargs={"folder": str(tmp_path)})], config=CFG,
                    runtime_env=env) as pool:
        with pytest.raises(RewardError, match=r"reward 'pool_plugins:broken' \(.*2 samples.*\) raised KeyError"):
            pool(["a red cube", "b"], np.zeros((2, 4, 4, 3), np.uint8))
    assert (tmp_path / "broken_calls").read_text() == "x"
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        RewardPool(["nope"], config=CFG, runtime_env=env)
    with pytest.raises(RewardError, match=r"(?s)reward 'bad_init': its actor failed to start.*no weights at /x"):
        RewardPool([RewardSpec("pool_plugins:BadInit", alias="bad_init")], config=CFG, runtime_env=env)
