"""The membership fold: absence proves nothing, versions only go up, a sealed leave or a
sealed expiry with a dead tunnel removes a member, and the peer cache keeps all of it."""

from __future__ import annotations

import ipaddress
import json
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from kubespan.agent.peercache import (
    PEERS_FILE,
    VersionCounter,
    load_membership,
    save_membership,
)
from kubespan.discovery.payload import sign_record
from kubespan.identity import Identity, identity_from_key
from kubespan.model import AffiliateInfo, ListedRecord, MemberRecord
from kubespan.netaddr import Endpoint
from kubespan.plan.membership import (
    MAX_RECORD_LIFETIME_SECONDS,
    TOMBSTONE_MARGIN_SECONDS,
    Membership,
    absorb,
    expire,
)

NOW = 1_800_000_000.0
OWN = "self"


def identity(n: int) -> Identity:
    return identity_from_key(bytes([n]) * 32)


def key(n: int) -> str:
    return identity(n).public_key_b64


def node(n: int) -> str:
    return identity(n).node_id


def rec(
    n: int,
    version: int,
    address: str | None = None,
    valid_until: float = NOW + 1800,
    leave: bool = False,
) -> ListedRecord:
    address = address or f"192.0.2.{n}"
    info = AffiliateInfo(
        node_id=node(n),
        hostname=f"node{n}",
        public_key=key(n),
        ula=ipaddress.IPv6Address(f"fd00::{n}"),
        addresses=(ipaddress.ip_address(address),),
    )
    endpoint = Endpoint(ipaddress.ip_address(address), 51820)
    unsigned = MemberRecord(info, (endpoint,), version, int(valid_until), leave)
    return ListedRecord(sign_record(unsigned, identity(n).private_key, bytes(64)))


def fold(*listings: tuple[ListedRecord, ...], now: float = NOW) -> Membership:
    membership = Membership()
    for listing in listings:
        membership, _ = absorb(membership, listing, OWN, now)
    return membership


def addresses(membership: Membership) -> dict[str, str]:
    return {m.info.hostname: str(m.info.addresses[0]) for m in membership.members()}


def test_absence_from_a_listing_removes_nobody() -> None:
    full = fold((rec(1, 5), rec(2, 5)))
    assert addresses(fold((rec(1, 5), rec(2, 5)), ())) == addresses(full)
    assert addresses(fold((rec(1, 5), rec(2, 5)), (rec(1, 5),))) == addresses(full)


def test_an_older_record_served_again_is_ignored_the_newest_wins() -> None:
    membership = fold((rec(1, 5, "192.0.2.50"),), (rec(1, 9, "192.0.2.90"),))
    assert addresses(membership) == {"node1": "192.0.2.90"}
    rolled_back, changes = absorb(membership, (rec(1, 5, "192.0.2.50"),), OWN, NOW)
    assert rolled_back == membership and changes == []
    # Two services that disagree: whichever order, the newest record wins.
    assert addresses(fold((rec(1, 9, "192.0.2.90"),), (rec(1, 5, "192.0.2.50"),))) == {
        "node1": "192.0.2.90"
    }


def test_a_sealed_leave_removes_and_an_older_record_cannot_bring_it_back() -> None:
    membership = fold((rec(1, 5), rec(2, 5)))
    membership, changes = absorb(membership, (rec(1, 6, leave=True),), OWN, NOW)
    assert addresses(membership) == {"node2": "192.0.2.2"}
    assert changes == ["member node1 left the cluster (version 6)"]
    assert membership.departed_keys() == {key(1)}
    replayed, _ = absorb(membership, (rec(1, 5),), OWN, NOW)
    assert "node1" not in addresses(replayed)
    rejoined, changes = absorb(membership, (rec(1, 7),), OWN, NOW)
    assert "node1" in addresses(rejoined) and rejoined.departed_keys() == frozenset()


def test_an_expired_member_goes_only_once_its_tunnel_is_down() -> None:
    membership = fold((rec(1, 5, valid_until=NOW + 10), rec(2, 5, valid_until=NOW + 10)))
    later = NOW + 100
    kept, changes = expire(membership, later, down_keys=set())
    assert kept == membership and changes == []  # up (or not yet known): stays
    pruned, changes = expire(membership, later, down_keys={key(1)})
    assert addresses(pruned) == {"node2": "192.0.2.2"}
    assert "node1 removed" in changes[0]
    not_yet, _ = expire(membership, NOW + 5, down_keys={key(1), key(2)})
    assert not_yet == membership


def test_expire_asks_nothing_before_the_first_record_or_tombstone_ends() -> None:
    membership = fold(
        (rec(1, 5, valid_until=NOW + 50), rec(2, 5, valid_until=NOW + 10)),
        (rec(3, 5), rec(3, 6, leave=True, valid_until=NOW + 30)),
    )
    tombstone_ends = NOW + 30 + TOMBSTONE_MARGIN_SECONDS
    assert membership.first_expiry == min(int(NOW + 10), tombstone_ends)
    assert Membership().first_expiry == float("inf")

    class Untouchable:
        def __contains__(self, key: object) -> bool:
            raise AssertionError("asked about a record that has not expired")

    kept, changes = expire(membership, membership.first_expiry - 0.5, Untouchable())
    assert kept is membership and changes == []
    # From the moment node2's record ends, it is looked at (and goes: its tunnel is down).
    pruned, changes = expire(membership, membership.first_expiry, {key(2)})
    assert "node2" not in addresses(pruned) and len(changes) == 1


