"""The agent's relay role with fake relay threads (the real ones run on raw sockets in
tests/test_netns_relay.py and in the VM suite): a node with relay.enabled runs the relay,
tells it the members, offers its ports in its signed record once the relay is ready, and
shows the pairs it carries with their bytes; a node without it offers nothing."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from kubespan.agent.loop import Agent
from kubespan.agent.status import STATUS_FILE
from kubespan.config import parse_config
from kubespan.identity import LinkHardware, load_or_create_identity, node_id_for
from kubespan.model import AffiliateInfo, MemberRecord
from kubespan.netaddr import Endpoint, IPAddress
from kubespan.plan.membership import Known, Membership
from kubespan.relay.choice import RELAY_AFTER, RTT_IDLE_SAMPLE_EVERY, RTT_SAMPLE_EVERY, RelayOffer
from kubespan.relay.client import Bound
from kubespan.relay.forward import RelayedPair, RelaySide
from kubespan.relay.ports import PortRange
from test_agent_paths import Clock, FakePaths, FakeStun
from wgkeys import Keys

from agents import config_text, make_agent, running, wait_for
from fakekernel import FakeKernel, local_address
from servers import discovery_server


class FakeRelay:
    made: ClassVar[list[FakeRelay]] = []

    def __init__(
        self, private: bytes, public: bytes, bind_key: bytes, ports: PortRange, max_pairs: int
    ) -> None:
        self.ports, self.max_pairs = ports, max_pairs
        self.ready = threading.Event()
        self.members: frozenset[bytes] = frozenset()
        self.addresses: list[tuple[IPAddress, ...]] = []  # what the agent said, in order
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

    def set_own_addresses(self, addresses: Iterable[IPAddress]) -> None:
        self.addresses.append(tuple(addresses))

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
        relay, relay_kernel = make_agent(
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

            # The relay is told the node's addresses, once, and again when it is renumbered
            # (bindings at an address it lost lapse: relay.bindings.lapsed_at).
            old, new = ipaddress.ip_address("192.0.2.41"), ipaddress.ip_address("192.0.2.141")
            assert made.addresses == [(old,)]
            relay_kernel.addresses = (local_address("ens3", "192.0.2.141/24"),)
            wait_for(lambda: made.addresses[-1:] == [(new,)], "the relay told its new address")
            assert made.addresses == [(old,), (new,)]
        assert made.stopped


# --- which relay: round trips both sides published ------------------------------------------


class FakeSides:
    """Stands in for the relay client thread: keeps what the agent wants bound; the test
    says what is bound."""

    def __init__(
        self, events: object, port: int, private: bytes, public: bytes, bind_key: bytes
    ) -> None:
        self.wanted: dict[bytes, tuple[RelayOffer, ...]] = {}
        self.nearer: frozenset[bytes] = frozenset()
        self.bound_now: dict[bytes, Bound] = {}

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        pass

    def want(
        self,
        wanted: Mapping[bytes, tuple[RelayOffer, ...]],
        failing: frozenset[bytes],
        nearer: frozenset[bytes],
    ) -> None:
        self.wanted, self.nearer = dict(wanted), nearer

    def bound(self) -> dict[bytes, Bound]:
        return dict(self.bound_now)


def member(name: str, address: str, **info: Any) -> tuple[str, Known]:
    key = Keys()
    node_id = node_id_for(key.public)
    record = MemberRecord(
        AffiliateInfo(
            node_id,
            name,
            base64.b64encode(key.public).decode(),
            ipaddress.IPv6Address(f"fd00::{len(name)}"),
            (ipaddress.ip_address(address),),
            **info,
        ),
        (Endpoint(ipaddress.ip_address(address), 51820),),
        1,
        1 << 40,
    )
    return node_id, Known(record)


class RelayLab:
    """An agent on an in-memory kernel with fake path and relay threads; two relays it
    reaches (`near`, `far`) and a peer behind a NAT that never comes up directly, whose
    record says it is far from `near` and near `far`."""

    def __init__(self, tmp: Path, cluster_id: str, secret: str) -> None:
        self.clock = Clock()
        self.kernel = FakeKernel(
            addresses=(local_address("ens3", "10.1.0.10/24"),),
            hardware=(LinkHardware("ens3", "52:54:00:00:00:0a", True),),
        )
        self.agent = Agent(
            parse_config(config_text("http://127.0.0.1:9", cluster_id, secret), "cfg.yaml"),
            load_or_create_identity(tmp / "state"),
            self.kernel,
            tmp / "run",
            tmp / "state",
            clocks=self.clock.clocks(),
            hostname=lambda: "alpha",
            stun=FakeStun,
            paths=FakePaths,
            relay_client=FakeSides,
        )
        paths, sides = self.agent.paths, self.agent.relay_client
        assert isinstance(paths, FakePaths) and isinstance(sides, FakeSides)
        self.paths, self.sides, self.status = paths, sides, tmp / "run" / STATUS_FILE
        self.near_id, self.near = member("near", "203.0.113.30", relay_ports=(29100, 256))
        self.far_id, self.far = member("far", "203.0.113.31", relay_ports=(29100, 256))
        self.peer_id, self.peer = member("peer", "198.51.100.7")
        self.peer_says(near=50, far=5)
        self.agent.members_known = True
        self.keys = {
            k.record.info.hostname: k.record.info.public_key for k in (self.near, self.far)
        }
        self.peer_raw = base64.b64decode(self.peer.record.info.public_key)
        self.at = {
            "near": Endpoint(ipaddress.ip_address("203.0.113.30"), 51820),
            "far": Endpoint(ipaddress.ip_address("203.0.113.31"), 51820),
        }

    def peer_says(self, near: int, far: int) -> None:
        rtts = tuple(sorted(((self.near_id, near), (self.far_id, far))))
        info = replace(self.peer.record.info, relay_rtts=rtts)
        self.peer = Known(replace(self.peer.record, info=info))
        self.agent.membership = Membership(
            {self.near_id: self.near, self.far_id: self.far, self.peer_id: self.peer}
        )

    def step(self, seconds: float = 0.5) -> None:
        self.clock.now += seconds
        self.agent.reconcile()

    def relays_up(self) -> None:
        """The relays answer (the peer never does)."""
        self.agent.reconcile()
        for name in ("near", "far"):
            self.kernel.receive(self.keys[name], 92, 1_800_000_000 + self.clock.now)
        self.step()
        self.step()

    def timed(self, near: tuple[float, ...], far: tuple[float, ...]) -> None:
        """What the path checker has timed of each relay, then a pass."""
        self.paths.timings = {
            (self.keys["near"], self.at["near"]): near,
            (self.keys["far"], self.at["far"]): far,
        }
        self.step()


def test_relays_are_timed_and_the_figures_published_at_once(
    tmp_path: Path, cluster_id: str, cluster_secret: str
) -> None:
    lab = RelayLab(tmp_path, cluster_id, cluster_secret)
    lab.relays_up()
    # Both relays are up: each is timed at its WireGuard endpoint, every second while it
    # has fewer than three round trips, and nothing is said of it meanwhile.
    assert sorted(lab.paths.measured) == sorted((lab.keys[n], lab.at[n]) for n in lab.at)
    assert lab.agent._wake_at is not None and lab.agent._wake_at <= lab.clock.now + 1.0
    lab.clock.now = lab.agent._wake_at
    lab.timed(near=(0.004,), far=(0.090, 0.040))
    assert len(lab.paths.measured) == 4
    assert lab.agent.registration is not None
    assert lab.agent.registration.record.info.relay_rtts == ()
    # Three each: the lowest is the figure (what a busy host adds to one answer is noise);
    # in its record at once, and in its status.
    lab.timed(near=(0.004, 0.009, 0.006), far=(0.090, 0.040, 0.055))
    published = tuple(sorted(((lab.near_id, 4), (lab.far_id, 40))))
    assert lab.agent.registration.record.info.relay_rtts == published
    status = json.loads(lab.status.read_text())
    assert {(r["name"], r["rtt_ms"]) for r in status["node"]["relays"]} == {
        ("near", 4),
        ("far", 40),
    }
    # Timed again after RTT_SAMPLE_EVERY while a peer is not up directly...
    timed = len(lab.paths.measured)
    lab.step(RTT_SAMPLE_EVERY - 1.0)
    assert len(lab.paths.measured) == timed
    lab.step(1.0)
    assert len(lab.paths.measured) == timed + 2
    # ... and once a minute when every peer is up directly and nothing is relayed.
    lab.agent.membership = Membership({lab.near_id: lab.near, lab.far_id: lab.far})
    lab.step()
    timed = len(lab.paths.measured)
    lab.step(RTT_SAMPLE_EVERY + 1.0)
    assert len(lab.paths.measured) == timed
    lab.step(RTT_IDLE_SAMPLE_EVERY)
    assert len(lab.paths.measured) == timed + 2


def test_a_pair_ranks_relays_by_the_round_trips_both_sides_published(
    tmp_path: Path, cluster_id: str, cluster_secret: str
) -> None:
    lab = RelayLab(tmp_path, cluster_id, cluster_secret)
    lab.relays_up()
    lab.timed(near=(0.004, 0.004, 0.004), far=(0.040, 0.040, 0.040))
    # The peer has had its chance to come up directly: a relay is wanted for it, and the
    # order is by the sum: far (40 + 5) before near (4 + 50).
    lab.step(RELAY_AFTER)
    assert [o.name for o in lab.sides.wanted[lab.peer_raw]] == ["far", "near"]
    assert lab.sides.nearer == frozenset()
    # Bound at `near` (chosen before the figures were known), paired: 9 ms is no reason
    # to move; once the peer says `near` is 150 ms away, both sides move to `far`.
    bound_at = Endpoint(ipaddress.ip_address("203.0.113.30"), 29110)
    near_offer = lab.sides.wanted[lab.peer_raw][1]
    lab.sides.bound_now = {lab.peer_raw: Bound(near_offer, bound_at, True)}
    lab.step()
    assert lab.sides.nearer == frozenset()
    lab.peer_says(near=150, far=5)
    lab.step()
    assert [o.name for o in lab.sides.wanted[lab.peer_raw]] == ["far", "near"]
    assert lab.sides.nearer == frozenset({lab.peer_raw})
