"""Being told when a file may have changed, instead of looking every few seconds: inotify
on every directory entry the file's path goes through to reach it (its own name, and each
symlink met on the way, in whichever directory holds it), and on the file itself (a write
through another path to it, a bind mount of the file, a hard link elsewhere), so that an
idle agent wakes for nothing.

Only completed changes of those names count: a file closed after writing, renamed in or
out, removed, a symlink or directory created, attributes changed. A half-written file wakes
nobody: a regular file created is waited for until it is closed (IN_CLOSE_WRITE), and the
waiter settles after the last event before it looks. What is seen is only a hint: the
waiter compares the file itself. Whenever the watches could be stale (a watched directory
went, events were lost, the path now leads elsewhere) the watch is made anew, and the
waiter looks at once, since a change may have come while it was not watching.

Where inotify cannot watch (a directory that does not exist yet, no inotify, no watches
left) or would not be told (a network or FUSE file system: changes made on another machine
send no events), `refresh` says so and the caller polls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import stat
import struct
from dataclasses import dataclass
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
IN_ISDIR = 0x40000000
DIRECTORY_EVENTS = (
    IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)
FILE_EVENTS = IN_CLOSE_WRITE | IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF
# The watched object itself went (or moved), or events were lost: the watches are stale.
STALE = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED | IN_Q_OVERFLOW
# struct inotify_event, in the host's byte order: wd, mask, cookie, len (then len bytes of
# name, padded with zeros).
EVENT_HEADER = struct.Struct("=iIII")
MAX_SYMLINKS = 40  # as the kernel's path walk
SETTLE_SECONDS = 0.2  # quiet after the last event before the file is read
# File systems on which another machine changes files without any inotify event here.
REMOTE_FILE_SYSTEMS = {
    0x6969: "nfs",
    0x517B: "smb",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x01021997: "9p",
    0x65735546: "fuse",
    0x00C36400: "ceph",
    0x5346414F: "afs",
    0x01161970: "gfs2",
    0x7461636F: "ocfs2",
}


class _Libc:
    """The libc calls, found once."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        self.init1 = libc.inotify_init1
        self.init1.argtypes = [ctypes.c_int]
        self.init1.restype = ctypes.c_int
        self.add_watch = libc.inotify_add_watch
        self.add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.add_watch.restype = ctypes.c_int
        self.rm_watch = libc.inotify_rm_watch
        self.rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        self.rm_watch.restype = ctypes.c_int
        self.statfs = libc.statfs
        self.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
        self.statfs.restype = ctypes.c_int


@functools.cache
def _libc() -> _Libc:
    return _Libc()


def file_system_type(path: Path) -> int | None:
    """statfs's f_type (the first field, a long, on Linux); None when it cannot be read."""
    buffer = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit
    if _libc().statfs(os.fsencode(path), buffer) != 0:
        return None
    return int(ctypes.c_long.from_buffer(buffer).value) & 0xFFFFFFFF


@dataclass(frozen=True)
class Trace:
    """Where a path leads: each directory it goes through by an entry that could change
    where it ends (its own name's, each symlink's), with those entries' names; and the
    file it ends at."""

    entries: dict[Path, frozenset[str]]
    target: Path


