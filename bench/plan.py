"""Time the pure planner and diff for clusters of 10, 100 and 1,000 members.

Prints `name=value` lines: plan_ms_N (plan + diff against an empty kernel), noop_ms_N (plan +
diff when the kernel already matches, the steady-state cost of every reconcile tick) and
noop_ops_N (operations a no-change pass produces: must be 0). The baseline for the ratios is
the 10-member run in the same process.
"""

from __future__ import annotations

import base64
import ipaddress
import statistics
import time
from collections.abc import Callable

from kubespan.config import KubeSpanConfig
from kubespan.model import AffiliateInfo, Member, ObservedLink, ObservedPeer
from kubespan.netaddr import Endpoint
from kubespan.plan.desired import PlanInput, plan
from kubespan.plan.diff import diff

SIZES = (10, 100, 1000)


def members(count: int) -> tuple[Member, ...]:
    out = []
    for index in range(count):
        address = ipaddress.ip_address(0xC6120000 + index + 1)  # 198.18.0.0/15 benchmark range
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
    key = base64.b64encode(bytes([200]) * 32).decode()
    return PlanInput(
        config=KubeSpanConfig(enabled=True),
        public_key=key,
        private_key=key,
        preshared_key=key,
        ula=ipaddress.IPv6Address("fd00::ffff"),
        own_addresses=(ipaddress.ip_address("192.0.2.1"),),
        members=group,
        observed=observed,
        tracking={},
        now=1_000_000.0,
    )


def matching_kernel(group: tuple[Member, ...]) -> ObservedLink:
    """What the kernel holds once the desired state for `group` has been applied."""
    result = plan(plan_input(group, None))
    link = result.desired.link
    return ObservedLink(
        mtu=link.mtu,
        up=True,
        addresses=(link.address,),
        private_key=link.private_key,
        listen_port=link.listen_port,
        fwmark=link.fwmark,
        peers=tuple(
            ObservedPeer(
                p.public_key,
                p.endpoint,
                p.allowed_ips,
                p.keepalive,
                999_990.0,
                1,
                1,
                link.preshared_key,
            )
            for p in result.desired.peers
        ),
    )


def median_ms(action: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def main() -> None:
    baseline: dict[str, float] = {}
    for size in SIZES:
        group = members(size)
        observed = matching_kernel(group)
        repeat = max(5, 2000 // size)

        def full(group: tuple[Member, ...] = group) -> object:
            return diff(plan(plan_input(group, None)).desired, None)

        def noop(group: tuple[Member, ...] = group, observed: ObservedLink = observed) -> object:
            return diff(plan(plan_input(group, observed)).desired, observed)

        figures = {"plan_ms": median_ms(full, repeat), "noop_ms": median_ms(noop, repeat)}
        noop_ops = len(diff(plan(plan_input(group, observed)).desired, observed))
        for name, value in figures.items():
            baseline.setdefault(name, value)
            print(f"{name}_{size}={value:.3f}")
            print(f"{name}_{size}_ratio_to_{SIZES[0]}={value / baseline[name]:.1f}")
        print(f"noop_ops_{size}={noop_ops}")


if __name__ == "__main__":
    main()
