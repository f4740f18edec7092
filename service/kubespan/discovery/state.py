"""The discovery service's state: clusters of affiliates with TTLs, revisions and a change log.

A pure model: every method takes `now` (wall-clock seconds) and nothing here does I/O. The
revision counter is shared by all clusters and only grows. Each cluster keeps a bounded log
of which affiliates changed at which revision, so a watcher that comes back with the last
revision it saw gets exactly what changed since (or, when that is no longer known, the whole
listing marked as a reset).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from kubespan.discovery import limits
from kubespan.discovery.protocol import BadRequest, Listing, PutAffiliate, WireAffiliate


@dataclass
class AffiliateRecord:
    data: bytes
    endpoints: list[bytes]
    expires_at: float
    extra: dict[bytes, float] = field(default_factory=dict)  # harvested endpoint -> expiry

    def all_endpoints(self, now: float) -> tuple[bytes, ...]:
        merged = dict.fromkeys(self.endpoints)
        for blob, expires in self.extra.items():
            if expires > now:
                merged[blob] = None
        return tuple(merged)[: limits.MAX_ENDPOINTS_PER_AFFILIATE]


@dataclass
class Cluster:
    floor: int  # changes at or below this revision are no longer in the log
    affiliates: dict[str, AffiliateRecord] = field(default_factory=dict)
    revision: int = 0
    log: deque[tuple[int, str]] = field(
        default_factory=lambda: deque(maxlen=limits.CHANGE_LOG_LENGTH)
    )


class Registry:
    def __init__(self) -> None:
        self.clusters: dict[str, Cluster] = {}
        self.revision = 0

    def _cluster(self, cluster_id: str) -> Cluster:
        cluster = self.clusters.get(cluster_id)
        if cluster is None:
            cluster = self.clusters[cluster_id] = Cluster(floor=self.revision)
        return cluster

    def _changed(self, cluster: Cluster, affiliate_id: str) -> int:
        self.revision += 1
        cluster.revision = self.revision
        if len(cluster.log) == cluster.log.maxlen:
            cluster.floor = cluster.log[0][0]
        cluster.log.append((self.revision, affiliate_id))
        return self.revision

    def put(self, cluster_id: str, affiliate_id: str, request: PutAffiliate, now: float) -> int:
        cluster = self._cluster(cluster_id)
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
        extra = record.extra if record is not None else {}
        cluster.affiliates[affiliate_id] = AffiliateRecord(
            request.data, endpoints, expires_at, extra
        )
        return self._changed(cluster, affiliate_id)

    def add_endpoints(
        self, cluster_id: str, affiliate_id: str, endpoints: tuple[bytes, ...], ttl: int, now: float
    ) -> int:
        """Endpoints another member saw this affiliate at (harvested); each expires alone."""
        cluster = self.clusters.get(cluster_id)
        record = cluster.affiliates.get(affiliate_id) if cluster else None
        if cluster is None or record is None or record.expires_at <= now:
            raise BadRequest("affiliate", "no such affiliate in this cluster", status=404)
        before = record.all_endpoints(now)
        for blob in endpoints:
            if blob in record.extra or len(record.extra) < limits.MAX_ENDPOINTS_PER_AFFILIATE:
                record.extra[blob] = max(record.extra.get(blob, 0.0), now + ttl)
        if record.all_endpoints(now) == before:
            return cluster.revision
        return self._changed(cluster, affiliate_id)

    def delete(self, cluster_id: str, affiliate_id: str) -> int:
        cluster = self.clusters.get(cluster_id)
        if cluster is None or cluster.affiliates.pop(affiliate_id, None) is None:
            return cluster.revision if cluster else self.revision
        return self._changed(cluster, affiliate_id)

    def _wire(self, affiliate_id: str, record: AffiliateRecord, now: float) -> WireAffiliate:
        return WireAffiliate(
            affiliate_id, record.data, record.all_endpoints(now), record.expires_at - now
        )

    def listing(self, cluster_id: str, now: float, since: int | None = None) -> Listing:
        """Everything (a reset), or only what changed after `since` when the log has it."""
        cluster = self.clusters.get(cluster_id)
        if cluster is None:
            return Listing(0, (), (), reset=True)
        if since is None or since < cluster.floor or since > cluster.revision:
            affiliates = tuple(
                self._wire(aid, r, now)
                for aid, r in sorted(cluster.affiliates.items())
                if r.expires_at > now
            )
            return Listing(cluster.revision, affiliates, (), reset=True)
        changed = sorted({aid for revision, aid in cluster.log if revision > since})
        upserts: list[WireAffiliate] = []
        removed: list[str] = []
        for aid in changed:
            record = cluster.affiliates.get(aid)
            if record is None or record.expires_at <= now:
                removed.append(aid)
            else:
                upserts.append(self._wire(aid, record, now))
        return Listing(cluster.revision, tuple(upserts), tuple(removed), reset=False)

    def cluster_revision(self, cluster_id: str) -> int:
        cluster = self.clusters.get(cluster_id)
        return cluster.revision if cluster else 0

    def collect_garbage(self, now: float) -> set[str]:
        """Drop expired affiliates and harvested endpoints, and empty clusters; the ids of
        clusters whose listing changed."""
        changed: set[str] = set()
        for cluster_id, cluster in list(self.clusters.items()):
            for aid, record in list(cluster.affiliates.items()):
                if record.expires_at <= now:
                    del cluster.affiliates[aid]
                    self._changed(cluster, aid)
                    changed.add(cluster_id)
                    continue
                stale = [blob for blob, expires in record.extra.items() if expires <= now]
                if stale:
                    for blob in stale:
                        del record.extra[blob]
                    self._changed(cluster, aid)
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
                            "extra": {e.hex(): t for e, t in r.extra.items()},
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
        """Rebuild from `to_snapshot` output; ValueError when anything is malformed. The change
        log is not kept: watchers coming back get a reset listing."""
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
            revision = _int(raw_cluster.get("revision"), f"{cid}.revision")
            if revision > registry.revision:
                raise ValueError(f"cluster {cid} has a revision beyond the global one")
            cluster = Cluster(floor=registry.revision, revision=revision)
            for aid, raw in raw_cluster["affiliates"].items():
                record = _record(raw, f"{cid}/{aid}")
                if record.expires_at > now:
                    cluster.affiliates[aid] = record
            if cluster.affiliates:
                registry.clusters[cid] = cluster
        return registry


def _record(raw: Any, name: str) -> AffiliateRecord:
    try:
        return AffiliateRecord(
            data=bytes.fromhex(raw["data"]),
            endpoints=[bytes.fromhex(e) for e in raw["endpoints"]],
            expires_at=float(raw["expires_at"]),
            extra={bytes.fromhex(e): float(t) for e, t in raw.get("extra", {}).items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ValueError(f"affiliate {name} is malformed") from None


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} is not a non-negative integer")
    return value
