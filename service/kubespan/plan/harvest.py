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
    up = sorted(
        (r for r in reports if r.state is PeerState.UP and r.endpoint is not None),
        key=lambda r: r.public_key,
    )
    if not up:
        return []
    # Only the up peers' members: at every pass, and most of a large mesh may be down.
    wanted = {r.public_key for r in up}
    advertised = {
        m.info.public_key: (m.info.node_id, {*m.endpoints, *m.hints})
        for m in members
        if m.info.public_key in wanted
    }
    out: list[Harvest] = []
    for report in up:
        assert report.endpoint is not None  # filtered above
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
