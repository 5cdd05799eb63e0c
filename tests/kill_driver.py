"""SIGKILL a learner (GRPO or pretrain) at chosen moments and check what it leaves on disk (tests/test_faults.py).

    python tests/kill_driver.py SPEC.json REPORT.json

The heavy imports happen once here; every run is a forked child that resumes from the newest checkpoint
(``grpo.trainer.train(cfg, resume=True)`` or ``grpo.lm_stage.run_lm_stage`` with ``train.resume=auto``), which the
parent kills with SIGKILL at a moment of the spec's choosing:

- ``during_write``: the child is inside a checkpoint write, stuck in a slow write (a hook sleeps there) after the
  weights went into the checkpoint's temp dir and before the trainer state did;
- ``during_delete``: the child has renamed an old checkpoint aside and half deleted it (a hook sleeps there);
- ``random``: a seeded random delay, shorter than one step, after the child finished two new steps (mid-step,
  mid-checkpoint, mid-log...).

After each kill the parent records every entry of the checkpoint directory and checks every directory that counts
as a checkpoint: ``load_policy`` loads it, its trainer state and optimizer read back (``weights_only=True``) and
agree on the step. Then a child resumes to the end, and one more resumes the finished run (nothing may be
trained). A separate unkilled child gives the reference run.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sys
import time
from pathlib import Path

SLOW_S = 600.0  # a hooked write sleeps this long: always longer than the parent takes to kill it


def _marker(root: Path, name: str, text: str = "") -> None:
    """Appears complete or not at all (the parent polls for it)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f".{name}").write_text(text)
    os.replace(root / f".{name}", root / name)