def test_an_expired_record_does_not_make_a_member_and_own_records_are_skipped() -> None:
    assert fold((rec(1, 5, valid_until=NOW - 1),)).known == {}
    own = replace(
        rec(1, 5),
        record=replace(rec(1, 5).record, info=replace(rec(1, 5).record.info, node_id=OWN)),
    )
    assert fold((own,)).known == {}


def test_tombstones_are_forgotten_after_the_leave_record_expired() -> None:
    membership = fold((rec(1, 5),), (rec(1, 6, leave=True, valid_until=NOW + 60),))
    assert membership.departed
    kept, _ = expire(membership, NOW + 60 + TOMBSTONE_MARGIN_SECONDS - 1, set())
    assert kept.departed
    gone, _ = expire(membership, NOW + 60 + TOMBSTONE_MARGIN_SECONDS + 1, set())
    assert not gone.departed


def test_hints_merge_across_services_and_reset_with_a_new_version() -> None:
    first = Endpoint.parse("203.0.113.1:4000")
    second = Endpoint.parse("203.0.113.2:4000")
    membership = fold((replace(rec(1, 5), hints=(first,)),), (replace(rec(1, 5), hints=(second,)),))
    (member,) = membership.members()
    assert member.hints == (first, second)
    assert first not in member.endpoints
    newer = fold((replace(rec(1, 5), hints=(first,)),), (rec(1, 6),))
    assert newer.members()[0].hints == ()


def test_the_cache_round_trips_with_mode_0600(tmp_path: Path) -> None:
    membership = fold((rec(1, 5), rec(2, 8)), (rec(3, 9, leave=True),))
    save_membership(tmp_path, membership, "cluster-a")
    path = tmp_path / PEERS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_membership(tmp_path, "cluster-a") == membership
    assert load_membership(tmp_path, "cluster-b") is None  # another cluster's: not used


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d.update(format=2),
        lambda d: d["members"][0]["record"].update(hostname="\x1b[2J"),
        lambda d: d["members"][0]["record"].update(version="9"),
        lambda d: d["members"][0].update(hints=["not an endpoint"]),
        lambda d: d["departed"].update(x={"public_key": "k", "version": -1, "forget_after": 1}),
    ],
)
def test_a_damaged_cache_is_set_aside_with_one_error(
    tmp_path: Path, damage: object, caplog: pytest.LogCaptureFixture
) -> None:
    save_membership(tmp_path, fold((rec(1, 5),)), "c")
    path = tmp_path / PEERS_FILE
    document = json.loads(path.read_text())
    damage(document)  # type: ignore[operator]
    path.write_text(json.dumps(document))
    assert load_membership(tmp_path, "c") is None
    assert "peer cache is damaged" in caplog.text
    assert not path.exists() and list(tmp_path.glob(f"{PEERS_FILE}.corrupt-*"))


def test_a_deeply_nested_cache_is_set_aside(tmp_path: Path) -> None:
    (tmp_path / PEERS_FILE).write_bytes(b"[" * 200_000)
    assert load_membership(tmp_path, "c") is None


def test_versions_only_go_up_across_restarts_and_clock_steps(tmp_path: Path) -> None:
    counter = VersionCounter(tmp_path)
    first = counter.next(NOW)
    assert first == int(NOW * 1000)
    assert counter.next(NOW - 3600) == first + 1  # the clock stepped back an hour
    restarted = VersionCounter(tmp_path)
    assert restarted.next(NOW - 7200) == first + 2
    assert restarted.next(NOW + 10) == int((NOW + 10) * 1000)


def test_a_damaged_version_file_falls_back_to_the_clock(tmp_path: Path) -> None:
    VersionCounter(tmp_path).next(NOW)
    (tmp_path / "record-version.json").write_text('{"version": "x"}')
    assert VersionCounter(tmp_path).next(NOW + 1) == int((NOW + 1) * 1000)


def test_an_expired_member_returns_only_with_a_newer_record() -> None:
    membership = fold((rec(1, 5, valid_until=NOW + 10),))
    pruned, _ = expire(membership, NOW + 100, {key(1)})
    assert pruned.departed_keys() == {key(1)}
    replayed, _ = absorb(pruned, (rec(1, 5, valid_until=NOW + 5000),), OWN, NOW + 100)
    assert not replayed.known
    back, changes = absorb(pruned, (rec(1, 6, valid_until=NOW + 2000),), OWN, NOW + 100)
    assert "node1" in addresses(back) and changes == ["member node1 joined (version 6)"]


def test_records_that_hold_for_more_than_a_day_are_ignored() -> None:
    far = NOW + MAX_RECORD_LIFETIME_SECONDS + 60
    membership, changes = absorb(Membership(), (rec(1, 5, valid_until=far),), OWN, NOW)
    assert not membership.known and "more than an hour" in changes[0]
    left, _ = absorb(fold((rec(1, 5),)), (rec(1, 6, valid_until=far, leave=True),), OWN, NOW)
    assert "node1" in addresses(left)  # nor can such a leave leave a tombstone for ever


def test_what_a_listing_can_make_a_node_keep_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import kubespan.plan.membership as module

    monkeypatch.setattr(module, "MAX_MEMBERS", 3)
    monkeypatch.setattr(module, "MAX_TOMBSTONES", 2)
    membership, changes = absorb(Membership(), tuple(rec(n, 5) for n in range(1, 6)), OWN, NOW)
    assert len(membership.known) == 3 and len(changes) == 5
    assert sum("already knows 3" in c for c in changes) == 2
    leaves = tuple(rec(n, 6, leave=True, valid_until=NOW + n) for n in range(1, 6))
    gone, _ = absorb(membership, leaves, OWN, NOW)
    # Tombstones of nodes that were members outlast those of nodes never known here.
    assert len(gone.departed) == 2 and set(gone.departed) == {node(2), node(3)}
