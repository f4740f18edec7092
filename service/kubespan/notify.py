"""sd_notify: tell systemd about readiness and status.

Written here rather than taken from the `sdnotify` package because that package swallows
errors and ships no wheel; the protocol is one datagram on a unix socket.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send `message` (e.g. "READY=1") to systemd; False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
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
