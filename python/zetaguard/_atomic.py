"""Atomic file writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` only once fully written and fsynced.

    The data goes to a temporary file in the same directory (so the final rename stays on one
    filesystem and is atomic), is flushed and fsynced, then renamed over ``path``; the directory
    is fsynced so the rename itself survives a crash. On any error the temporary file is
    removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    prune_orphans(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    _lock(fd)  # held while writing: tells prune_orphans() in other processes this one lives
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    with atomic_open(path) as f:
        write(f)


def _fsync_dir(directory: Path) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not open directories; the rename is still atomic
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


ORPHAN_AGE = 60.0  # seconds without a write before an unlocked temporary counts as orphaned


def _lock(fd: int) -> bool:
    """An exclusive, non-blocking advisory lock on ``fd`` (False where it is held elsewhere or
    the platform has no ``fcntl``; the lock goes when the descriptor closes or its process dies)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: the age test alone decides
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def prune_orphans(target: Path) -> list[Path]:
    """Remove temporaries of ``target`` left by writers that died (``SIGKILL``, power cut):
    ``.<name>.<random>.tmp`` files untouched for ``ORPHAN_AGE`` seconds whose lock no live
    writer holds. Returns what was removed."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.[A-Za-z0-9_]+\.tmp$")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not pattern.match(entry.name):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < ORPHAN_AGE:
                continue
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if _lock(fd):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed
