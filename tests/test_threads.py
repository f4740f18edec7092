"""The agent's threads carry their names into the kernel, where top -H and ps -L see them."""

from __future__ import annotations

import threading
from pathlib import Path

from kubespan.threads import kernel_name, named_thread


def test_a_named_thread_is_known_to_the_kernel_by_its_name() -> None:
    seen: list[str] = []

    def look() -> None:
        seen.append(Path("/proc/thread-self/comm").read_text().strip())

    thread = named_thread(look, "watch https://discovery.example")
    thread.start()
    thread.join(10)
    assert seen == ["watch https://d"]
    assert thread.name == "watch https://discovery.example" and thread.daemon


def test_the_thread_that_starts_it_keeps_its_own_name() -> None:
    before = Path("/proc/thread-self/comm").read_text()
    thread = named_thread(lambda: None, "other")
    thread.start()
    thread.join(10)
    assert Path("/proc/thread-self/comm").read_text() == before
    assert threading.current_thread().name == "MainThread"


def test_kernel_names_are_short_printable_ascii() -> None:
    assert kernel_name("config watcher") == "config watcher"
    assert kernel_name("stün\nprober") == "st?n?prober"
    assert len(kernel_name("x" * 40)) == 15
