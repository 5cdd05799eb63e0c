"""Multi-node runs: placement settings, `--ray-address`, and a GRPO run on a two-node Ray cluster.

The cluster test runs in a subprocess (tests/multinode_grpo.py): it starts its own ``ray.cluster_utils.Cluster``,
which must not meet the session-wide local Ray of the other tests in this process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from argrpo.cluster import scheduling_options
from argrpo.rewards.pool import RewardPoolConfig
from argrpo.rollout.pool import RolloutConfig

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.update(extra)
    return env


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_placement_settings_validate_and_map_to_ray_options():
    cfg = RolloutConfig(custom_resources={"rollout": 1}, placement="spread")
    assert scheduling_options(cfg.custom_resources, cfg.placement) == {
        "scheduling_strategy": "SPREAD", "resources": {"rollout": 1.0}}
    assert scheduling_options({}, "pack") == {"scheduling_strategy": "DEFAULT"}
    with pytest.raises(ValueError, match="rollout.placement"):
        RolloutConfig(placement="scatter")
    with pytest.raises(ValueError, match="'CPU' is not a custom resource"):
        RolloutConfig(custom_resources={"CPU": 1})
    with pytest.raises(ValueError, match="'gpu_node' must be a positive number"):
        RolloutConfig(custom_resources={"gpu_node": 0})
    rp = RewardPoolConfig(custom_resources={"reward": 0.5}, placement="spread",
                          resources={"clip": {"custom_resources": {"gpu_node": 1}}})
    assert rp.custom_resources == {"reward": 0.5} and rp.resources["clip"]["custom_resources"] == {"gpu_node": 1.0}
    with pytest.raises(ValueError, match=r"resources\['clip'\].custom_resources"):
        RewardPoolConfig(resources={"clip": {"custom_resources": {"x": -1}}})
    with pytest.raises(ValueError, match="reward pool: placement"):
        RewardPoolConfig(placement="everywhere")
    from argrpo.config import describe

    for key in ("custom_resources", "placement"):
        assert key in describe(RolloutConfig) and key in describe(RewardPoolConfig)


def test_unreachable_ray_address_is_named(tmp_path):
    """`--ray-address` (or RAY_ADDRESS) that does not answer stops the command with an error naming it."""
    address = f"127.0.0.1:{_closed_port()}"
    cfg = tmp_path / "grpo.yaml"
    cfg.write_text("policy: {checkpoint: /nonexistent/policy}\nrewards: [{name: geneval}]\n")
    cli = [sys.executable, "-m", "argrpo.recipes.cli"]
    runs = {
        "grpo": subprocess.run(cli + ["grpo", str(cfg), "--ray-address", address], env=_env(),
                               capture_output=True, text=True, timeout=120),
        "pipeline": subprocess.run(cli + ["pipeline", str(REPO / "recipes/configs/shapes/pipeline.yaml"),
                                          "--set", f"output_dir={tmp_path / 'demo'}"],
                                   env=_env(RAY_ADDRESS=address), capture_output=True, text=True, timeout=120),
    }
    for name, proc in runs.items():
        assert proc.returncode != 0, name
        assert f"argrpo {name}: cannot join the Ray cluster" in proc.stderr and address in proc.stderr, proc.stderr
    assert not (tmp_path / "demo").exists()  # nothing ran before the address was checked


def test_two_node_cluster_runs_grpo_on_both_nodes(tmp_path):
    """Head + one more node (2 CPUs each, custom resources node_a / node_b); 2 rollout actors with placement
    spread land on different nodes, the reward actor goes where its custom resource is, and the run finishes."""
    proc = subprocess.run([sys.executable, str(TESTS / "multinode_grpo.py"), str(tmp_path)], env=_env(),
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["address"].startswith("127.0.0.1:")  # joined by address, cluster on loopback only
    assert result["node_names"] == ["node_a", "node_b"]
    assert sorted(result["rollout_nodes"]) == ["node_a", "node_b"]  # one rollout worker on each node
    assert result["reward_nodes"] == {"user_rewards:redness": "node_b"}
    assert result["steps"] == result["max_steps"] == 2
    assert len(result["rewards"]) == 2 and all(isinstance(r, float) for r in result["rewards"])
