"""sd_notify: tell systemd about readiness and status.

Written here rather than taken from the `sdnotify` package because that package swallows
errors and ships no wheel; the protocol is one datagram on a unix socket.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

SEND_TIMEOUT_SECONDS = 2.0


def notify(message: str) -> bool:
    """Send `message` (e.g. "READY=1") to systemd; False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        # A listener whose queue stays full (systemd stuck) may hold the caller this long,
        # not forever; READY=1 waits that long for room, as a watchdog feed does.
        sock.settimeout(SEND_TIMEOUT_SECONDS)
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError as error:
            log.warning("sd_notify failed socket=%s error=%s", address, error)
            return False
    return True


def ready(status: str) -> bool:
    return notify(f"READY=1\nSTATUS={status}")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


class Watchdog:
    """Feeds systemd's watchdog (`WatchdogSec=` in the unit) from the loop that must stay
    alive, at most once per `every` seconds: by default a quarter of the watchdog's interval
    (a loop that runs passes back to back must not send a datagram per pass, and an idle
    one need not: each feed is a socket made, connected and closed). Off when systemd asked
    for no watchdog."""

    def __init__(self, monotonic: Callable[[], float], every: float | None = None) -> None:
        self.monotonic = monotonic
        interval = _watchdog_seconds()
        self.every = every if every is not None else max(1.0, (interval or 0.0) / 4)
        self.enabled = interval is not None and os.environ.get(
            "WATCHDOG_PID", str(os.getpid())
        ) == str(os.getpid())
        self._fed_at = float("-inf")
        self.fed = 0

    def feed(self) -> None:
        now = self.monotonic()
        if not self.enabled or now - self._fed_at < self.every:
            return
        self._fed_at = now
        if notify("WATCHDOG=1"):
            self.fed += 1


def _watchdog_seconds() -> float | None:
    """The watchdog interval systemd set (WATCHDOG_USEC); None: no watchdog."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None
