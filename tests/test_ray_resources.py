"""Resource requests on real Ray clusters (CPU): the actors a run asks for are added up before any is created; a
local cluster that cannot hold them fails at once naming the numbers and config keys; on a joined cluster a waiting
actor is named in a repeated warning and the run fails after ray_pending_timeout_s, or goes on once a node joins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from argrpo.cluster import ActorRequest, ResourceRequestError, check_resources, is_local_cluster
from argrpo.config import ConfigError, load_config
from argrpo.grpo.config import GRPORunConfig

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
RECIPE = REPO / "recipes" / "configs" / "shapes" / "grpo.yaml"
BASE = ["policy.checkpoint=ckpt", "rewards=[{name: geneval_dense}, {name: geneval}]"]


def _script(mode: str, workdir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(TESTS / "ray_resources_script.py"), mode, str(workdir)], env=env,
                          capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_run_adds_up_what_its_actors_ask_for():
    cfg = load_config(GRPORunConfig, RECIPE, BASE + [
        "rollout.num_workers=2", "rollout.num_cpus_per_worker=2", "reward_actors=true",
        "reward_pool.resources={geneval: {num_cpus: 0.5, num_gpus: 0.25}}"])
    reqs = {r.what: r for r in cfg.actor_requests()}
    assert reqs["rollout worker"].count == 2 and reqs["rollout worker"].per_actor() == {"CPU": 2.0}
    assert reqs["reward actor 'geneval_dense'"].per_actor() == {"CPU": 1.0}
    assert reqs["reward actor 'geneval'"].per_actor() == {"CPU": 0.5, "GPU": 0.25}
    assert "reward_pool.resources.geneval.num_gpus" in reqs["reward actor 'geneval'"].keys
    # in-process rollouts and rewards ask Ray for nothing
    assert load_config(GRPORunConfig, RECIPE, BASE + ["rollout.num_workers=0"]).actor_requests() == []
    with pytest.raises(ConfigError, match="ray_pending_timeout_s must be > 0"):
        load_config(GRPORunConfig, RECIPE, BASE + ["ray_pending_timeout_s=0"])


def test_check_against_the_local_cluster(ray_cluster):
    """The session's local cluster has 4 CPUs and no GPU: a request it can hold passes, one it cannot fails at once."""
    assert is_local_cluster()
    fits = [ActorRequest("rollout worker", 3, 1, keys=("rollout.num_workers",)), ActorRequest("reward actor", 1, 1)]
    check_resources(fits, "run")
    with pytest.raises(ResourceRequestError) as e:
        check_resources([ActorRequest("rollout worker", 4, 1, keys=("rollout.num_workers",)),
                         ActorRequest("reward actor 'clip'", 1, 1, keys=("reward_pool.num_cpus",))], "run")
    msg = str(e.value)
    assert "5 CPU in all" in msg and "offers 4 CPU" in msg and "rollout.num_workers" in msg
    assert "reward_pool.num_cpus" in msg
    with pytest.raises(ResourceRequestError, match=r"no node .* fits one rollout worker"):
        check_resources([ActorRequest("rollout worker", 1, 1, 0.5, keys=("rollout.num_gpus_per_worker",))], "run")


@pytest.mark.slow
def test_too_many_actors_on_a_local_cluster_fail_at_once(tmp_path):
    """The shipped shapes recipe with 2 rollout workers and reward actors asks for 3 CPUs; on the 2 CPUs a 2-core
    machine's local cluster has, it used to hang without a word. A sweep whose trial reservation plus its actors
    exceed the cluster fails the same way."""
    out = _script("local", tmp_path)
    grpo = out["grpo"]
    assert grpo["code"] != 0
    assert "3 CPU in all" in grpo["stderr"] and "offers 2 CPU" in grpo["stderr"]
    for key in ("rollout.num_workers", "rollout.num_cpus_per_worker", "reward_actors", "reward_pool.num_cpus"):
        assert key in grpo["stderr"], key
    assert not out["run_dir_written"]  # failed before it wrote anything
    sweep = out["sweep"]
    assert sweep["code"] != 0 and "--cpus-per-trial" in sweep["stderr"] and "offers 2 CPU" in sweep["stderr"]


@pytest.mark.slow
def test_a_waiting_actor_on_a_joined_cluster_is_named_then_times_out(tmp_path):
    out = _script("joined", tmp_path)
    grpo = out["grpo"]
    assert grpo["code"] != 0
    waits = [line for line in grpo["stderr"].splitlines() if line.startswith("still waiting")]
    assert len(waits) >= 2 and all("rollout worker 1 asks for 1 CPU" in line for line in waits)
    assert "still wait for resources after 5 s (ray_pending_timeout_s)" in grpo["stderr"]
    assert out["actors_left"] == []  # the run's workers were stopped, not left waiting
    # a node that joins while a worker waits lets it start
    assert out["after_join"] == {"workers": 2, "nodes": 2}
