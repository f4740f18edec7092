"""Harvested endpoints: where a peer is actually seen (the source of its handshakes, i.e. its
NAT mapping), reported to discovery on its behalf so third nodes learn an address that works.

The reference reports every peer's endpoint on every pass, which loads the service with the
square of the cluster size. Here only endpoints a peer does not already advertise are
reported, each once per refresh interval, at most `budget` per pass.
"""

from __future__ import annotations

from collections.abc import Mapping

from kubespan.model import Member, PeerState
from kubespan.netaddr import Endpoint
from kubespan.plan.desired import PeerReport

Harvest = tuple[str, Endpoint]  # (member node id, endpoint it was seen at)


def harvest_candidates(
    members: tuple[Member, ...],
    reports: tuple[PeerReport, ...],
    reported: Mapping[Harvest, float],
    now: float,
    refresh: float,
    budget: int = 8,
) -> list[Harvest]:
    advertised = {m.info.public_key: (m.info.node_id, {*m.endpoints, *m.hints}) for m in members}
    out: list[Harvest] = []
    for report in sorted(reports, key=lambda r: r.public_key):
        if report.state is not PeerState.UP or report.endpoint is None:
            continue
        known = advertised.get(report.public_key)
        if known is None or report.endpoint in known[1]:
            continue
        key = (known[0], report.endpoint)
        last = reported.get(key)
        if last is not None and now - last < refresh:
            continue
        out.append(key)
        if len(out) == budget:
            break
    return out
