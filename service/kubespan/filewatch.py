"""Being told when a file may have changed, instead of looking every few seconds: inotify on
the directories that hold it (its own, and its target's when it is a symlink), so that an
idle agent wakes for nothing.

Only a name's completed changes count: a file closed after writing, renamed in or out,
created, removed, or its attributes changed. A half-written file (`IN_MODIFY`) wakes
nobody, and the waiter settles for `SETTLE_SECONDS` after the last event before it looks,
so that one save (an editor's rename, a `cp` over the file) is read once, whole. What is
seen is only a hint: the waiter compares the file itself. Where inotify cannot watch (a
directory that does not exist yet, no inotify, no watches left), `watching` is False and
the caller polls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import struct
from pathlib import Path

log = logging.getLogger(__name__)

IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
CHANGES = (
    IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)
# The directory itself went (or moved): its watch is gone, the set must be made again.
GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED
SETTLE_SECONDS = 0.2
# struct inotify_event, in the host's byte order: wd, mask, cookie, len (then len bytes of
# name).
EVENT_HEADER = struct.Struct("=iIII")


class _Inotify:
    """The three libc calls, found once."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        self.init1 = libc.inotify_init1
        self.init1.argtypes = [ctypes.c_int]
        self.init1.restype = ctypes.c_int
        self.add_watch = libc.inotify_add_watch
        self.add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.add_watch.restype = ctypes.c_int


@functools.cache
def _inotify() -> _Inotify:
    return _Inotify()


def watched_directories(path: Path) -> tuple[Path, ...]:
    """Where a change of `path` shows: its directory, and its target's when it is a symlink
    (a target replaced in another directory changes nothing in the link's)."""
    directories = [path.parent]
    try:
        target = path.resolve().parent
    except (OSError, RuntimeError):  # a loop of links: the link's directory still shows
        target = path.parent
    if target != path.parent:
        directories.append(target)
    return tuple(directories)


class FileWatch:
    """inotify watches on the directories that hold one file. `fileno()` is readable when
    something happened there; `changed()` reads what did."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._directories: tuple[Path, ...] = ()
        self._reported: str | None = None

    @property
    def watching(self) -> bool:
        return self._fd is not None

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("not watching")
        return self._fd

    def refresh(self) -> bool:
        """Watch the directories that hold the file now (a symlink may point elsewhere
        since); whether inotify watches them all."""
        directories = watched_directories(self.path)
        if self._fd is not None and directories == self._directories:
            return True
        self.close()
        try:
            self._fd = self._open(directories)
        except OSError as error:
            # Said once per reason, not at every retry of a missing directory.
            reason = f"{error.strerror or error}"
            if reason != self._reported:
                self._reported = reason
                log.info(
                    "not watching %s for changes (%s): looking at it every few seconds",
                    self.path,
                    reason,
                )
            return False
        self._directories = directories
        self._reported = None
        return True

    @staticmethod
    def _open(directories: tuple[Path, ...]) -> int:
        libc = _inotify()
        fd = int(libc.init1(os.O_NONBLOCK | os.O_CLOEXEC))
        if fd < 0:
            number = ctypes.get_errno()
            raise OSError(number, os.strerror(number))
        try:
            for directory in directories:
                if libc.add_watch(fd, os.fsencode(directory), CHANGES | IN_ONLYDIR) < 0:
                    number = ctypes.get_errno()
                    raise OSError(number, f"{directory}: {os.strerror(number)}")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def changed(self) -> bool:
        """Read every event waiting; whether any could change the file. A directory that
        went (or lost events) ends the watch: the caller looks, and refreshes."""
        if self._fd is None:
            return True
        relevant = False
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return relevant
            except OSError as error:
                if error.errno == errno.EINTR:
                    continue
                self.close()
                return True
            if not data:
                return relevant
            offset = 0
            while offset + EVENT_HEADER.size <= len(data):
                _, mask, _, length = EVENT_HEADER.unpack_from(data, offset)
                offset += EVENT_HEADER.size + length
                if mask & (GONE | IN_Q_OVERFLOW):
                    self.close()
                    return True
                relevant = relevant or bool(mask & CHANGES)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._directories = ()
