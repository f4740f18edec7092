"""Polling with a deadline: wait for a condition, never sleep for luck."""

import time
from collections.abc import Callable
from typing import TypeVar

from kslab.errors import LabError

T = TypeVar("T")


def wait_until(
    probe: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.25,
) -> T:
    """Call `probe` until it returns something other than None or False, for at most
    `timeout` seconds; return that value, or raise LabError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() >= deadline:
            raise LabError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