def trace(path: Path) -> Trace:
    """Resolve `path` step by step, as the kernel does, noting the directory and name of
    the path's last entry and of every symlink met (a link swapped anywhere on the way
    changes where the path leads)."""
    absolute = Path.cwd() / path  # absolute, `..` and links left as they are
    entries: dict[Path, set[str]] = {absolute.parent: {absolute.name}}
    pending = list(absolute.parts[1:])
    current = Path("/")
    links = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            current = current.parent
            continue
        candidate = current / part
        try:
            is_link = stat.S_ISLNK(os.lstat(candidate).st_mode)
        except OSError:
            is_link = False  # not there (yet): the rest of the path is taken as written
        if not is_link or links >= MAX_SYMLINKS:
            current = candidate
            continue
        links += 1
        entries.setdefault(current, set()).add(part)
        try:
            target = str(candidate.readlink())
        except OSError:
            current = candidate
            continue
        if target.startswith("/"):
            current = Path("/")
        pending = [*Path(target).parts, *pending]
        if pending and pending[0] == "/":
            pending.pop(0)
    entries.setdefault(current.parent, set()).add(current.name)
    return Trace({d: frozenset(names) for d, names in entries.items()}, current)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class FileWatch:
    """inotify watches on what leads to one file. `fileno()` is readable when something
    happened there; `changed()` reads what did."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        # What the watches were set on, by identity: the directories, and the file.
        self._watched: tuple[object, ...] = ()
        self._target: tuple[Path, tuple[int, int] | None] | None = None
        # wd -> the directory and the names in it that lead to the file; None: the file
        self._watches: dict[int, tuple[Path, frozenset[str]] | None] = {}
        self._reported: str | None = None
        # Entries made as regular files and not yet closed after writing: being written.
        self.writing: set[Path] = set()

    @property
    def watching(self) -> bool:
        return self._fd is not None

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("not watching")
        return self._fd

    def refresh(self) -> tuple[bool, bool]:
        """Watch what leads to the file now (a symlink may point elsewhere since, a
        directory may have been replaced or mounted over): (watching, made anew). Made
        anew, the file may have changed while it was not watched: look at it. (The file
        itself replaced while its directories stayed watched is only watched again: they
        told of whatever happened to it.)"""
        found = trace(self.path)
        directories = tuple(sorted(found.entries))
        watched = tuple((d, _identity(d), found.entries[d]) for d in directories)
        target = (found.target, _identity(found.target))
        if self._fd is not None and watched == self._watched:
            if target != self._target:
                self._watch_file(self._fd, found.target, self._watches)
                self._target = target
            return True, False
        self.close()
        try:
            for directory in directories:
                kind = file_system_type(directory)
                if kind in REMOTE_FILE_SYSTEMS:
                    raise OSError(
                        errno.EOPNOTSUPP,
                        f"{directory} is on {REMOTE_FILE_SYSTEMS[kind]}, whose changes "
                        "made elsewhere send no events",
                    )
            self._fd, self._watches = self._open(found, directories)
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
            return False, False
        self._watched, self._target = watched, target
        self._reported = None
        return True, True

    @classmethod
    def _open(
        cls, found: Trace, directories: tuple[Path, ...]
    ) -> tuple[int, dict[int, tuple[Path, frozenset[str]] | None]]:
        libc = _libc()
        fd = int(libc.init1(os.O_NONBLOCK | os.O_CLOEXEC))
        if fd < 0:
            number = ctypes.get_errno()
            raise OSError(number, os.strerror(number))
        watches: dict[int, tuple[Path, frozenset[str]] | None] = {}
        try:
            for directory in directories:
                wd = libc.add_watch(fd, os.fsencode(directory), DIRECTORY_EVENTS | IN_ONLYDIR)
                if wd < 0:
                    number = ctypes.get_errno()
                    raise OSError(number, f"{directory}: {os.strerror(number)}")
                watches[wd] = (directory, found.entries[directory])
            cls._watch_file(fd, found.target, watches)
        except BaseException:
            os.close(fd)
            raise
        return fd, watches

    @staticmethod
    def _watch_file(
        fd: int, target: Path, watches: dict[int, tuple[Path, frozenset[str]] | None]
    ) -> None:
        """The file itself, by its inode: written through another path to it (a bind
        mount of the file, a hard link), its directory hears nothing. It may not exist
        (yet): its directory tells when it comes. A file watched before is watched no
        more (renamed away, it would still tell of its changes)."""
        libc = _libc()
        for wd in [wd for wd, watch in watches.items() if watch is None]:
            libc.rm_watch(fd, wd)  # gone already when the file was removed: harmless
            del watches[wd]
        wd = libc.add_watch(fd, os.fsencode(target), FILE_EVENTS)
        if wd >= 0:
            watches[wd] = None

    def changed(self) -> bool:
        """Read every event waiting; whether any could change the file. Stale watches are
        closed: the caller refreshes, and looks."""
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
                wd, mask, _, length = EVENT_HEADER.unpack_from(data, offset)
                start = offset + EVENT_HEADER.size
                name = os.fsdecode(data[start : start + length].rstrip(b"\0"))
                offset = start + length
                if wd not in self._watches and not mask & IN_Q_OVERFLOW:
                    continue  # a watch given up (its last events can still be queued)
                if mask & STALE and self._watches.get(wd, False) is None:
                    # The file itself went (removed, renamed away): its directory's watch
                    # tells what comes next; the next refresh watches the new file.
                    del self._watches[wd]
                    relevant = True
                elif mask & STALE:
                    self.close()
                    return True
                else:
                    relevant = self._relevant(wd, mask, name) or relevant

    def _relevant(self, wd: int, mask: int, name: str) -> bool:
        if wd not in self._watches:
            return False  # a watch of before (its events can still be queued)
        watch = self._watches[wd]
        if watch is None:
            return True  # the file's own watch: every event counts
        directory, names = watch
        if name not in names:
            return False  # another file in the same directory
        path = directory / name
        if mask & IN_CREATE and not mask & IN_ISDIR:
            # A regular file made here is being written: read once it is closed after
            # writing. A symlink (`ln -s` closes nothing) counts now.
            try:
                if not stat.S_ISLNK(os.lstat(path).st_mode):
                    self.writing.add(path)
                    return False
            except OSError:
                pass  # gone already: its removal is news as well
            return True
        if mask & (IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE):
            self.writing.discard(path)
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._watched, self._target = (), None
        self._watches = {}
        self.writing.clear()
