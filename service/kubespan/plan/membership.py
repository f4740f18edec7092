"""Who the members are: a pure fold over the sealed records discovery services hand out.

The listing itself is not authenticated, and a service may restart empty, lag, or be hostile;
so a member never leaves this node's view by being absent from a listing. A record counts
only by what is sealed in it:

- each node's records carry a strictly increasing version: a record older than the newest
  seen for that node is ignored (no rollback), and of several services the newest wins;
- a record with `leave` set removes the node, and is remembered (a tombstone) so that an
  older record served again cannot bring the node back; a newer record (the node rejoined)
  clears it;
- a record holds until its sealed `valid_until`; a member whose record has expired is
  removed only once its tunnel is also down: a handshake proves the node is alive and holds
  its key, so a member that merely cannot reach discovery keeps its peer (fail closed: its
  traffic stays in the tunnel);
- a record that has already expired does not make a node a member.
"""

from __future__ import annotations

import functools
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field

from kubespan.model import MAX_HINTS, ListedRecord, Member, MemberRecord
from kubespan.netaddr import Endpoint, reachable_unicast

# Tombstones outlive the leave record's own expiry by this much: every older record of the
# node expired no later than the leave record did, so after that none of them can count.
TOMBSTONE_MARGIN_SECONDS = 3600
# A record may hold for an hour at most (agents seal them for 30 minutes and reseal every 15),
# clock skew included: longer would let a node that died, or one minted to crowd others out,
# linger.
MAX_RECORD_LIFETIME_SECONDS = 3600
# Bounds on what one listing (or a member minting node identities) can make this node keep.
MAX_MEMBERS = 2048
MAX_TOMBSTONES = 4096


@dataclass(frozen=True)
class Known:
    record: MemberRecord
    hints: tuple[Endpoint, ...] = ()

    def member(self) -> Member:
        return self._member

    @functools.cached_property
    def _member(self) -> Member:
        """The member, with only the endpoints a node could send to: a member naming
        loopback or multicast would have every node send handshakes there. Made once: the
        same object pass after pass lets what the planner remembers of it be found by
        identity."""
        return Member(
            self.record.info,
            tuple(e for e in self.record.endpoints if reachable_unicast(e.address)),
            tuple(e for e in self.hints if reachable_unicast(e.address)),
        )


@dataclass(frozen=True)
class Departed:
    public_key: str
    version: int
    forget_after: int
    was_member: bool = True  # False: a leave record of a node never known here


@dataclass(frozen=True)
class Membership:
    known: Mapping[str, Known] = field(default_factory=dict)
    departed: Mapping[str, Departed] = field(default_factory=dict)

    def members(self) -> tuple[Member, ...]:
        return self._members

    def departed_keys(self) -> frozenset[str]:
        """Keys of nodes that left, and are not members again under the same key."""
        return self._departed_keys

    # Made once per membership (a new one is made for every change): the agent asks at
    # every pass, and the same tuple pass after pass lets what is computed from it be
    # remembered by its identity.
    @functools.cached_property
    def _members(self) -> tuple[Member, ...]:
        return tuple(self.known[node].member() for node in sorted(self.known))

    @functools.cached_property
    def first_expiry(self) -> float:
        """When expire() may first find something to do: the earliest end of a record's
        validity or of a tombstone (none: never)."""
        return min(
            (
                *(k.record.valid_until for k in self.known.values()),
                *(d.forget_after for d in self.departed.values()),
            ),
            default=float("inf"),
        )

    @functools.cached_property
    def _departed_keys(self) -> frozenset[str]:
        current = {k.record.info.public_key for k in self.known.values()}
        return frozenset(d.public_key for d in self.departed.values()) - current


