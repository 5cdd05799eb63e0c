"""A tiny GRPO run on a two-node Ray cluster simulated on this machine (``ray.cluster_utils.Cluster``).

Run as its own process by tests/test_multinode.py (it starts and stops its own cluster, so it must not share a
process with other tests' Ray): ``python tests/multinode_grpo.py WORKDIR``. Prints one JSON line:
``{"steps", "max_steps", "rewards", "rollout_nodes", "reward_nodes", "node_names", "address"}``, node ids named
``node_a`` (head) / ``node_b`` (second node) by the custom resource each node was started with.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main(workdir: str) -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("RAY_ADDRESS", None)
    # Ray's cluster mode off: both simulated nodes (and every server they start) listen on 127.0.0.1 only, and
    # joining "127.0.0.1:port" is not rewritten to the machine's routable address (set before ray is imported)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    sys.path.insert(0, str(Path(__file__).resolve().parent))

    import ray
    from argrpo.cluster import init_ray
    from argrpo.config import load_config
    from argrpo.grpo.config import GRPORunConfig
    from argrpo.grpo.trainer import build_run
    from grpo_fixtures import build_world, run_overrides
    from ray.cluster_utils import Cluster

    t0 = time.perf_counter()
    root = Path(workdir)
    world = build_world(root / "world")
    sys.path.insert(0, str(world["plugins"]))  # the plugin reward; reward actors get it through PYTHONPATH

    # two nodes of 2 CPUs each, told apart by a custom resource
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"node_a": 4}, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2, resources={"node_b": 4})
        cluster.wait_for_nodes()
        t_cluster = time.perf_counter()
        init_ray(cluster.address)  # joins, as `--ray-address` does
        names = {n["NodeID"]: ("node_a" if "node_a" in n["Resources"] else "node_b")
                 for n in ray.nodes() if n["Alive"]}

        # two rollout actors spread over the nodes; the reward actor pinned to node_b by its custom resource
        cfg = load_config(GRPORunConfig, None, run_overrides(world, root / "run", **{
            "rollout.num_workers": 2, "rollout.placement": "spread",
            "reward_actors": True, "reward_pool.custom_resources": "{node_b: 1}",
            "grpo.max_steps": 2}))
        run = build_run(cfg)
        t_built = time.perf_counter()
        try:
            run.trainer.train()
            rollout_nodes = run.pool.worker_nodes()
            reward_pool = run.trainer.reward_funcs[0].reward.shared.pool
            reward_nodes = reward_pool.actor_nodes()
        finally:
            run.close()
        logs = [h for h in run.trainer.state.log_history if "reward" in h]
        return {"address": cluster.address, "steps": run.trainer.state.global_step, "max_steps": cfg.grpo.max_steps,
                "rewards": [h["reward"] for h in logs], "rollout_nodes": [names[n] for n in rollout_nodes],
                "reward_nodes": {k: names[n] for k, n in reward_nodes.items()}, "node_names": sorted(names.values()),
                "seconds": {"world_and_cluster": round(t_cluster - t0, 1), "join_and_build": round(t_built - t_cluster, 1),
                            "train": round(time.perf_counter() - t_built, 1)}}
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])), flush=True)
