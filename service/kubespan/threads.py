"""Threads the kernel knows by name: `top -H`, `ps -L` and /proc/PID/task/TID/comm show
which of the agent's threads is busy (Python names its threads for itself only)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

COMM_BYTES = 15  # the kernel keeps this much of a thread's name
THREAD_COMM = Path("/proc/thread-self/comm")


def kernel_name(name: str) -> str:
    """`name` as the kernel keeps it: printable ASCII, at most COMM_BYTES bytes."""
    text = "".join(c if c.isascii() and c.isprintable() else "?" for c in name)
    return text[:COMM_BYTES]


def name_this_thread(name: str) -> None:
    """Give the calling thread `name` in the kernel; a kernel that refuses changes nothing
    else."""
    with contextlib.suppress(OSError):
        THREAD_COMM.write_text(kernel_name(name), encoding="ascii")


def named_thread(
    target: Callable[..., object], name: str, args: tuple[Any, ...] = (), daemon: bool = True
) -> threading.Thread:
    """A thread named `name` in Python and, once it runs, in the kernel."""

    def run(*arguments: Any) -> None:
        name_this_thread(name)
        target(*arguments)

    return threading.Thread(target=run, name=name, args=args, daemon=daemon)
