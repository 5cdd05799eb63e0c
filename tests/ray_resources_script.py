"""Runs that ask Ray for more than the cluster has, each on a Ray cluster of its own (so not in the pytest process,
whose session cluster has other sizes). Used by tests/test_ray_resources.py:

    python tests/ray_resources_script.py local WORKDIR    a local cluster of 2 CPUs (what a 2-core machine starts):
        `argrpo grpo <shipped shapes recipe> --set rollout.num_workers=2 --set reward_actors=true` (3 CPUs of actors),
        then `argrpo sweep` with --cpus-per-trial 2 beside a rollout worker
    python tests/ray_resources_script.py joined WORKDIR   a joined cluster (ray.cluster_utils.Cluster) of 1 CPU:
        the same kind of grpo run with a short ray_pending_timeout_s, then a pool whose second worker waits until a
        node joins

Prints one JSON line: for each case its exit status or outcome, and the log lines it wrote.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import threading
import time
from contextlib import redirect_stderr
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "configs" / "shapes" / "grpo.yaml"


def _cli(args: list[str]) -> dict:
    """Run the `argrpo` CLI in this process; its exit status and what it wrote to stderr (logging included)."""
    from argrpo.recipes.cli import main

    err = io.StringIO()
    handler = logging.StreamHandler(err)
    logging.getLogger("argrpo").addHandler(handler)
    try:
        with redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as e:
                code = e.code
            except Exception as e:  # noqa: BLE001 - reported to the test, which checks the message
                code, _ = 1, err.write(f"{type(e).__name__}: {e}\n")
    finally:
        logging.getLogger("argrpo").removeHandler(handler)
    return {"code": code, "stderr": err.getvalue()}


def _world(workdir: Path) -> tuple[dict, list[str]]:
    from grpo_fixtures import build_world, run_overrides

    world = build_world(workdir / "world")
    sys.path.insert(0, str(world["plugins"]))
    sets = []
    for item in run_overrides(world, workdir / "run"):
        sets += ["--set", item]
    return world, sets


def local(workdir: Path) -> dict:
    from argrpo.cluster import init_ray

    _, sets = _world(workdir)
    init_ray(num_cpus=2)
    out = {"grpo": _cli(["grpo", str(RECIPE), *sets, "--set", "rollout.num_workers=2", "--set", "reward_actors=true"])}
    out["run_dir_written"] = (workdir / "run").exists()
    out["sweep"] = _cli(["sweep", str(RECIPE), *sets, "--set", "rollout.num_workers=1", "--grid",
                         "grpo.beta=0,0.04", "--cpus-per-trial", "2", "--out", str(workdir / "sweep")])
    return out


def joined(workdir: Path) -> dict:
    import argrpo.cluster as cluster_mod
    import ray
    from argrpo.cluster import ResourceRequestError, init_ray
    from argrpo.rollout.pool import RolloutConfig, RolloutPool
    from ray.cluster_utils import Cluster

    world, sets = _world(workdir)
    cluster_mod.PENDING_WARN_S = 0.5  # the 30 s interval, shortened so the repeats show in a short wait
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    out: dict = {}
    try:
        init_ray(cluster.address)  # joins, as `--ray-address` does
        out["grpo"] = _cli(["grpo", str(RECIPE), *sets, "--set", "rollout.num_workers=2",
                            "--set", "ray_pending_timeout_s=5"])
        out["actors_left"] = [a["State"] for a in ray._private.state.actors().values() if a["State"] != "DEAD"]

        # the same request waits, and goes on once a node with room joins (Ray adds nodes from the main thread only)
        def build_pool():
            try:
                pool = RolloutPool(str(world["policy"]), RolloutConfig(num_workers=2), pending_timeout_s=120)
                out["after_join"] = {"workers": pool.num_workers, "nodes": len(set(pool.worker_nodes()))}
                pool.shutdown()
            except ResourceRequestError as e:
                out["after_join"] = {"error": str(e)}

        builder = threading.Thread(target=build_pool)
        builder.start()
        time.sleep(1.0)
        cluster.add_node(num_cpus=1)
        builder.join()
    finally:
        ray.shutdown()
        cluster.shutdown()
    return out


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("RAY_ADDRESS", None)
    # both simulated nodes listen on 127.0.0.1 only (read when ray is imported; see tests/multinode_grpo.py)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    mode, workdir = sys.argv[1], Path(sys.argv[2])
    print(json.dumps({"local": local, "joined": joined}[mode](workdir)), flush=True)
