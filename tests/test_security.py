"""Security: nothing a user passes in is unpickled, argrpo writes weights as safetensors, a local Ray cluster
listens on loopback only with no dashboard, and the README warns that plugin import paths run code."""

from __future__ import annotations

import ast
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from grpo_fixtures import run_overrides, shared_world

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "data", "rollout", "rewards", "grpo", "recipes", "bench")

# Modules whose loaders execute code stored in the data they read.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
# torch.jit.load reads TorchScript (a restricted language, no Python objects are unpickled); it is how SimpleAR's
# Cosmos decoder is shipped. Allowed only where listed, with the reason.
JIT_LOAD_ALLOWED = {"models/image_tokenizers/cosmos.py": "SimpleAR's Cosmos decoder is a TorchScript file"}


def _dotted(node: ast.AST) -> str:
    """``torch.jit.load`` for the call target ``torch.jit.load``; '' when it is not a plain dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def scan_source(source: str, rel: str) -> list[str]:
    """Unsafe deserialisation (and non-safetensors weight writing) in one module: ``["<file>:<line>: <what>"]``."""
    tree = ast.parse(source, filename=rel)
    found = []
    aliases: dict[str, str] = {}  # local name -> dotted origin, for `from torch import load` and `import numpy as np`
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in UNSAFE_MODULES:
                    found.append(f"{rel}:{node.lineno}: imports {a.name}")
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in UNSAFE_MODULES or any(a.name in UNSAFE_MODULES for a in node.names):
                found.append(f"{rel}:{node.lineno}: imports from {node.module}")
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if not name:
            continue
        head, _, rest = name.partition(".")
        full = aliases.get(head, head) + (f".{rest}" if rest else "")
        where = f"{rel}:{node.lineno}"
        if full == "torch.load" and not _is_const(_kw(node, "weights_only"), True):
            found.append(f"{where}: torch.load without weights_only=True")
        elif full in ("numpy.load",) and not (_kw(node, "allow_pickle") is None
                                             or _is_const(_kw(node, "allow_pickle"), False)):
            found.append(f"{where}: numpy.load with allow_pickle")
        elif full in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
            loader = _dotted(_kw(node, "Loader")) if _kw(node, "Loader") is not None else ""
            if not loader.endswith("SafeLoader"):
                found.append(f"{where}: {full} without SafeLoader")
        elif full in ("pandas.read_pickle", "torch.save"):
            found.append(f"{where}: {full}")
        elif full == "torch.jit.load" and rel not in JIT_LOAD_ALLOWED:
            found.append(f"{where}: torch.jit.load outside {sorted(JIT_LOAD_ALLOWED)}")
        elif name.endswith("save_pretrained") and _is_const(_kw(node, "safe_serialization"), False):
            found.append(f"{where}: save_pretrained(safe_serialization=False)")
    return found


def package_files() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 40, "the package scan found too few modules: the layout changed?"
    return files


def test_the_scanner_catches_each_unsafe_pattern():
    bad = textwrap.dedent("""
        import pickle
        import cloudpickle as cp
        from joblib import load as jl
        import torch, yaml, numpy as np
        from torch import load
        torch.LOAD("x.pt")
        torch.LOAD("x.pt", weights_only=False)
        load("x.pt", map_location="cpu")
        np.load("x.npy", allow_pickle=True)
        yaml.load(open("c.yaml"))
        torch.save({}, "w.pt")
        torch.jit.load("m.pt")
        model.save_pretrained("d", safe_serialization=False)
    """).replace("LOAD", "load")  # spelled apart so this control is not itself an unsafe line of the repository
    found = scan_source(bad, "example.py")
    for line in (2, 3, 4, 7, 8, 9, 10, 11, 12, 13, 14):
        assert any(f.startswith(f"example.py:{line}:") for f in found), (line, found)
    ok = textwrap.dedent("""
        import torch, yaml, numpy as np
        torch.load("x.pt", map_location="cpu", weights_only=True)
        np.load("x.npy")
        yaml.safe_load("a: 1")
        yaml.load("a: 1", Loader=yaml.SafeLoader)
        model.save_pretrained("d")
    """)
    assert scan_source(ok, "example.py") == []


def test_package_never_unpickles_or_writes_pickled_weights():
    found = []
    for path in package_files():
        rel = path.relative_to(ROOT).as_posix()
        found += scan_source(path.read_text(), rel)
    assert not found, "unsafe deserialisation or pickled weights:\n" + "\n".join(found)


# ---- what argrpo writes, and what a resume reads ----------------------------------------------------------------
WEIGHT_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".safetensors", ".npy", ".npz"}
# transformers' own resume files (optimizer moments, LR schedule, RNG); read back with torch.load(weights_only=True)
TRAINER_STATE_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth"}


@pytest.fixture(scope="module")
def world():
    return shared_world()


def test_checkpoints_hold_safetensors_and_resume_never_unpickles(world, tmp_path, monkeypatch):
    from argrpo.config import load_config
    from argrpo.grpo.config import GRPORunConfig
    from argrpo.grpo.trainer import train
    from argrpo.models.policy import load_policy

    monkeypatch.syspath_prepend(str(world["plugins"]))
    kw = {"grpo.max_steps": 1, "checkpoint.every": 1, "checkpoint.save_final": True}
    train(load_config(GRPORunConfig, None, run_overrides(world, tmp_path, **kw)))
    step = tmp_path / "checkpoints" / "step-0000001"
    for d in (step, tmp_path / "final"):
        files = {p.relative_to(d).as_posix(): p.suffix for p in d.rglob("*") if p.is_file()}
        weights = {f for f, s in files.items() if s in WEIGHT_SUFFIXES}
        assert "model.safetensors" in weights and "image_tokenizer/vq.safetensors" in weights, files
        assert weights - {f for f in weights if f.endswith(".safetensors")} <= TRAINER_STATE_FILES, weights

    # resume from it (and load its policy) with every unpickling entry point watched
    loads = []
    real_load = torch.load

    def watched_load(*args, **kwargs):
        loads.append((str(args[0]) if args else "", kwargs.get("weights_only")))
        return real_load(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError(f"pickle used on {args[:1]!r}")

    monkeypatch.setattr(torch, "load", watched_load)
    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    load_policy(step)
    summary = train(load_config(GRPORunConfig, None, run_overrides(world, tmp_path, **{**kw, "grpo.max_steps": 2})),
                    resume=True)
    assert summary["resumed_from"] == str(step) and summary["steps"] == 2
    assert {Path(f).name for f, _ in loads} >= {"optimizer.pt", "rng_state.pth"}, loads
    assert all(w is True for _, w in loads), loads


# ---- Ray ----------------------------------------------------------------------------------------------------------
RAY_PROBE = textwrap.dedent("""
    import json, os, sys, time
    import psutil
    from argrpo.cluster import init_ray

    ray = init_ray(num_cpus=1)

    @ray.remote
    class Echo:
        def pid(self):
            return os.getpid()

    actor = Echo.remote()
    ray.get(actor.pid.remote())
    time.sleep(1.0)  # agents finish starting their servers
    me = psutil.Process()
    procs = [me] + me.children(recursive=True)
    pids = {p.pid: p.name() for p in procs}
    listening = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            listening.append([pids[c.pid], c.laddr.ip, c.laddr.port])
    info = ray._private.worker.global_worker.node.address_info
    print("PROBE " + json.dumps({"listening": listening, "webui_url": info.get("webui_url"),
                                 "address": info.get("address"), "processes": sorted(set(pids.values()))}))
