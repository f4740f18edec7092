"""The discovery service's state: clusters of affiliates with TTLs, revisions and a change log.

A pure model: every method takes `now` (wall-clock seconds) and nothing here does I/O.

Revisions are per cluster (one cluster's numbers say nothing about another's activity) and
are never handed out twice, even across a crash: a revision is EPOCH << EPOCH_SHIFT | n, the
service makes a new epoch durable before it serves (and before it switches epochs while
running), and a cluster's first change in an epoch jumps to that epoch's range. A watcher's
`since` is answered with a delta only when it is a revision this cluster really reported
and the change log still covers it; anything else (a revision from before a restart that
the snapshot does not have, a number from a gap, a cluster that was emptied and came back)
gets the whole cluster, marked reset.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from kubespan.discovery import limits
from kubespan.discovery.protocol import BadRequest, Listing, PutAffiliate, WireAffiliate
from kubespan.discovery.ratelimit import RateLimiter


@dataclass(frozen=True)
class Harvested:
    """An endpoint another member reported for this affiliate."""

    expires_at: float
    reporter: str  # the reporting source (IPv4 address or IPv6 /64)
    added_at: float


@dataclass(frozen=True)
class AffiliateRecord:
    data: bytes
    endpoints: tuple[bytes, ...]
    expires_at: float
    harvested: tuple[tuple[bytes, Harvested], ...] = ()  # oldest first

    @property
    def size(self) -> int:
        """Blob bytes this record stores (what quotas count)."""
        return (
            len(self.data)
            + sum(map(len, self.endpoints))
            + sum(len(blob) for blob, _ in self.harvested)
        )

    def all_endpoints(self, now: float) -> tuple[bytes, ...]:
        merged = dict.fromkeys(self.endpoints)
        for blob, entry in self.harvested:
            if entry.expires_at > now:
                merged[blob] = None
        return tuple(merged)[: limits.MAX_ENDPOINTS_PER_AFFILIATE]


@dataclass(frozen=True)
class Quotas:
    max_affiliates: int = limits.MAX_AFFILIATES_TOTAL
    max_stored_bytes: int = limits.MAX_STORED_BYTES
    new_clusters_per_hour: float = limits.NEW_CLUSTERS_PER_SOURCE_PER_HOUR


@dataclass
class Cluster:
    floor: int  # the oldest revision a delta can still be computed from
    revision: int
    affiliates: dict[str, AffiliateRecord] = field(default_factory=dict)
    log: deque[tuple[int, str]] = field(
        default_factory=lambda: deque(maxlen=limits.CHANGE_LOG_LENGTH)
    )
    gaps: list[tuple[int, int]] = field(default_factory=list)  # (a, b): nothing in between

    def knows(self, since: int) -> bool:
        """Whether `since` is a revision from which the log gives exactly what changed."""
        if since == self.floor:
            return True
        if since < self.floor or since > self.revision:
            return False
        return not any(low < since < high for low, high in self.gaps)


class Registry:
    def __init__(self, epoch: int = 0, quotas: Quotas | None = None) -> None:
        self.clusters: dict[str, Cluster] = {}
        self.quotas = quotas or Quotas()
        self.epoch = epoch
        self.needs_new_epoch = False
        self.affiliates = 0
        self.stored_bytes = 0
        # Last revisions of clusters emptied during this epoch, so one that comes back does
        # not count again through numbers its old watchers hold.
        self.tombstones: dict[str, int] = {}
        self.new_clusters = RateLimiter(
            self.quotas.new_clusters_per_hour / 3600, self.quotas.new_clusters_per_hour
        )

    # --- revisions ---------------------------------------------------------------------------

    @property
    def base(self) -> int:
        return self.epoch << limits.EPOCH_SHIFT

    def start_epoch(self, epoch: int) -> None:
        """Switch to `epoch` (the caller has made it durable first)."""
        if epoch <= self.epoch:
            raise ValueError(f"epoch {epoch} is not after {self.epoch}")
        self.epoch = epoch
        self.tombstones.clear()
        self.needs_new_epoch = False

    def _new_cluster(self, cluster_id: str) -> Cluster:
        start = max(self.tombstones.pop(cluster_id, 0), self.base)
        cluster = self.clusters[cluster_id] = Cluster(floor=start, revision=start)
        return cluster

    def _changed(self, cluster: Cluster, affiliate_id: str) -> int:
        revision = cluster.revision + 1
        if revision <= self.base:
            cluster.gaps.append((cluster.revision, self.base + 1))
            revision = self.base + 1
        if revision - self.base >= limits.MAX_COUNTER:
            self.needs_new_epoch = True
        if len(cluster.log) == cluster.log.maxlen:
            cluster.floor = cluster.log[0][0]
            cluster.gaps = [gap for gap in cluster.gaps if gap[1] > cluster.floor]
        cluster.log.append((revision, affiliate_id))
        cluster.revision = revision
        return revision

    # --- storage accounting -----------------------------------------------------------------

    def _store(self, cluster: Cluster, affiliate_id: str, record: AffiliateRecord | None) -> None:
        old = cluster.affiliates.get(affiliate_id)
        if old is not None:
            self.affiliates -= 1
            self.stored_bytes -= old.size
        if record is None:
            cluster.affiliates.pop(affiliate_id, None)
            return
        cluster.affiliates[affiliate_id] = record
        self.affiliates += 1
        self.stored_bytes += record.size

    def _check_room(self, old: AffiliateRecord | None, new_size: int) -> None:
        if old is None and self.affiliates >= self.quotas.max_affiliates:
            raise BadRequest(
                "affiliate",
                f"the service is full ({self.quotas.max_affiliates} affiliates); "
                "retry later or use another discovery service",
                status=507,
                retry=limits.QUOTA_RETRY_SECONDS,
            )
        grown = new_size - (old.size if old is not None else 0)
        if grown > 0 and self.stored_bytes + grown > self.quotas.max_stored_bytes:
            raise BadRequest(
                "data",
                "the service is full (stored bytes); retry later or use another discovery service",
                status=507,
                retry=limits.QUOTA_RETRY_SECONDS,
            )

    # --- requests ----------------------------------------------------------------------------

    def put(
        self,
        cluster_id: str,
        affiliate_id: str,
        request: PutAffiliate,
        now: float,
        source: str = "",
    ) -> int:
        cluster = self.clusters.get(cluster_id)
        record = cluster.affiliates.get(affiliate_id) if cluster else None
        if record is not None and record.expires_at <= now:
            record = None  # expired, not yet collected: this is a new registration
        full = cluster is not None and len(cluster.affiliates) >= limits.MAX_AFFILIATES_PER_CLUSTER
        if full and record is None:
            raise BadRequest(
                "affiliate",
                f"cluster already has {limits.MAX_AFFILIATES_PER_CLUSTER} affiliates",
                status=409,
            )
        endpoints = tuple(dict.fromkeys(request.endpoints))
        expires_at = now + request.ttl
        if record is not None and record.data == request.data and record.endpoints == endpoints:
            assert cluster is not None
            cluster.affiliates[affiliate_id] = AffiliateRecord(
                record.data, record.endpoints, expires_at, record.harvested
            )
            return cluster.revision
        # Harvested endpoints survive a refresh of the same registration, but not a new one:
        # a node that re-registers with other endpoints (or after it expired) starts clean,
        # so endpoints reported for it earlier (possibly by a squatter) go.
        keep = record is not None and set(record.endpoints) == set(endpoints)
        new = AffiliateRecord(
            request.data, endpoints, expires_at, record.harvested if keep and record else ()
        )
        self._check_room(record, new.size)
        if cluster is None:
            if not self.new_clusters.allow(source, now):
                raise BadRequest(
                    "cluster",
                    "too many new clusters from this source; at most "
                    f"{self.quotas.new_clusters_per_hour:g} an hour",
                    status=429,
                    retry=max(1, round(self.new_clusters.retry_after(source))),
                )
            cluster = self._new_cluster(cluster_id)
        self._store(cluster, affiliate_id, new)
        return self._changed(cluster, affiliate_id)

    def add_endpoints(
        self,
        cluster_id: str,
        affiliate_id: str,
        endpoints: tuple[bytes, ...],
        ttl: int,
        now: float,
        reporter: str = "",
    ) -> int:
        """Endpoints another member saw this affiliate at (harvested). Each expires alone,
        never after the affiliate itself; a reporter holds at most MAX_HARVESTED_PER_REPORTER
        of them and the affiliate MAX_ENDPOINTS_PER_AFFILIATE, the oldest giving way."""
        cluster = self.clusters.get(cluster_id)
        record = cluster.affiliates.get(affiliate_id) if cluster else None
        if cluster is None or record is None or record.expires_at <= now:
            raise BadRequest("affiliate", "no such affiliate in this cluster", status=404)
        expires_at = min(now + ttl, record.expires_at)
        harvested = OrderedDict(
            (blob, entry) for blob, entry in record.harvested if entry.expires_at > now
        )
        for blob in dict.fromkeys(endpoints):
            if blob in record.endpoints:
                continue  # the node advertises it itself
            known = harvested.pop(blob, None)
            keep_until = max(expires_at, known.expires_at if known else 0.0)
            harvested[blob] = Harvested(keep_until, reporter, now)
            mine = [b for b, entry in harvested.items() if entry.reporter == reporter]
            for oldest in mine[: max(0, len(mine) - limits.MAX_HARVESTED_PER_REPORTER)]:
                del harvested[oldest]
            # The listing shows at most MAX_ENDPOINTS_PER_AFFILIATE in all, the node's own
            # first: the newest harvests must fit in what is left.
            while len(harvested) > limits.MAX_ENDPOINTS_PER_AFFILIATE - len(record.endpoints):
                harvested.popitem(last=False)
        new = AffiliateRecord(
            record.data, record.endpoints, record.expires_at, tuple(harvested.items())
        )
        self._check_room(record, new.size)
        self._store(cluster, affiliate_id, new)
        if new.all_endpoints(now) == record.all_endpoints(now):
            return cluster.revision
        return self._changed(cluster, affiliate_id)

    def delete(self, cluster_id: str, affiliate_id: str) -> int:
        cluster = self.clusters.get(cluster_id)
        if cluster is None:
            return 0
        if affiliate_id not in cluster.affiliates:
            return cluster.revision
        self._store(cluster, affiliate_id, None)
        return self._changed(cluster, affiliate_id)

    def _wire(self, affiliate_id: str, record: AffiliateRecord, now: float) -> WireAffiliate:
        return WireAffiliate(
            affiliate_id, record.data, record.all_endpoints(now), record.expires_at - now
        )

    def listing(self, cluster_id: str, now: float, since: int | None = None) -> Listing:
        """Everything (a reset), or only what changed after `since` when that is known."""
        cluster = self.clusters.get(cluster_id)
        if cluster is None:
            return Listing(0, (), (), reset=True)
        if since is None or not cluster.knows(since):
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
                    self._store(cluster, aid, None)
                    self._changed(cluster, aid)
                    changed.add(cluster_id)
                    continue
                fresh = tuple((b, e) for b, e in record.harvested if e.expires_at > now)
                if len(fresh) != len(record.harvested):
                    self._store(
                        cluster,
                        aid,
                        AffiliateRecord(record.data, record.endpoints, record.expires_at, fresh),
                    )
                    self._changed(cluster, aid)
                    changed.add(cluster_id)
            if not cluster.affiliates:
                self.tombstones[cluster_id] = cluster.revision
                del self.clusters[cluster_id]
        if len(self.tombstones) > limits.MAX_TOMBSTONES:
            self.needs_new_epoch = True
        self.new_clusters.forget_idle(now)
        return changed

    def restore(self, cluster_id: str, revision: int, records: dict[str, AffiliateRecord]) -> None:
        """Add a cluster from a snapshot (its change log is not kept: watchers coming back
        with exactly `revision` get deltas, anyone else a reset)."""
        cluster = self.clusters[cluster_id] = Cluster(floor=revision, revision=revision)
        for aid, record in records.items():
            self._store(cluster, aid, record)

    def affiliate_count(self) -> int:
        return self.affiliates
