"""Harvested endpoints: only what a peer does not advertise, once per refresh, within a budget;
and end to end through the real service."""

from __future__ import annotations

import base64
import ipaddress
import os
import time
from dataclasses import replace
from pathlib import Path

from kubespan.discovery.client import DiscoveryClient
from kubespan.discovery.members import open_listing
from kubespan.model import AffiliateInfo, Member, PeerState
from kubespan.netaddr import Endpoint
from kubespan.plan.desired import PeerReport
from kubespan.plan.harvest import harvest_candidates

from agents import config_text, make_agent, running, wait_for
from servers import discovery_server


def member(n: int, endpoint: str) -> Member:
    info = AffiliateInfo(
        node_id=f"node{n}",
        hostname=f"node{n}",
        public_key=f"key{n}",
        ula=ipaddress.IPv6Address(f"fd00::{n}"),
        addresses=(),
    )
    return Member(info, (Endpoint.parse(endpoint),))


def report(n: int, endpoint: str, state: PeerState = PeerState.UP) -> PeerReport:
    return PeerReport(f"key{n}", f"node{n}", f"node{n}", state, Endpoint.parse(endpoint), 1.0, 0, 0)


def test_only_new_endpoints_of_up_peers_once_per_refresh_within_budget() -> None:
    members = tuple(member(n, f"192.0.2.{n}:51820") for n in range(1, 6))
    reports = (
        report(1, "192.0.2.1:51820"),  # advertised already
        report(2, "203.0.113.2:40000"),  # NAT mapping: new
        report(3, "203.0.113.3:40000", PeerState.DOWN),  # not up: not trusted
        report(4, "203.0.113.4:40000"),
        report(5, "203.0.113.5:40000"),
    )
    first = harvest_candidates(members, reports, {}, now=100, refresh=900, budget=2)
    assert first == [
        ("node2", Endpoint.parse("203.0.113.2:40000")),
        ("node4", Endpoint.parse("203.0.113.4:40000")),
    ]
    done = dict.fromkeys(first, 100.0)
    assert harvest_candidates(members, reports, done, now=200, refresh=900, budget=2) == [
        ("node5", Endpoint.parse("203.0.113.5:40000"))
    ]
    assert len(harvest_candidates(members, reports, done, now=1001, refresh=900, budget=8)) == 3


def test_a_roamed_endpoint_reaches_discovery(tmp_path: Path) -> None:
    cluster_id = base64.b64encode(os.urandom(32)).decode()
    secret = base64.b64encode(os.urandom(32)).decode()
    with discovery_server() as server:
        config = config_text(server.url, cluster_id, secret).replace(
            b"      enabled: true\n", b"      enabled: true\n      harvestExtraEndpoints: true\n", 1
        )
        alpha, alpha_kernel = make_agent(tmp_path, "alpha", 11, config)
        beta, _ = make_agent(tmp_path, "beta", 12, config)
        roamed = Endpoint.parse("203.0.113.12:41641")
        with running(alpha), running(beta):
            key = beta.identity.public_key_b64
            wait_for(
                lambda: (
                    alpha_kernel.link is not None
                    and any(p.public_key == key for p in alpha_kernel.link.peers)
                ),
                "alpha to configure beta",
            )
            # Beta's packets now come from behind a NAT: WireGuard roams, and handshakes.
            link = alpha_kernel.link
            assert link is not None
            alpha_kernel.link = replace(
                link,
                peers=tuple(
                    replace(p, endpoint=roamed, last_handshake=time.time())
                    if p.public_key == key
                    else p
                    for p in link.peers
                ),
            )
            client = DiscoveryClient(server.url, alpha.keys)

            def harvested() -> bool:
                members, _ = open_listing(alpha.keys, client.listing())
                return any(m.info.public_key == key and roamed in m.endpoints for m in members)

            wait_for(harvested, "beta's roamed endpoint in discovery")
