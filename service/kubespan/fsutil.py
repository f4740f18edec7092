"""Atomic file writes: a temporary file in the same directory, fsync, rename, fsync the dir."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def atomic_write(path: Path, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
    """Replace `path` with `data` so that readers see the old or the new content, never a mix.

    The file is created with `mode` from the start (never briefly world-readable). Not
    `durable`: not synced to disk (a runtime file, gone at boot anyway: only the rename's
    atomicity matters).
    """
    atomic_write_chunks(path, (data,), mode, durable)


def atomic_write_chunks(
    path: Path, chunks: Iterable[bytes], mode: int = 0o600, durable: bool = True
) -> None:
    """`atomic_write` of content produced piece by piece (a large snapshot is never held
    whole in memory). The temporary file gets a fresh random name (mkstemp, created 0600),
    so a stale one left by a crash, or by another process with the same PID in another
    container, never blocks a write."""
    directory = path.parent
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        tmp.chmod(mode)
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if not durable:
        return
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def ensure_private_dir(path: Path) -> None:
    """Create `path` (and parents) if missing and make it accessible to its owner only."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)


def readable_by_others(path: Path) -> bool:
    """Whether group or others may read `path` (a file that holds a secret should not)."""
    try:
        return bool(path.stat().st_mode & 0o044)
    except OSError:
        return False
