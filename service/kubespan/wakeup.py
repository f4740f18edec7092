"""Waking a thread that waits in select(): a socket pair whose reading end joins the sockets
it waits on. Pokes from other threads never block, and several pokes wake it once."""

from __future__ import annotations

import contextlib
import select
import socket
from collections.abc import Callable


class Wakeup:
    def __init__(self) -> None:
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)
        self._writer.setblocking(False)

    def poke(self) -> None:
        # Full (a wake-up is pending anyway) or closed (stopping): nothing to do.
        with contextlib.suppress(OSError):
            self._writer.send(b"\0")

    def drain(self) -> None:
        with contextlib.suppress(OSError):  # BlockingIOError: nothing (more) pending
            while self.reader.recv(4096):
                pass

    def sleep(
        self, delay: float, monotonic: Callable[[], float], stopping: Callable[[], bool]
    ) -> None:
        """Wait `delay` seconds, or until `stopping()` holds after a poke."""
        deadline = monotonic() + delay
        while not stopping():
            left = deadline - monotonic()
            if left <= 0:
                return
            select.select([self.reader], [], [], left)
            self.drain()  # else one wake-up ends every later wait at once

    def close(self) -> None:
        self.reader.close()
        self._writer.close()