""")


def test_local_ray_listens_on_loopback_only_without_dashboard(tmp_path):
    """A fresh process starts Ray the way every argrpo command does; no process of that cluster may listen on a
    non-loopback address and no dashboard may be served. A cluster recorded by another process in Ray's temp dir
    (``ray start`` writes ``ray_current_cluster``) must not be joined."""
    import tempfile

    # short: Ray puts Unix socket paths (at most 107 bytes) under it
    temp = Path(tempfile.mkdtemp(prefix="rsec", dir="/tmp"))
    try:
        (temp / "ray_current_cluster").write_text("127.0.0.1:1")
        env = {**os.environ, "RAY_TMPDIR": str(temp), "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        proc = subprocess.run([sys.executable, "-c", RAY_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
    finally:
        import shutil

        shutil.rmtree(temp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("PROBE ")][-1]
    probe = json.loads(line[len("PROBE "):])
    assert probe["listening"], "found no listening socket at all: the probe is not looking at Ray's processes"
    assert {"gcs_server", "raylet"} <= set(probe["processes"])
    loopback = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
    exposed = [x for x in probe["listening"] if x[1] not in loopback]
    assert not exposed, f"Ray processes listening beyond loopback: {exposed}"
    assert not probe["webui_url"]
    assert 8265 not in {port for _, _, port in probe["listening"]}  # the dashboard's port
    assert probe["address"].startswith("127.0.0.1:") and probe["address"] != "127.0.0.1:1"


# ---- documentation ------------------------------------------------------------------------------------------------
def test_readme_says_plugin_import_paths_run_code():
    text = (ROOT / "README.md").read_text()
    paragraphs = [p for p in text.split("\n\n") if "module:function" in p or "plugin" in p.lower()]
    assert any("code" in p.lower() and ("run" in p.lower() or "execut" in p.lower()) for p in paragraphs), \
        "README must say that a plugin import path ('package.module:function') runs that module's code"
