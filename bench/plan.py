"""Time the pure planner and diff for clusters of 10, 100 and 1,000 members.

Prints `name=value` lines: plan_ms_N (plan + diff against an empty kernel), noop_ms_N (plan +
diff when the kernel already matches, the steady-state cost of every reconcile tick) and
noop_ops_N (operations a no-change pass produces: must be 0), idle_pass_ms_N (plan + diff in
the steady state of an idle mesh: every peer up, tracked from the pass before, its probes
answered, passes two seconds apart). The baseline for the ratios is the 10-member run in the
same process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from kubespan.model import Member, ObservedLink, ObservedPeer
from kubespan.plan.dataplane import RP_FILTER_OFF, ObservedRouting, expected_ruleset
from kubespan.plan.desired import plan
from kubespan.plan.diff import diff

from workload import median_ms, members, plan_input

SIZES = (10, 100, 1000)


def matching_kernel(group: tuple[Member, ...]) -> tuple[ObservedLink, ObservedRouting]:
    """What the kernel holds once the desired state for `group` has been applied."""
    result = plan(plan_input(group, None))
    link = result.desired.link
    routing = ObservedRouting(
        ruleset=expected_ruleset(result.desired.ruleset),
        rules=result.desired.routing.rules,
        routes=result.desired.routing.routes,
        rp_filter=RP_FILTER_OFF,
    )
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
    ), routing


def idle_passes(
    group: tuple[Member, ...], observed: ObservedLink, routing: ObservedRouting
) -> Callable[[], object]:
    """One pass after another of an idle mesh: each call is the next pass, 2 s later, with
    every peer's receive counter grown (its probe answered) and the tracking carried over."""
    state: dict[str, Any] = {"now": 1_000_000.0, "tracking": {}, "observed": observed}

    def one_pass() -> object:
        state["now"] += 2.0
        now = state["now"]
        link = state["observed"]
        link = replace(
            link,
            peers=tuple(
                replace(p, rx_bytes=p.rx_bytes + 96, last_handshake=now - 30) for p in link.peers
            ),
        )
        state["observed"] = link
        planned = plan(
            replace(plan_input(group, link), now=now, wall=now, tracking=state["tracking"])
        )
        state["tracking"] = planned.tracking
        return diff(planned.desired, link, routing)

    for _ in range(10):  # past the first passes: every peer tracked and up
        one_pass()
    return one_pass


def main() -> None:
    baseline: dict[str, float] = {}
    for size in SIZES:
        group = members(size)
        observed, routing = matching_kernel(group)
        repeat = max(5, 2000 // size)

        def full(group: tuple[Member, ...] = group) -> object:
            return diff(plan(plan_input(group, None)).desired, None, None)

        def noop(
            group: tuple[Member, ...] = group,
            observed: ObservedLink = observed,
            routing: ObservedRouting = routing,
        ) -> object:
            return diff(plan(plan_input(group, observed)).desired, observed, routing)

        figures = {
            "plan_ms": median_ms(full, repeat),
            "noop_ms": median_ms(noop, repeat),
            "idle_pass_ms": median_ms(idle_passes(group, observed, routing), repeat),
        }
        noop_ops = len(diff(plan(plan_input(group, observed)).desired, observed, routing))
        for name, value in figures.items():
            baseline.setdefault(name, value)
            print(f"{name}_{size}={value:.3f}")
            print(f"{name}_{size}_ratio_to_{SIZES[0]}={value / baseline[name]:.1f}")
        print(f"noop_ops_{size}={noop_ops}")


if __name__ == "__main__":
    main()