def absorb(
    membership: Membership, listed: Iterable[ListedRecord], own_node_id: str, now: float
) -> tuple[Membership, list[str]]:
    """Take in the records of a listing; the new membership and a line per change."""
    known = dict(membership.known)
    departed = dict(membership.departed)
    changes: list[str] = []
    for item in listed:
        record = item.record
        node, name = record.info.node_id, record.info.hostname
        have = known.get(node)
        if node == own_node_id or _stale(record, have, departed.get(node)):
            continue
        if have is not None and record.version == have.record.version:
            # The same record through another service: only its hints may add something.
            merged = _merge_hints(have.hints, item.hints)
            if merged != have.hints:
                known[node] = Known(have.record, merged)
            continue
        refusal = _refusal(record, have, len(known), now)
        if refusal is not None:
            if refusal:
                changes.append(f"member {name}: record ignored, {refusal}")
            continue
        if record.leave:
            departed[node] = Departed(
                record.info.public_key,
                record.version,
                max(record.valid_until, int(now)) + TOMBSTONE_MARGIN_SECONDS,
                have is not None or (node in departed and departed[node].was_member),
            )
            if known.pop(node, None) is not None:
                changes.append(f"member {name} left the cluster (version {record.version})")
            continue
        departed.pop(node, None)
        known[node] = Known(record, _merge_hints((), item.hints))
        if have is None:
            changes.append(f"member {name} joined (version {record.version})")
        elif have.record.info != record.info or have.record.endpoints != record.endpoints:
            changes.append(f"member {name} updated its record (version {record.version})")
    return Membership(known, _bounded(departed)), changes


def _stale(record: MemberRecord, have: Known | None, tombstone: Departed | None) -> bool:
    """Not newer than what is known: an older record served again (rollback refused), or a
    record of a node that left, from before it left."""
    if tombstone is not None and record.version <= tombstone.version:
        return True
    return have is not None and record.version < have.record.version


def _refusal(record: MemberRecord, have: Known | None, count: int, now: float) -> str | None:
    """Why a newer record is not taken in, if it is not ("" when silently: an expired record
    of a node never known)."""
    if record.valid_until > now + MAX_RECORD_LIFETIME_SECONDS:
        return "it holds for more than an hour"
    if have is None and not record.leave and record.valid_until <= now:
        return ""
    if have is None and not record.leave and count >= MAX_MEMBERS:
        return f"this node already knows {MAX_MEMBERS} members"
    return None


def _bounded(departed: dict[str, Departed]) -> dict[str, Departed]:
    """At most MAX_TOMBSTONES: those of nodes never known here go first (anyone can make
    leave records for made-up nodes, to push out the tombstone of one that really left),
    then those that would be forgotten soonest."""
    if len(departed) <= MAX_TOMBSTONES:
        return departed
    ranked = sorted(departed.items(), key=lambda item: (item[1].was_member, item[1].forget_after))
    return dict(ranked[-MAX_TOMBSTONES:])


def expire(
    membership: Membership, now: float, down_keys: Container[str]
) -> tuple[Membership, list[str]]:
    """Remove members whose sealed record has expired and whose tunnel is down (`down_keys`
    is asked only of expired records: it may be a test, not a set); forget tombstones that
    can no longer matter."""
    if now < membership.first_expiry:
        return membership, []  # an idle pass's case: no record or tombstone has ended
    known = dict(membership.known)
    departed = {n: d for n, d in membership.departed.items() if d.forget_after > now}
    changes: list[str] = []
    for node, entry in membership.known.items():
        record = entry.record
        if record.valid_until <= now and record.info.public_key in down_keys:
            del known[node]
            # As final as a leave: only a newer record of the node brings it back.
            departed[node] = Departed(
                record.info.public_key, record.version, int(now) + TOMBSTONE_MARGIN_SECONDS
            )
            changes.append(
                f"member {record.info.hostname} removed: its record expired "
                f"(valid until {record.valid_until}) and its tunnel is down"
            )
    if not changes and len(departed) == len(membership.departed):
        return membership, []
    return Membership(known, _bounded(departed)), changes


def _merge_hints(have: tuple[Endpoint, ...], new: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
    merged = list(have)
    for endpoint in new:
        if endpoint not in merged:
            merged.append(endpoint)
    return tuple(merged[-MAX_HINTS:])
