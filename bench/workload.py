"""Synthetic clusters for the benchmarks: members with addresses in 198.18.0.0/15 (the
benchmarking range, RFC 2544)."""

from __future__ import annotations

import base64
import ipaddress
import statistics
import time
from collections.abc import Callable

from kubespan.config import KubeSpanConfig
from kubespan.model import AffiliateInfo, Member, ObservedLink
from kubespan.netaddr import Endpoint
from kubespan.plan.desired import PlanInput

OWN_KEY = base64.b64encode(bytes([200]) * 32).decode()


def members(count: int, offset: int = 0, spacing: int = 2) -> tuple[Member, ...]:
    """`count` members; with spacing 2 no two addresses are adjacent, so nothing collapses."""
    out = []
    for index in range(count):
        address = ipaddress.IPv4Address(0xC6120000 + spacing * (index + offset) + 1)
        info = AffiliateInfo(
            node_id=f"node{index}",
            hostname=f"node{index}",
            public_key=base64.b64encode(index.to_bytes(32, "big")).decode(),
            ula=ipaddress.IPv6Address(f"fd00::{index + 1:x}"),
            addresses=(address,),
        )
        out.append(Member(info, (Endpoint(address, 51820),)))
    return tuple(out)


def plan_input(group: tuple[Member, ...], observed: ObservedLink | None) -> PlanInput:
    return PlanInput(
        config=KubeSpanConfig(enabled=True),
        public_key=OWN_KEY,
        private_key=OWN_KEY,
        preshared_key=OWN_KEY,
        ula=ipaddress.IPv6Address("fd00::ffff"),
        own_addresses=(ipaddress.ip_address("192.0.2.1"),),
        members=group,
        observed=observed,
        tracking={},
        now=1_000_000.0,
        wall=1_000_000.0,
    )


def median_ms(action: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)