class Stage:
    """What differs between GRPO and pretraining: config, entry point, checkpoint names, where steps are logged."""

    def __init__(self, spec: dict, out: Path):
        self.name, self.out = spec["stage"], out
        if self.name == "grpo":
            from argrpo.grpo.config import GRPORunConfig as cls

            self.ckroot, self.prefix = out / "checkpoints", "step-"
        else:
            from argrpo.grpo.lm_stage import PretrainConfig as cls

            self.ckroot, self.prefix = out, "checkpoint-"
        from argrpo.config import load_config

        self.cfg = load_config(cls, None, spec["overrides"] + [f"output_dir={out}"])

    def checkpoints(self) -> list[tuple[int, Path]]:
        if self.name == "grpo":
            from argrpo.grpo.checkpointing import list_checkpoints

            return list_checkpoints(self.ckroot)
        from argrpo.grpo.lm_stage import complete_checkpoints

        return [(int(p.name.rsplit("-", 1)[1]), p) for p in complete_checkpoints(self.ckroot)]

    def steps_logged(self) -> list[int]:
        """Steps whose metrics the run keeps: metrics.jsonl (GRPO); the newest checkpoint's log history (pretrain)."""
        if self.name == "grpo":
            f = self.out / "metrics.jsonl"
            rows = f.read_text().splitlines() if f.is_file() else []
            steps = []
            for line in rows:
                try:
                    steps.append(int(json.loads(line)["step"]))
                except (json.JSONDecodeError, KeyError):
                    steps.append(-1)  # a torn line
            return steps
        found = self.checkpoints()
        if not found:
            return []
        state = json.loads((found[-1][1] / "trainer_state.json").read_text())
        return [h["step"] for h in state["log_history"] if "loss" in h]

    def run(self, progress: Path) -> None:
        from transformers import TrainerCallback

        class Progress(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                with progress.open("a") as f:
                    f.write(f"{state.global_step}\n")

        if self.name == "grpo":
            import argrpo.grpo.trainer as gt

            build = gt.build_run

            def build_with_progress(*args, **kwargs):
                run = build(*args, **kwargs)
                run.trainer.add_callback(Progress())
                return run

            gt.build_run = build_with_progress
            gt.train(self.cfg, resume=True)
        else:
            from argrpo.grpo.lm_stage import run_lm_stage

            run_lm_stage(self.cfg, callbacks=[Progress()])

    def install_hooks(self, kind: str, markers: Path, min_step: int) -> None:
        """Hooks that park the child inside a checkpoint write or an old checkpoint's deletion."""
        import argrpo.models.checkpoint as mc

        if kind == "during_write" and self.name == "grpo":
            import argrpo.grpo.checkpointing as ck

            real = ck.save_policy_files

            def slow_after_policy(path, model, *args, **kwargs):
                out = real(path, model, *args, **kwargs)
                if int(kwargs.get("extra", {}).get("grpo_step", 0)) >= min_step:
                    _marker(markers, "in_write", str(path))  # weights written; optimizer/RNG/state not yet
                    time.sleep(SLOW_S)
                return out

            ck.save_policy_files = slow_after_policy
        elif kind == "during_write":
            from transformers import Trainer

            real = Trainer._save_rng_state

            def slow_rng_state(trainer, output_dir):
                if trainer.state.global_step >= min_step:  # weights and optimizer written; RNG/state not yet
                    _marker(markers, "in_write", str(output_dir))
                    time.sleep(SLOW_S)
                return real(trainer, output_dir)

            Trainer._save_rng_state = slow_rng_state
        elif kind == "during_delete":
            real_rmtree = mc.shutil.rmtree
            mine = re.compile(rf"^\.{re.escape(self.prefix)}\d+\.tmp-{os.getpid()}-")

            def slow_rmtree(path, *args, **kwargs):
                if mine.match(Path(path).name) and any(Path(path).glob("trainer_state.json")):
                    # remove_dir renamed a complete old checkpoint aside: delete half of it, then stall
                    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
                    for f in files[: len(files) // 2]:
                        f.unlink()
                    _marker(markers, "in_delete", str(path))
                    time.sleep(SLOW_S)
                return real_rmtree(path, *args, **kwargs)

            mc.shutil.rmtree = slow_rmtree

    def inspect(self) -> dict:
        """Every entry of the checkpoint directory, and a full load of each directory that counts as one."""
        import torch
        from argrpo.models.policy import load_policy
        from transformers.trainer_pt_utils import safe_globals

        entries = sorted(p.name for p in self.ckroot.iterdir() if self.prefix in p.name) \
            if self.ckroot.is_dir() else []
        checked = []
        for step, path in self.checkpoints():
            load_policy(path)
            state = json.loads((path / "trainer_state.json").read_text())
            assert state["global_step"] == step, (path, state["global_step"])
            if self.name == "grpo":
                from argrpo.grpo.checkpointing import read_run_state

                assert read_run_state(path)["step"] == step, path
            opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
            assert opt["state"], f"{path}: empty optimizer state"
            with safe_globals():  # the RNG file holds numpy's state; transformers reads it this way on resume
                torch.load(path / "rng_state.pth", map_location="cpu", weights_only=True)
            checked.append(step)
        return {"entries": entries, "checkpoints": checked}


def _steps_seen(markers: Path) -> int:
    """How many steps the child has finished since it started (one line each in its progress file)."""
    f = markers / "progress"
    return f.read_text().count("\n") if f.is_file() else 0


def _private_tqdm_lock() -> None:
    """Give a forked child its own tqdm write lock. tqdm's default lock holds a multiprocessing semaphore that a
    fork shares with the parent: a child SIGKILLed while drawing a progress bar would leave it taken, and the
    parent's next progress bar would wait forever."""
    import multiprocessing
    import threading

    import tqdm.std

    lock_cls = tqdm.std.TqdmDefaultWriteLock
    lock_cls.mp_lock = multiprocessing.RLock()
    lock_cls.th_lock = threading.RLock()
    tqdm.std.tqdm.set_lock(lock_cls())
    # A subclass that drew a bar in the parent (transformers' "Loading weights" bar, after the parent inspected a
    # checkpoint) holds its own lock object, built around the parent's semaphore: it must not reach the child.
    todo = list(tqdm.std.tqdm.__subclasses__())
    while todo:
        sub = todo.pop()
        todo += sub.__subclasses__()
        if "_lock" in vars(sub):
            del sub._lock  # falls back to the base class's fresh lock


def _child(stage: Stage, kind: str, markers: Path, min_step: int) -> None:
    try:
        _private_tqdm_lock()
        stage.install_hooks(kind, markers, min_step)
        stage.run(markers / "progress")
        code = 0
    except BaseException as e:  # noqa: BLE001 - report anything, the parent decides
        print(f"child failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        code = 1
    os._exit(code)


def _fork(stage: Stage, kind: str, markers: Path, min_step: int = 0) -> int:
    markers.mkdir(parents=True, exist_ok=True)
    pid = os.fork()
    if pid == 0:
        _child(stage, kind, markers, min_step)
    return pid


def main(spec_path: str, report_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    for p in spec.get("sys_path", []):
        sys.path.insert(0, p)
    import argrpo.grpo.lm_stage  # noqa: F401  (imported once here, shared by every forked run)
    import argrpo.grpo.trainer  # noqa: F401

    rng = random.Random(spec["seed"])
    stage = Stage(spec, Path(spec["output_dir"]))
    report = {"kills": []}
    for i, kill in enumerate(spec["kills"]):
        markers = stage.out.parent / f"markers-{i}"
        pid = _fork(stage, kill["kind"], markers, kill.get("min_step", 1))
        deadline = time.monotonic() + spec["timeout_s"]
        waited_for = {"during_write": "in_write", "during_delete": "in_delete"}.get(kill["kind"])
        exited, first_step_at, step_s = None, None, 0.0
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                exited = status
                break
            if waited_for and (markers / waited_for).exists():
                break
            if not waited_for and _steps_seen(markers) >= 2:
                # two new steps done: kill within the next one, wherever it is (forward, write, log...). The
                # delay scales with the step time just seen, so a fast machine cannot finish the run first.
                time.sleep(rng.uniform(0.0, min(kill.get("max_delay_s", 0.3), step_s)))
                break
            if not waited_for and _steps_seen(markers) == 1 and first_step_at is None:
                first_step_at = time.monotonic()
            step_s = time.monotonic() - first_step_at if first_step_at is not None else 0.0
            time.sleep(0.005)
        if exited is None:
            os.kill(pid, signal.SIGKILL)
            _, exited = os.waitpid(pid, 0)
        marker = markers / waited_for if waited_for else None
        entry = {"kind": kill["kind"], "killed": os.WIFSIGNALED(exited) and os.WTERMSIG(exited) == signal.SIGKILL,
                 "exit": os.waitstatus_to_exitcode(exited), "steps_seen": _steps_seen(markers),
                 "marker": marker.read_text() if marker and marker.exists() else None,
                 "steps_logged": stage.steps_logged()}
        entry.update(stage.inspect())
        report["kills"].append(entry)

    pid = _fork(stage, "none", stage.out.parent / "markers-final")  # resume to the end, no kill
    _, status = os.waitpid(pid, 0)
    report["final"] = {"exit": os.waitstatus_to_exitcode(status), "steps_logged": stage.steps_logged(),
                       **stage.inspect()}
    pid = _fork(stage, "none", stage.out.parent / "markers-again")  # resuming a finished run trains nothing
    _, status = os.waitpid(pid, 0)
    report["again"] = {"exit": os.waitstatus_to_exitcode(status), "steps_logged": stage.steps_logged(),
                       **stage.inspect()}

    ref = Stage(spec, Path(spec["reference_dir"]))  # the same run without any kill
    pid = _fork(ref, "none", ref.out.parent / "markers-ref")
    _, status = os.waitpid(pid, 0)
    report["reference"] = {"exit": os.waitstatus_to_exitcode(status), "steps_logged": ref.steps_logged()}
    Path(report_path).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
