"""The service's pure state model: TTLs, revisions, limits, snapshots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubespan.discovery import limits, snapshot
from kubespan.discovery.protocol import BadRequest, Listing, PutAffiliate
from kubespan.discovery.state import Quotas, Registry
from kubespan.discovery.view import ClusterView


def put(registry: Registry, cluster: str, aff: str, data: bytes, now: float, ttl: int = 60) -> int:
    return registry.put(cluster, aff, PutAffiliate(data, (b"e1", b"e2", b"e1"), ttl), now)


def test_put_bumps_revision_only_on_change_and_per_cluster() -> None:
    registry = Registry()
    first = put(registry, "c", "a", b"x", 0)
    assert put(registry, "c", "a", b"x", 10) == first
    assert put(registry, "c", "b", b"y", 10) == first + 1
    put(registry, "other", "a", b"x", 10)
    put(registry, "other", "b", b"x", 10)
    # Another cluster's activity shows nowhere in this one's numbers.
    assert put(registry, "c", "c", b"z", 10) == first + 2
    listing = registry.listing("c", 20)
    assert listing.revision == first + 2
    assert [a.id for a in listing.affiliates] == ["a", "b", "c"]
    assert listing.affiliates[0].endpoints == (b"e1", b"e2")
    assert listing.affiliates[0].ttl == pytest.approx(50)  # refreshed at 10 for 60 s


def test_identical_put_extends_the_ttl() -> None:
    registry = Registry()
    put(registry, "c", "a", b"x", 0, ttl=10)
    put(registry, "c", "a", b"x", 8, ttl=10)
    assert [a.id for a in registry.listing("c", 15).affiliates] == ["a"]


def test_expired_affiliates_vanish_and_bump_the_revision() -> None:
    registry = Registry()
    put(registry, "c", "a", b"x", 0, ttl=10)
    put(registry, "c", "b", b"x", 0, ttl=100)
    assert [a.id for a in registry.listing("c", 11).affiliates] == ["b"]
    before = registry.cluster_revision("c")
    assert registry.collect_garbage(11) == {"c"}
    assert registry.cluster_revision("c") == before + 1
    assert registry.collect_garbage(200) == {"c"}
    assert "c" not in registry.clusters
    assert registry.listing("c", 200).affiliates == ()


def test_revisions_never_go_back_when_a_cluster_returns() -> None:
    registry = Registry()
    seen = put(registry, "c", "a", b"x", 0, ttl=1)
    registry.collect_garbage(5)
    assert "c" not in registry.clusters
    again = put(registry, "c", "a", b"x", 6)
    assert again > seen + 1
    # A watcher of the old cluster is not mistaken for an up-to-date one.
    assert registry.listing("c", 7, since=seen).reset


def test_delete() -> None:
    registry = Registry()
    first = put(registry, "c", "a", b"x", 0)
    put(registry, "c", "b", b"x", 0)
    assert registry.delete("c", "a") == first + 2
    assert registry.delete("c", "a") == first + 2
    assert [a.id for a in registry.listing("c", 1).affiliates] == ["b"]


def test_member_limit() -> None:
    registry = Registry()
    for index in range(limits.MAX_AFFILIATES_PER_CLUSTER):
        put(registry, "c", f"a{index}", b"x", 0)
    with pytest.raises(BadRequest) as caught:
        put(registry, "c", "one-too-many", b"x", 0)
    assert caught.value.status == 409
    put(registry, "c", "a0", b"changed", 0)


def save(registry: Registry, state_dir: Path, clean: bool = False) -> None:
    snapshot.save(snapshot.capture(registry, [], clean, 0), state_dir)


def test_snapshot_round_trip_keeps_remaining_ttls(tmp_path: Path) -> None:
    registry = Registry()
    put(registry, "c", "a", b"x", 1000, ttl=100)
    put(registry, "c", "b", b"y", 1000, ttl=10)
    registry.add_endpoints("c", "a", (b"h1",), 60, 1000, "192.0.2.9")
    save(registry, tmp_path)
    restored = snapshot.load(tmp_path, 1050).registry
    listing = restored.listing("c", 1050)
    assert [a.id for a in listing.affiliates] == ["a"]
    assert listing.affiliates[0].ttl == pytest.approx(50)
    assert listing.affiliates[0].endpoints == (b"e1", b"e2", b"h1")
    assert restored.cluster_revision("c") == registry.cluster_revision("c")
    assert restored.stored_bytes == registry.stored_bytes - len(b"y") - 4
    assert (tmp_path / snapshot.SNAPSHOT_FILE).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b'{"version": 3}',
        b'{"version": 1, "revision": 1, "clusters": {"c": {"revision": 1, "affiliates": '
        b'{"a": {"data": "zz", "endpoints": [], "expires_at": 1}}}}}',
        b'{"format": 2, "clusters": {"c\\n": {"revision": 5, "affiliates": {}}}}',
        b'{"format": 2, "clusters": {"c": {"revision": 1, "affiliates": '
        b'{"a": {"data": "eA==", "endpoints": [], "expires_at": NaN}}}}}',
        b'{"format": 2, "clusters": {"c": {"revision": 1, "affiliates": '
        b'{"a": {"data": "eA==", "endpoints": [], "expires_at": 1e999}}}}}',
        b"[" * 100_000,
        b'{"format": 2, "clusters": ' + b"[" * 50 + b"]" * 50 + b"}",
        b"\xff\xfe",
    ],
)
def test_corrupt_snapshot_is_set_aside(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / snapshot.SNAPSHOT_FILE
    path.write_bytes(content)
    registry = snapshot.load(tmp_path, 0).registry
    assert registry.clusters == {}
    assert not path.exists()
    kept = list(tmp_path.glob(f"{snapshot.SNAPSHOT_FILE}.corrupt-*"))
    assert len(kept) == 1
    assert kept[0].read_bytes() == content
    assert "SNAPSHOT IS CORRUPT" in caplog.text


def test_snapshot_holds_only_opaque_blobs(tmp_path: Path) -> None:
    registry = Registry()
    put(registry, "c", "a", b"\x01sealed", 0)
    save(registry, tmp_path)
    document = json.loads((tmp_path / snapshot.SNAPSHOT_FILE).read_text())
    assert document["clusters"]["c"]["affiliates"]["a"]["data"] == "AXNlYWxlZA=="


def ids(listing: Listing) -> list[str]:
    return [a.id for a in listing.affiliates]


def test_deltas_carry_exactly_what_changed_since() -> None:
    registry = Registry()
    first = put(registry, "c", "a", b"x", 0)
    put(registry, "c", "b", b"y", 0)
    put(registry, "other", "z", b"z", 0)
    delta = registry.listing("c", 1, since=first)
    assert not delta.reset
    assert ids(delta) == ["b"]
    registry.delete("c", "a")
    put(registry, "c", "b", b"y2", 1)
    delta = registry.listing("c", 2, since=first)
    assert ids(delta) == ["b"]
    assert delta.removed == ("a",)
    assert registry.listing("c", 2, since=delta.revision).affiliates == ()


def test_expired_affiliates_appear_as_removed() -> None:
    registry = Registry()
    seen = put(registry, "c", "a", b"x", 0, ttl=10)
    put(registry, "c", "b", b"x", 0, ttl=100)
    seen = registry.cluster_revision("c")
    registry.collect_garbage(20)
    delta = registry.listing("c", 20, since=seen)
    assert delta.removed == ("a",)


def test_a_watcher_older_than_the_log_gets_a_reset() -> None:
    registry = Registry()
    start = put(registry, "c", "a", b"0", 0)
    for index in range(limits.CHANGE_LOG_LENGTH + 5):
        put(registry, "c", "a", str(index).encode(), 0)
    assert registry.listing("c", 1, since=start).reset
    recent = registry.cluster_revision("c") - 3
    assert not registry.listing("c", 1, since=recent).reset


def test_harvested_endpoints_merge_dedupe_and_expire() -> None:
    registry = Registry()
    put(registry, "c", "a", b"x", 0, ttl=1000)
    before = registry.cluster_revision("c")
    assert registry.add_endpoints("c", "a", (b"e1", b"h1"), 30, 0) > before
    unchanged = registry.cluster_revision("c")
    assert registry.add_endpoints("c", "a", (b"h1",), 30, 1) == unchanged
    (affiliate,) = registry.listing("c", 2).affiliates
    assert affiliate.endpoints == (b"e1", b"e2", b"h1")
    put(registry, "c", "a", b"x2", 3, ttl=1000)
    assert registry.listing("c", 4).affiliates[0].endpoints == (b"e1", b"e2", b"h1")
    assert registry.collect_garbage(40) == {"c"}
    assert registry.listing("c", 40).affiliates[0].endpoints == (b"e1", b"e2")
    with pytest.raises(BadRequest) as caught:
        registry.add_endpoints("c", "nobody", (b"h",), 30, 0)
    assert caught.value.status == 404


def test_client_view_follows_resets_and_deltas() -> None:
    registry = Registry()
    view = ClusterView()
    put(registry, "c", "a", b"x", 0)
    assert view.apply(registry.listing("c", 0))
    revision = view.revision
    put(registry, "c", "b", b"y", 0)
    registry.delete("c", "a")
    assert view.apply(registry.listing("c", 0, since=revision))
    assert sorted(view.affiliates) == ["b"]
    assert not view.apply(registry.listing("c", 0, since=view.revision))
    assert view.listing().reset


def test_harvest_squatting_is_bounded_and_cleared_by_re_registration() -> None:
    registry = Registry()
    put(registry, "c", "victim", b"x", 0, ttl=1800)
    squat = tuple(f"s{i}".encode() for i in range(64))
    registry.add_endpoints("c", "victim", squat, 86400, 0, reporter="203.0.113.66")
    (listed,) = registry.listing("c", 1).affiliates
    # One reporter holds at most its share, never the whole list.
    assert len(listed.endpoints) == 2 + limits.MAX_HARVESTED_PER_REPORTER
    # Genuine harvests from other members are stored, the oldest giving way when full.
    for reporter in range(10):
        genuine = tuple(f"g{reporter}-{i}".encode() for i in range(8))
        registry.add_endpoints("c", "victim", genuine, 1800, 1, reporter=f"198.51.100.{reporter}")
    (listed,) = registry.listing("c", 2).affiliates
    assert b"g9-7" in listed.endpoints
    assert len(listed.endpoints) == limits.MAX_ENDPOINTS_PER_AFFILIATE
    # Harvests never outlive the affiliate's own registration ...
    registry.add_endpoints("c", "victim", (b"late",), 86400, 2, reporter="203.0.113.66")
    victim = registry.clusters["c"].affiliates["victim"]
    assert max(h.expires_at for _, h in victim.harvested) <= victim.expires_at
    # ... and a new registration (other endpoints) starts clean.
    registry.put("c", "victim", PutAffiliate(b"x2", (b"e3",), 1800), 3)
    (listed,) = registry.listing("c", 4).affiliates
    assert listed.endpoints == (b"e3",)


def test_global_quotas_answer_507_and_new_clusters_per_source_429() -> None:
    registry = Registry(quotas=Quotas(max_affiliates=3, max_stored_bytes=10_000))
    for index in range(3):
        put(registry, f"c{index}", "a", b"x", 0)
    with pytest.raises(BadRequest) as caught:
        put(registry, "c0", "b", b"x", 0)
    assert (caught.value.status, caught.value.field) == (507, "affiliate")
    assert caught.value.retry > 0
    put(registry, "c0", "a", b"changed", 0)  # members already in can still update
    big = Registry(quotas=Quotas(max_stored_bytes=5000))
    with pytest.raises(BadRequest) as caught:
        big.put("c", "a", PutAffiliate(bytes(6000), (), 60), 0)
    assert caught.value.status == 507
    minting = Registry(quotas=Quotas(new_clusters_per_hour=5))
    for index in range(5):
        minting.put(f"k{index}", "a", PutAffiliate(b"x", (), 60), 0, "203.0.113.5")
    with pytest.raises(BadRequest) as caught:
        minting.put("k99", "a", PutAffiliate(b"x", (), 60), 0, "203.0.113.5")
    assert (caught.value.status, caught.value.field) == (429, "cluster")
    minting.put("k99", "a", PutAffiliate(b"x", (), 60), 0, "198.51.100.5")  # another source
    minting.put("k99", "b", PutAffiliate(b"x", (), 60), 0, "203.0.113.5")  # not a new cluster


def test_a_crash_never_reuses_a_revision_a_watcher_has_seen(tmp_path: Path) -> None:
    registry = Registry(epoch=5)
    put(registry, "c", "a", b"x", 0)
    save(registry, tmp_path)  # the last snapshot before the crash
    seen = put(registry, "c", "b", b"y", 1)  # a watcher saw this, then the service died
    restored = snapshot.load(tmp_path, 2)
    assert not restored.clean
    after = restored.registry
    after.start_epoch(restored.epoch + 1)
    # The watcher's revision is unknown to the restarted service: it gets everything.
    assert after.listing("c", 2, since=seen).reset
    new = put(after, "c", "late", b"z", 3)
    assert new > seen
    delta = after.listing("c", 3, since=seen)
    assert delta.reset and "late" in ids(delta)
    # A watcher that had exactly the snapshot's revision gets the change as a delta.
    floor = registry.listing("c", 0, since=None).revision - 1
    assert ids(after.listing("c", 3, since=floor)) == ["late"]


def test_an_epoch_switch_leaves_a_gap_that_resets_watchers() -> None:
    registry = Registry(epoch=1)
    before = put(registry, "c", "a", b"x", 0)
    registry.start_epoch(2)
    after = put(registry, "c", "a", b"y", 0)
    assert after == (2 << limits.EPOCH_SHIFT) + 1
    assert ids(registry.listing("c", 0, since=before)) == ["a"]
    assert not registry.listing("c", 0, since=before).reset
    assert registry.listing("c", 0, since=before + 1).reset  # never handed out
