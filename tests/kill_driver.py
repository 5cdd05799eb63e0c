"""SIGKILL a GRPO learner at chosen moments and check what it leaves on disk (run by tests/test_faults.py).

    python tests/kill_driver.py SPEC.json REPORT.json

The heavy imports happen once here; every run is a forked child (``train(cfg, resume=True)``), which the parent
kills with SIGKILL at a moment of the spec's choosing:

- ``during_write``: the child has written the policy files of a checkpoint into its temp dir and is stuck in a slow
  write (a hook sleeps there), the trainer state is not written yet;
- ``during_delete``: the child has renamed an old checkpoint aside and is deleting it (a hook sleeps there);
- ``random``: a seeded random delay after the child logged a new step (mid-step, mid-checkpoint, mid-log...).

After each kill the parent records every directory under ``checkpoints/`` and checks every one that looks like a
checkpoint: ``load_policy`` loads it, its trainer state and optimizer read back (``weights_only=True``) and agree
on the step. Then a child resumes to the end, and one more resumes the finished run (nothing may be trained). A
separate unkilled child gives the reference run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

SLOW_S = 600.0  # a hooked write sleeps this long: always longer than the parent takes to kill it


def _marker(root: Path, name: str, text: str = "") -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)


def _install_hooks(kind: str, markers: Path, min_step: int) -> None:
    """Hooks that park the child inside a checkpoint write or an old checkpoint's deletion."""
    import grpo.checkpointing as ck
    import models.checkpoint as mc

    if kind == "during_write":
        real = ck.save_policy_files

        def slow_after_policy(path, model, *args, **kwargs):
            out = real(path, model, *args, **kwargs)
            step = int(kwargs.get("extra", {}).get("grpo_step", 0))
            if step >= min_step:  # the policy files are in the temp dir; optimizer/RNG/trainer state are not
                _marker(markers, "in_write", str(path))
                time.sleep(SLOW_S)
            return out

        ck.save_policy_files = slow_after_policy
    elif kind == "during_delete":
        real_rmtree = mc.shutil.rmtree

        def slow_rmtree(path, *args, **kwargs):
            name = Path(path).name
            if name.startswith(".step-") and f".tmp-{os.getpid()}-" in name:
                # remove_dir renamed the old checkpoint aside: delete half of it, then stall
                files = sorted(p for p in Path(path).rglob("*") if p.is_file())
                for f in files[: len(files) // 2]:
                    f.unlink()
                _marker(markers, "in_delete", str(path))
                time.sleep(SLOW_S)
            return real_rmtree(path, *args, **kwargs)

        mc.shutil.rmtree = slow_rmtree


def _child(cfg, kind: str, markers: Path, min_step: int) -> None:
    from grpo.trainer import train

    try:
        _install_hooks(kind, markers, min_step)
        train(cfg, resume=True)
        code = 0
    except BaseException as e:  # noqa: BLE001 - report anything, the parent decides
        print(f"child failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        code = 1
    os._exit(code)


def _metrics_steps(out: Path) -> list[int]:
    f = out / "metrics.jsonl"
    if not f.is_file():
        return []
    steps = []
    for line in f.read_text().splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (json.JSONDecodeError, KeyError):
            steps.append(-1)  # a torn line
    return steps


def _inspect(ckroot: Path) -> dict:
    """Everything under checkpoints/, and a full load of each directory that counts as a checkpoint."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    from grpo.checkpointing import list_checkpoints, read_run_state
    from models.policy import load_policy

    entries = sorted(p.name for p in ckroot.iterdir()) if ckroot.is_dir() else []
    checked = []
    for step, path in list_checkpoints(ckroot):
        load_policy(path)
        state = json.loads((path / "trainer_state.json").read_text())
        run = read_run_state(path)
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        with safe_globals():  # the RNG file holds numpy's state; transformers reads it this way on resume
            torch.load(path / "rng_state.pth", map_location="cpu", weights_only=True)
        assert state["global_step"] == run["step"] == step, (path, state["global_step"], run["step"])
        assert opt["state"], f"{path}: empty optimizer state"
        checked.append(step)
    return {"entries": entries, "checkpoints": checked}


def _run_child(cfg, kind: str, markers: Path, min_step: int) -> int:
    pid = os.fork()
    if pid == 0:
        _child(cfg, kind, markers, min_step)
    return pid


def main(spec_path: str, report_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    sys.path.insert(0, spec["plugins"])
    import grpo.trainer  # noqa: F401  (imported once here, shared by every forked run)
    from grpo.config import GRPORunConfig
    from recipes.config import load_config

    rng = random.Random(spec["seed"])
    out = Path(spec["output_dir"])
    cfg = load_config(GRPORunConfig, None, spec["overrides"] + [f"output_dir={out}"])
    report = {"kills": []}

    for i, kill in enumerate(spec["kills"]):
        markers = out.parent / f"markers-{i}"
        before = _metrics_steps(out)
        pid = _run_child(cfg, kill["kind"], markers, kill.get("min_step", 1))
        deadline = time.monotonic() + spec["timeout_s"]
        waited_for = {"during_write": "in_write", "during_delete": "in_delete"}.get(kill["kind"])
        exited = None
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                exited = status
                break
            if waited_for and (markers / waited_for).exists():
                break
            if not waited_for and len(_metrics_steps(out)) > len(before):
                time.sleep(rng.uniform(0.0, kill.get("max_delay_s", 1.5)))
                break
            time.sleep(0.02)
        if exited is None:
            os.kill(pid, signal.SIGKILL)
            _, exited = os.waitpid(pid, 0)
        entry = {"kind": kill["kind"], "killed": os.WIFSIGNALED(exited) and os.WTERMSIG(exited) == signal.SIGKILL,
                 "marker": (markers / waited_for).read_text() if waited_for and (markers / waited_for).exists()
                 else None, "steps_logged": _metrics_steps(out)}
        entry.update(_inspect(out / "checkpoints"))
        report["kills"].append(entry)

    # resume to the end, no kill
    pid = _run_child(cfg, "none", out.parent / "markers-final", 0)
    _, status = os.waitpid(pid, 0)
    report["final"] = {"exit": os.waitstatus_to_exitcode(status), "steps_logged": _metrics_steps(out),
                       **_inspect(out / "checkpoints")}

    # resuming a finished run trains nothing more
    pid = _run_child(cfg, "none", out.parent / "markers-again", 0)
    _, status = os.waitpid(pid, 0)
    report["again"] = {"exit": os.waitstatus_to_exitcode(status), "steps_logged": _metrics_steps(out),
                       **_inspect(out / "checkpoints")}

    # the same run without any kill
    ref_out = Path(spec["reference_dir"])
    ref_cfg = load_config(GRPORunConfig, None, spec["overrides"] + [f"output_dir={ref_out}"])
    pid = _run_child(ref_cfg, "none", ref_out.parent / "markers-ref", 0)
    _, status = os.waitpid(pid, 0)
    report["reference"] = {"exit": os.waitstatus_to_exitcode(status), "steps_logged": _metrics_steps(ref_out)}
    Path(report_path).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
