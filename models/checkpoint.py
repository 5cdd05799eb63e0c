"""Atomic directory and file writes, so a crash never leaves a half-written checkpoint behind.

A checkpoint is written into a temp dir next to its target (same filesystem, so the final move is a rename),
flushed to disk, then swapped into place. A previous checkpoint at the same path is replaced only once the new one
is complete: on Linux both names are exchanged in one ``renameat2(RENAME_EXCHANGE)`` call, so at every instant
``path`` is either the old or the new complete directory. Where the exchange is not supported the old directory is
first renamed aside (``.<name>.old-*``) and ``recover(path)`` puts it back if the process died in between.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

_TMP_TAG = ".tmp-"
_OLD_TAG = ".old-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under ``root`` (directories last, so their entries are durable too)."""
    root = Path(root)
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                _fsync_path(p)
        _fsync_path(Path(dirpath))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False where the kernel or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2 exchange failed: {os.strerror(err)}", str(a), 0, str(b))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sibling(final: Path, tag: str) -> Path:
    return final.parent / f".{final.name}{tag}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def recover(final_path: str | Path) -> None:
    """Repair what a killed writer may have left next to ``final_path``.

    Puts back a previous checkpoint that was renamed aside when the process died before the new one moved in, and
    removes temp dirs of writers that are no longer running.
    """
    final = Path(final_path)
    if not final.parent.is_dir():
        return
    prefix = f".{final.name}"
    for p in sorted(final.parent.iterdir()):
        if not p.name.startswith(prefix):
            continue
        rest = p.name[len(prefix):]
        for tag in (_TMP_TAG, _OLD_TAG):
            if not rest.startswith(tag):
                continue
            try:
                pid = int(rest[len(tag):].split("-", 1)[0])
            except ValueError:
                continue
            if _pid_alive(pid):  # a writer still at work (or this process): not ours to touch
                continue
            if tag == _OLD_TAG and not final.exists():
                os.replace(p, final)
            else:
                shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final_path: str | Path) -> Iterator[Path]:
    """Yield a fresh temp dir; on success it replaces ``final_path`` atomically, on error it is removed.

    Example::

        with atomic_dir("runs/x/step_100") as tmp:
            model.save_pretrained(tmp)
            (tmp / "argrpo.json").write_text(...)
    """
    final = Path(final_path).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    tmp = _sibling(final, _TMP_TAG)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            if _exchange(tmp, final):
                # ``tmp`` now holds the previous checkpoint
                _fsync_path(final.parent)
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                old = _sibling(final, _OLD_TAG)
                os.replace(final, old)
                os.replace(tmp, final)
                _fsync_path(final.parent)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
            _fsync_path(final.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno is not None and str(final) not in str(e):
            # "No space left on device" alone does not say which checkpoint failed
            raise OSError(e.errno, f"writing {final}: {e.strerror or e}") from e
        raise


def remove_dir(path: str | Path) -> None:
    """Delete a directory without ever leaving it half-deleted under its own name: it is renamed to a temp name
    first (which ``recover`` / ``recover_all`` remove if this process dies midway)."""
    path = Path(path).absolute()
    if not path.exists():
        return
    aside = _sibling(path, _TMP_TAG)
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def recover_all(root: str | Path) -> None:
    """``recover`` every entry of ``root`` that a killed writer (or ``remove_dir``) may have left behind."""
    root = Path(root)
    if not root.is_dir():
        return
    finals = set()
    for p in root.iterdir():
        for tag in (_TMP_TAG, _OLD_TAG):
            if p.name.startswith(".") and tag in p.name:
                finals.add(p.name[1:].split(tag, 1)[0])
    for name in sorted(finals):
        recover(root / name)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a single file atomically (temp file in the same directory, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}{_TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hard-link a file (free for large immutable files), copying where linking fails (another filesystem)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_tree(src: str | Path, dst: str | Path, link: bool = False) -> None:
    """Copy a directory. ``link=True`` hard-links files instead, which is only safe for files that are never
    rewritten in place (a hard link shares the inode, so an in-place rewrite of the source changes the copy)."""
    shutil.copytree(src, dst, copy_function=link_or_copy if link else shutil.copy2, symlinks=False)
