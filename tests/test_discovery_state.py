"""The service's pure state model: TTLs, revisions, limits, snapshots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubespan.discovery import limits, snapshot
from kubespan.discovery.protocol import BadRequest, Listing, PutAffiliate
from kubespan.discovery.state import Registry
from kubespan.discovery.view import ClusterView


def put(registry: Registry, cluster: str, aff: str, data: bytes, now: float, ttl: int = 60) -> int:
    return registry.put(cluster, aff, PutAffiliate(data, (b"e1", b"e2", b"e1"), ttl), now)


def test_put_bumps_revision_only_on_change() -> None:
    registry = Registry()
    assert put(registry, "c", "a", b"x", 0) == 1
    assert put(registry, "c", "a", b"x", 10) == 1
    assert put(registry, "c", "b", b"y", 10) == 2
    assert put(registry, "other", "a", b"x", 10) == 3
    listing = registry.listing("c", 20)
    assert listing.revision == 2
    assert [a.id for a in listing.affiliates] == ["a", "b"]
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
    assert registry.collect_garbage(11) == {"c"}
    assert registry.cluster_revision("c") == 3
    assert registry.collect_garbage(200) == {"c"}
    assert "c" not in registry.clusters
    assert registry.listing("c", 200).affiliates == ()


def test_revisions_never_go_back_when_a_cluster_returns() -> None:
    registry = Registry()
    put(registry, "c", "a", b"x", 0, ttl=1)
    registry.collect_garbage(5)
    assert put(registry, "c", "a", b"x", 6) > 2


def test_delete() -> None:
    registry = Registry()
    put(registry, "c", "a", b"x", 0)
    assert registry.delete("c", "a") == 2
    assert registry.delete("c", "a") == 2
    assert registry.listing("c", 1).affiliates == ()


def test_member_limit() -> None:
    registry = Registry()
    for index in range(limits.MAX_AFFILIATES_PER_CLUSTER):
        put(registry, "c", f"a{index}", b"x", 0)
    with pytest.raises(BadRequest) as caught:
        put(registry, "c", "one-too-many", b"x", 0)
    assert caught.value.status == 409
    put(registry, "c", "a0", b"changed", 0)


def test_snapshot_round_trip_keeps_remaining_ttls(tmp_path: Path) -> None:
    registry = Registry()
    put(registry, "c", "a", b"x", 1000, ttl=100)
    put(registry, "c", "b", b"y", 1000, ttl=10)
    snapshot.save(registry, tmp_path)
    restored = snapshot.load(tmp_path, 1050)
    listing = restored.listing("c", 1050)
    assert [a.id for a in listing.affiliates] == ["a"]
    assert listing.affiliates[0].ttl == pytest.approx(50)
    assert restored.revision == registry.revision
    assert (tmp_path / snapshot.SNAPSHOT_FILE).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b'{"version": 2}',
        b'{"version": 1, "revision": 1, "clusters": {"c": {"revision": 1, "affiliates": '
        b'{"a": {"data": "zz", "endpoints": [], "expires_at": 1}}}}}',
        b'{"version": 1, "revision": 1, "clusters": {"c": {"revision": 5, "affiliates": {}}}}',
    ],
)
def test_corrupt_snapshot_is_set_aside(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / snapshot.SNAPSHOT_FILE
    path.write_bytes(content)
    registry = snapshot.load(tmp_path, 0)
    assert registry.clusters == {}
    assert not path.exists()
    kept = list(tmp_path.glob(f"{snapshot.SNAPSHOT_FILE}.corrupt-*"))
    assert len(kept) == 1
    assert kept[0].read_bytes() == content
    assert "SNAPSHOT IS CORRUPT" in caplog.text


def test_snapshot_holds_only_opaque_blobs(tmp_path: Path) -> None:
    registry = Registry()
    put(registry, "c", "a", b"\x01sealed", 0)
    snapshot.save(registry, tmp_path)
    document = json.loads((tmp_path / snapshot.SNAPSHOT_FILE).read_text())
    assert document["clusters"]["c"]["affiliates"]["a"]["data"] == b"\x01sealed".hex()


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
