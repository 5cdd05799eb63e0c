"""Atomic checkpoint directories: complete or untouched, never half-written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from argrpo.models.checkpoint import atomic_dir, atomic_write_text, recover


def _leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}"))


def test_new_dir_and_replace(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target and not target.exists()
        (tmp / "a.txt").write_text("v1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("x")
    assert (target / "a.txt").read_text() == "v1" and (target / "sub" / "b.txt").is_file()
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("v2")
        # the previous checkpoint is untouched until the new one is complete
        assert (target / "a.txt").read_text() == "v1"
    assert (target / "a.txt").read_text() == "v2"
    assert not (target / "sub").exists()  # replaced as a whole, not merged
    assert _leftovers(tmp_path, "ckpt") == []


def test_failure_keeps_previous_and_cleans_up(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("good")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "good"
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert _leftovers(tmp_path, "ckpt") == []
    # a failure on a fresh path leaves nothing at all
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "fresh") as tmp:
            (tmp / "x").write_text("x")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_replace_without_exchange_support(tmp_path, monkeypatch):
    """Filesystems without renameat2(RENAME_EXCHANGE): the old dir is moved aside, then removed."""
    import argrpo.models.checkpoint as ck

    monkeypatch.setattr(ck, "_exchange", lambda a, b: False)
    target = tmp_path / "ckpt"
    for v in ("v1", "v2"):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text(v)
    assert (target / "a.txt").read_text() == "v2" and _leftovers(tmp_path, "ckpt") == []


def test_killed_writer_leaves_previous_loadable(tmp_path):
    """kill -9 in the middle of a write: the old checkpoint stays, the next writer cleans up the temp dir."""
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("good")
    code = (
        "import os, signal\n"
        "from models.checkpoint import atomic_dir\n"
        f"with atomic_dir({str(target)!r}) as tmp:\n"
        "    (tmp / 'a.txt').write_text('half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.getcwd())
    assert proc.returncode == -9
    assert (target / "a.txt").read_text() == "good"
    assert len(_leftovers(tmp_path, "ckpt")) == 1  # the dead writer's temp dir
    recover(target)
    assert _leftovers(tmp_path, "ckpt") == []


def test_recover_restores_renamed_aside_previous(tmp_path):
    # the non-exchange fallback renames the old dir aside first; a crash right then leaves only ".ckpt.old-<pid>-*"
    old = tmp_path / ".ckpt.old-999999999-abcd1234"
    old.mkdir()
    (old / "a.txt").write_text("good")
    recover(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "a.txt").read_text() == "good" and not old.exists()


def test_atomic_write_text(tmp_path):
    f = tmp_path / "state.json"
    atomic_write_text(f, "1")
    atomic_write_text(f, "2")
    assert f.read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
