"""The agent's relay role with fake relay threads (the real ones run on raw sockets in
tests/test_netns_relay.py and in the VM suite): a node with relay.enabled runs the relay,
tells it the members, offers its ports in its signed record once the relay is ready, and
shows the pairs it carries with their bytes; a node without it offers nothing."""

from __future__ import annotations

import base64
import ipaddress
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

from kubespan.agent.loop import Agent
from kubespan.netaddr import Endpoint
from kubespan.relay.forward import RelayedPair, RelaySide
from kubespan.relay.ports import PortRange

from agents import config_text, make_agent, running, wait_for
from servers import discovery_server


class FakeRelay:
    made: ClassVar[list[FakeRelay]] = []

    def __init__(
        self, private: bytes, public: bytes, bind_key: bytes, ports: PortRange, max_pairs: int
    ) -> None:
        self.ports, self.max_pairs = ports, max_pairs
        self.ready = threading.Event()
        self.members: frozenset[bytes] = frozenset()
        self.started = self.stopped = False
        FakeRelay.made.append(self)

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def join(self, timeout: float | None = None) -> None:
        pass

    def set_members(self, public_keys: Iterable[bytes]) -> None:
        self.members = frozenset(public_keys)

    def traffic(self) -> list[tuple[RelayedPair, int]]:
        pair = RelayedPair(
            ipaddress.ip_address("192.0.2.41"),
            RelaySide(29100, Endpoint.parse("198.51.100.1:40000")),
            RelaySide(29101, Endpoint.parse("198.51.100.2:40001")),
        )
        return [(pair, 4096)]


def relay_config(url: str, cluster_id: str, secret: str) -> bytes:
    return config_text(url, cluster_id, secret).replace(
        b"      enabled: true\n", b"      enabled: true\n      relay:\n        enabled: true\n"
    )


def offered(agent: Agent, node_id: str) -> tuple[int, int] | None:
    known = agent.membership.known.get(node_id)
    return known.record.info.relay_ports if known is not None else None


def test_a_relay_node_runs_the_relay_and_offers_it_once_ready(tmp_path: Path) -> None:
    cluster_id = base64.b64encode(os.urandom(32)).decode()
    secret = base64.b64encode(os.urandom(32)).decode()
    FakeRelay.made.clear()
    with discovery_server() as server:
        relay, _ = make_agent(
            tmp_path, "relay", 41, relay_config(server.url, cluster_id, secret),
            relay_server=FakeRelay,
        )  # fmt: skip
        plain, _ = make_agent(
            tmp_path, "plain", 42, config_text(server.url, cluster_id, secret),
            relay_server=FakeRelay,
        )  # fmt: skip
        (made,) = FakeRelay.made  # only the node that enabled it
        assert (made.ports, made.max_pairs) == (PortRange(29100, 256), 128)
        with running(relay), running(plain):
            wait_for(lambda: plain.identity.public_key in made.members, "members told")
            assert made.started and relay.identity.public_key not in made.members
            wait_for(lambda: relay.identity.node_id in plain.membership.known, "relay known")
            assert offered(plain, relay.identity.node_id) is None  # not ready: not offered
            made.ready.set()
            wait_for(
                lambda: offered(plain, relay.identity.node_id) == (29100, 256), "relay offered"
            )
            assert offered(relay, plain.identity.node_id) is None
            document = relay._last_document or {}
            carried = document["node"]["relay"]
            assert carried["ports"] == "29100-29355"
            assert carried["pairs"][0]["bytes"] == 4096
            assert (plain._last_document or {})["node"]["relay"] is None
        assert made.stopped
