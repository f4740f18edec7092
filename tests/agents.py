"""Agents on loopback for tests: configs, in-memory kernels, running in threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kubespan.agent.loop import Agent
from kubespan.config import parse_config
from kubespan.identity import LinkHardware, load_or_create_identity

from fakekernel import FakeKernel, local_address


def config_text(url: str, cluster_id: str, secret: str) -> bytes:
    return f"""
machine:
  network:
    kubespan:
      enabled: true
cluster:
  id: {cluster_id}
  secret: {secret}
  discovery:
    enabled: true
    registries:
      service:
        endpoint: {url}
""".encode()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


@contextmanager
def running(agent: Agent) -> Iterator[Agent]:
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        yield agent
    finally:
        agent.stop()
        thread.join(timeout=10)
        assert not thread.is_alive()


def make_agent(
    tmp: Path, name: str, last_octet: int, config: bytes, **options: Any
) -> tuple[Agent, FakeKernel]:
    """`options`: more of Agent's arguments (the threads' factories, say)."""
    kernel = FakeKernel(
        addresses=(local_address("ens3", f"192.0.2.{last_octet}/24"),),
        hardware=(LinkHardware("ens3", f"52:54:00:00:00:{last_octet:02x}", True),),
    )
    identity = load_or_create_identity(tmp / name / "state")
    agent = Agent(
        parse_config(config, "cfg.yaml"),
        identity,
        kernel,
        tmp / name / "run",
        tmp / name / "state",
        hostname=lambda: name,
        tick=0.2,
        **options,
    )
    return agent, kernel
