"""Following the machine config: invalid changes are ignored, disabling tears down and leaves
discovery, enabling again brings the mesh back with the same keys. Real discovery service,
real config file watcher, in-memory kernels."""

from __future__ import annotations

import base64
import logging
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kubespan.agent.events import Stop
from kubespan.agent.loop import Agent
from kubespan.agent.supervisor import ConfigWatcher, Supervisor
from kubespan.config import MachineConfig, parse_config
from kubespan.identity import Identity, LinkHardware, load_or_create_identity

from agents import config_text, make_agent, running, wait_for
from fakekernel import FakeKernel, local_address
from servers import discovery_server


def has_peer(kernel: FakeKernel, key: str) -> bool:
    return kernel.link is not None and any(p.public_key == key for p in kernel.link.peers)


def supervised_node(
    tmp_path: Path,
) -> tuple[FakeKernel, Identity, Callable[[MachineConfig, Identity, queue.Queue[Any]], Agent]]:
    """The supervised node: its kernel, its identity, and how the supervisor makes its agent."""
    kernel = FakeKernel(
        addresses=(local_address("ens3", "192.0.2.11/24"),),
        hardware=(LinkHardware("ens3", "52:54:00:00:00:0b", True),),
    )
    identity = load_or_create_identity(tmp_path / "node" / "state")

    def make(config: MachineConfig, node: Identity, q: queue.Queue[Any]) -> Agent:
        return Agent(
            config,
            node,
            kernel,
            tmp_path / "node" / "run",
            tmp_path / "node" / "state",
            tick=0.2,
            events=q,
            hostname=lambda: "node",
        )

    return kernel, identity, make


def test_config_changes_are_followed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cluster_id = base64.b64encode(os.urandom(32)).decode()
    secret = base64.b64encode(os.urandom(32)).decode()
    with discovery_server() as server:
        enabled = config_text(server.url, cluster_id, secret)
        disabled = enabled.replace(b"enabled: true\ncluster", b"enabled: false\ncluster", 1)
        assert disabled != enabled
        invalid = enabled.replace(
            b"enabled: true\ncluster", b"enabled: true\n      mtu: 9\ncluster"
        )

        other, other_kernel = make_agent(tmp_path, "other", 12, enabled)
        config_file = tmp_path / "machineconfig.yaml"
        config_file.write_bytes(enabled)
        kernel, identity, make = supervised_node(tmp_path)
        events: queue.Queue[Any] = queue.Queue()
        watcher = ConfigWatcher(config_file, enabled, events, interval=0.1)
        supervisor = Supervisor(
            parse_config(enabled, "cfg"), kernel, lambda: identity, make, events
        )
        thread = threading.Thread(target=supervisor.run, daemon=True)
        watcher.start()
        thread.start()
        try:
            with running(other):
                key = identity.public_key_b64
                wait_for(lambda: has_peer(kernel, other.identity.public_key_b64), "node to mesh")
                wait_for(lambda: has_peer(other_kernel, key), "other to see node")
                link_before = kernel.link

                config_file.write_bytes(invalid)
                wait_for(lambda: "keeping the running config" in caplog.text, "the rejection")
                assert (
                    f"{config_file}:" in caplog.text and "mtu: must be at least 1280" in caplog.text
                )
                assert kernel.link == link_before

                config_file.write_bytes(disabled)
                wait_for(lambda: kernel.link is None, "teardown of the link")
                wait_for(lambda: not has_peer(other_kernel, key), "other to drop the node")

                config_file.write_bytes(enabled)
                wait_for(lambda: has_peer(kernel, other.identity.public_key_b64), "mesh again")
                wait_for(lambda: has_peer(other_kernel, key), "other to see node again")
                assert kernel.link is not None
                assert kernel.link.private_key == identity.private_key_b64
        finally:
            events.put(Stop())
            thread.join(timeout=10)
            watcher.stop()
        assert not thread.is_alive()


@pytest.mark.parametrize("powers_off", [True, False])
def test_a_stop_leaves_only_when_the_machine_powers_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, powers_off: bool
) -> None:
    """Power-off: the peers drop the node at once. A reboot, a restart or an upgrade: the
    node stays a member (it comes back with the same identity)."""
    caplog.set_level(logging.INFO)
    cluster_id = base64.b64encode(os.urandom(32)).decode()
    secret = base64.b64encode(os.urandom(32)).decode()
    with discovery_server() as server:
        enabled = config_text(server.url, cluster_id, secret)
        other, other_kernel = make_agent(tmp_path, "other", 12, enabled)
        kernel, identity, make = supervised_node(tmp_path)
        events: queue.Queue[Any] = queue.Queue()
        asked: list[bool] = []

        def powering_off() -> bool:
            asked.append(powers_off)
            return powers_off

        supervisor = Supervisor(
            parse_config(enabled, "cfg"),
            kernel,
            lambda: identity,
            make,
            events,
            powering_off=powering_off,
        )
        thread = threading.Thread(target=supervisor.run, daemon=True)
        with running(other):
            thread.start()
            try:
                key = identity.public_key_b64
                wait_for(lambda: has_peer(other_kernel, key), "other to see node")
            finally:
                events.put(Stop())
                thread.join(timeout=20)
            assert not thread.is_alive()
            assert asked == [powers_off]
            if powers_off:
                assert "leaving the cluster: the machine powers off" in caplog.text
                wait_for(lambda: not has_peer(other_kernel, key), "other to drop the node")
            else:
                assert "leaving the cluster" not in caplog.text
                assert "left discovery" not in caplog.text
                assert has_peer(other_kernel, key)
