"""The discovery service's in-memory state: clusters of affiliates with TTLs and revisions.

A pure model: every method takes `now` (wall-clock seconds) and nothing here does I/O. The
revision counter is shared by all clusters and only grows, so a watcher's revision stays
meaningful even when a cluster empties and fills again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubespan.discovery import limits
from kubespan.discovery.protocol import BadRequest, Listing, PutAffiliate, WireAffiliate


@dataclass
class AffiliateRecord:
    data: bytes
    endpoints: list[bytes]
    expires_at: float


@dataclass
class Cluster:
    affiliates: dict[str, AffiliateRecord] = field(default_factory=dict)
    revision: int = 0


class Registry:
    def __init__(self) -> None:
        self.clusters: dict[str, Cluster] = {}
        self.revision = 0

    def _bump(self, cluster: Cluster) -> int:
        self.revision += 1
        cluster.revision = self.revision
        return self.revision

    def put(self, cluster_id: str, affiliate_id: str, request: PutAffiliate, now: float) -> int:
        cluster = self.clusters.get(cluster_id)
        if cluster is None:
            cluster = self.clusters[cluster_id] = Cluster()
        record = cluster.affiliates.get(affiliate_id)
        if record is None and len(cluster.affiliates) >= limits.MAX_AFFILIATES_PER_CLUSTER:
            raise BadRequest(
                "affiliate",
                f"cluster already has {limits.MAX_AFFILIATES_PER_CLUSTER} affiliates",
                status=409,
            )
        endpoints = list(dict.fromkeys(request.endpoints))
        expires_at = now + request.ttl
        if record is not None and record.data == request.data and record.endpoints == endpoints:
            record.expires_at = expires_at
            return cluster.revision
        cluster.affiliates[affiliate_id] = AffiliateRecord(request.data, endpoints, expires_at)
        return self._bump(cluster)

    def delete(self, cluster_id: str, affiliate_id: str) -> int:
        cluster = self.clusters.get(cluster_id)
        if cluster is None or cluster.affiliates.pop(affiliate_id, None) is None:
            return cluster.revision if cluster else self.revision
        return self._bump(cluster)

    def listing(self, cluster_id: str, now: float) -> Listing:
        cluster = self.clusters.get(cluster_id)
        if cluster is None:
            return Listing(0, ())
        affiliates = tuple(
            WireAffiliate(aid, r.data, tuple(r.endpoints), r.expires_at - now)
            for aid, r in sorted(cluster.affiliates.items())
            if r.expires_at > now
        )
        return Listing(cluster.revision, affiliates)

    def cluster_revision(self, cluster_id: str) -> int:
        cluster = self.clusters.get(cluster_id)
        return cluster.revision if cluster else 0

    def collect_garbage(self, now: float) -> set[str]:
        """Drop expired affiliates and empty clusters; the ids of clusters that changed."""
        changed: set[str] = set()
        for cluster_id, cluster in list(self.clusters.items()):
            expired = [aid for aid, r in cluster.affiliates.items() if r.expires_at <= now]
            for aid in expired:
                del cluster.affiliates[aid]
            if expired:
                self._bump(cluster)
                changed.add(cluster_id)
            if not cluster.affiliates:
                del self.clusters[cluster_id]
        return changed

    def affiliate_count(self) -> int:
        return sum(len(c.affiliates) for c in self.clusters.values())

    def to_snapshot(self) -> dict[str, Any]:
        return {
            "version": 1,
            "revision": self.revision,
            "clusters": {
                cid: {
                    "revision": c.revision,
                    "affiliates": {
                        aid: {
                            "data": r.data.hex(),
                            "endpoints": [e.hex() for e in r.endpoints],
                            "expires_at": r.expires_at,
                        }
                        for aid, r in c.affiliates.items()
                    },
                }
                for cid, c in self.clusters.items()
            },
        }

    @classmethod
    def from_snapshot(cls, document: Any, now: float) -> Registry:
        """Rebuild from `to_snapshot` output; ValueError when anything is malformed."""
        if not isinstance(document, dict) or document.get("version") != 1:
            raise ValueError("not a version 1 snapshot")
        registry = cls()
        registry.revision = _int(document.get("revision"), "revision")
        clusters = document.get("clusters")
        if not isinstance(clusters, dict):
            raise ValueError("clusters is not a mapping")
        for cid, raw_cluster in clusters.items():
            if not isinstance(raw_cluster, dict) or not isinstance(
                raw_cluster.get("affiliates"), dict
            ):
                raise ValueError(f"cluster {cid} is malformed")
            cluster = Cluster(revision=_int(raw_cluster.get("revision"), f"{cid}.revision"))
            for aid, raw in raw_cluster["affiliates"].items():
                try:
                    record = AffiliateRecord(
                        data=bytes.fromhex(raw["data"]),
                        endpoints=[bytes.fromhex(e) for e in raw["endpoints"]],
                        expires_at=float(raw["expires_at"]),
                    )
                except (KeyError, TypeError, ValueError):
                    raise ValueError(f"affiliate {cid}/{aid} is malformed") from None
                if record.expires_at > now:
                    cluster.affiliates[aid] = record
            if cluster.revision > registry.revision:
                raise ValueError(f"cluster {cid} has a revision beyond the global one")
            if cluster.affiliates:
                registry.clusters[cid] = cluster
        return registry


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} is not a non-negative integer")
    return value
