"""Plan one reconcile pass: members + observed kernel state + time -> desired state."""

from __future__ import annotations

import functools
import ipaddress
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Generic, TypeVar

from kubespan.config import KubeSpanConfig
from kubespan.frozen import require_plain
from kubespan.model import (
    DesiredState,
    LinkSpec,
    Member,
    ObservedLink,
    ObservedPeer,
    PeerSpec,
    PeerState,
)
from kubespan.names import LINK_NAME, MARK_WIREGUARD
from kubespan.netaddr import Endpoint, IPAddress, IPNetwork, host_network, network_sort_key
from kubespan.plan.admission import AdmissionRules, admit
from kubespan.plan.candidates import Candidate, Kind, LocalNetwork, rank_candidates
from kubespan.plan.claims import Claim, Division, divide
from kubespan.plan.ipset import IntervalSet, collapse, network_range, range_networks
from kubespan.plan.peerstate import (
    DOWN_AFTER,
    EndpointDecision,
    Sighting,
    Timing,
    Tracking,
    decide_endpoint,
    decide_up_in_full,
    observed_again,
    probed_again,
)
from kubespan.plan.ruleset import RulesetSpec, routing_spec


@dataclass(frozen=True)
class PlanInput:
    config: KubeSpanConfig
    public_key: str
    private_key: str
    preshared_key: str
    ula: ipaddress.IPv6Address
    own_addresses: tuple[IPAddress, ...]
    # None: no member is known yet (no cache, discovery has not answered). The peers the
    # kernel has are kept as they are, not removed: unknown is not the same as empty.
    members: tuple[Member, ...] | None
    observed: ObservedLink | None
    tracking: Mapping[str, Tracking]
    now: float  # monotonic: every duration is measured on it
    wall: float  # wall clock: only to estimate the age of handshakes found at start
    pod_subnets: tuple[IPNetwork, ...] = ()
    node_subnets: tuple[IPNetwork, ...] = ()  # empty: node addresses anywhere (unicast)
    protected: tuple[IPAddress, ...] = ()  # the discovery services' addresses
    departed_keys: frozenset[str] = frozenset()  # nodes whose sealed leave we saw
    # What nodes that left (or expired) were routed, kept in the tunnel for a while with no
    # peer to take it (so dropped): traffic still on its way to them does not go out in the
    # clear. A member's claim to any of it wins.
    departed_ranges: tuple[IPNetwork, ...] = ()
    local_networks: tuple[LocalNetwork, ...] = ()  # this node's addresses with prefixes
    timing: Timing = field(default_factory=Timing)
    # This node's underlay changed: make every peer hear from us at once (they follow our
    # authenticated packets to the new address).
    nudge_all: bool = False
    probing: bool = True  # False: probes could not be sent lately; judge without them
    # Per member: when each endpoint last answered a path check (monotonic).
    answers: Mapping[str, Mapping[Endpoint, float]] = field(default_factory=dict)
    # Per member: the endpoint bound for it at a relay, and that relay's name.
    relayed: Mapping[str, tuple[Endpoint, str]] = field(default_factory=dict)
    relay_ports: tuple[int, int] | None = None  # this node relays on these (first, count)
    # Per-peer results kept between passes (PeerMemo): None plans every peer afresh.
    memo: PeerMemo | None = None


@dataclass(frozen=True)
class PeerReport:
    """One peer as `kubespan status` shows it."""

    public_key: str
    name: str
    node_id: str
    state: PeerState
    endpoint: Endpoint | None
    last_handshake: float | None
    rx_bytes: int
    tx_bytes: int
    refused: tuple[str, ...] = ()
    candidates: tuple[Candidate, ...] = ()  # in the order they are tried
    why: str = ""  # why the current endpoint
    # Seconds since each candidate last answered a path check (those that did).
    answered_ago: Mapping[Endpoint, float] = field(default_factory=dict)
    relay: str | None = None  # the relay member carrying the pair, when it does


@dataclass(frozen=True)
class Plan:
    desired: DesiredState
    tracking: Mapping[str, Tracking]
    reports: tuple[PeerReport, ...]
    warnings: tuple[str, ...]
    nudges: tuple[str, ...] = ()  # public keys of peers WireGuard must send to at once
    probes: tuple[ipaddress.IPv6Address, ...] = ()  # ULAs to probe through the tunnel now
    wake_at: float | None = None  # the next pass needed by time alone (monotonic)
    # Path checks to send now: a member's public key and the endpoints to check.
    checks: tuple[tuple[str, tuple[Endpoint, ...]], ...] = ()
    restarts: tuple[str, ...] = ()  # public keys of peers to remove and create again


def link_spec(plan_input: PlanInput) -> LinkSpec:
    return LinkSpec(
        name=LINK_NAME,
        mtu=plan_input.config.mtu,
        listen_port=plan_input.config.listen_port,
        fwmark=MARK_WIREGUARD,
        private_key=plan_input.private_key,
        preshared_key=plan_input.preshared_key,
        address=ula_interface(plan_input.ula),
    )


@functools.lru_cache(maxsize=8)
def ula_interface(ula: ipaddress.IPv6Address) -> ipaddress.IPv6Interface:
    """The link's address: the node's ULA in its /64 (parsed once, not at every pass)."""
    return ipaddress.IPv6Interface((ula, 64))


def unique_members(
    members: tuple[Member, ...], own_public_key: str
) -> tuple[tuple[Member, ...], list[str]]:
    """Drop ourselves and duplicate keys; stable order by public key, then node id."""
    warnings: list[str] = []
    by_key: dict[str, Member] = {}
    for member in sorted(members, key=lambda m: (m.info.public_key, m.info.node_id)):
        key = member.info.public_key
        if key == own_public_key:
            continue
        if key in by_key:
            warnings.append(
                f"members {by_key[key].info.node_id} and {member.info.node_id} share public key "
                f"{key}; using {by_key[key].info.node_id}"
            )
            continue
        by_key[key] = member
    return tuple(by_key.values()), warnings


def allowed_ips(
    members: tuple[Member, ...], plan_input: PlanInput
) -> tuple[Mapping[str, tuple[IPNetwork, ...]], Mapping[str, tuple[str, ...]], Division]:
    """Each member's admitted ULA, node addresses and pod CIDRs (admission.py), divided so
    that no member can pull another's (claims.py). Returns the allowed IPs per key, the
    refused claims per key, and the division (held-back ranges, warnings)."""
    rules = AdmissionRules(
        cluster_prefix=link_spec(plan_input).address.network,
        pod_subnets=plan_input.pod_subnets,
        own=(*plan_input.own_addresses, plan_input.ula),
        protected=plan_input.protected,
        node_subnets=plan_input.node_subnets,
    )
    # What the kernel routes to each peer now: a member keeps what it holds.
    routed = tuple(map(_KEY_AND_IPS, plan_input.observed.peers if plan_input.observed else ()))

    def compute() -> tuple[
        Mapping[str, tuple[IPNetwork, ...]], Mapping[str, tuple[str, ...]], Division
    ]:
        held = frozenset((key, network) for key, networks in routed for network in networks)
        return _admitted_and_divided(members, rules, held)

    # Between passes the members (the same objects), the rules and what the kernel routes
    # (its parsed lists, kept by their bytes) rarely change: told by identity, not hashed.
    return _LAST_DIVISION.get((rules, *members, None, *routed), compute)


def _admitted_and_divided(
    members: tuple[Member, ...],
    rules: AdmissionRules,
    held: frozenset[tuple[str, IPNetwork]],
) -> tuple[Mapping[str, tuple[IPNetwork, ...]], Mapping[str, tuple[str, ...]], Division]:
    """allowed_ips' work (remembered by it: this was most of an idle pass's planning with a
    hundred peers). Its results are shared between passes: read-only views of them."""
    claims: list[Claim] = []
    refused: dict[str, tuple[str, ...]] = {}
    for member in members:
        key = member.info.public_key
        admitted, refusals = admit(member, rules)
        refused[key] = tuple(str(r) for r in refusals)
        claims.extend(
            Claim(key, member.info.hostname, network, (key, network) in held)
            for network in (*admitted.addresses, *admitted.pod_cidrs)
        )
    division = divide(claims, rules.own)
    routes = {m.info.public_key: tuple(division.routed.get(m.info.public_key, ())) for m in members}
    return MappingProxyType(routes), MappingProxyType(refused), division


def member_set(
    peers: tuple[PeerSpec, ...],
    reports: tuple[PeerReport, ...],
    cluster_prefix: ipaddress.IPv6Network,
    bypass_down_peers: bool,
    held_back: tuple[IPNetwork, ...] = (),
) -> tuple[tuple[IPNetwork, ...], tuple[IPNetwork, ...]]:
    """Destinations whose traffic goes into the tunnel: every peer's allowed IPs but the ULAs
    (those route over the link by its /64), and ranges held back because members dispute
    them (always: no peer has them, so their traffic waits). Fail closed: a peer that is down
    stays in the set unless bypass is allowed."""
    if bypass_down_peers:
        up = {r.public_key for r in reports if r.state is PeerState.UP}
        included = tuple(peer.allowed_ips for peer in peers if peer.public_key in up)
    else:
        included = tuple(map(_ALLOWED_IPS, peers))

    def compute() -> tuple[tuple[IPNetwork, ...], tuple[IPNetwork, ...]]:
        v4: list[IPNetwork] = [n for n in held_back if n.version == 4]
        v6: list[IPNetwork] = [n for n in held_back if n.version == 6]
        for allowed_ips in included:
            for network in allowed_ips:
                if network.version == 4:
                    v4.append(network)
                elif not network.subnet_of(cluster_prefix):
                    v6.append(network)
        return collapse(v4, 4), collapse(v6, 6)

    return _LAST_MEMBER_SET.get((cluster_prefix, held_back, *included), compute)


Result = TypeVar("Result")
_ALLOWED_IPS = operator.attrgetter("allowed_ips")
_PUBLIC_KEY = operator.attrgetter("public_key")
_KEY_AND_IPS = operator.attrgetter("public_key", "allowed_ips")


class LastResult(Generic[Result]):
    """The last result of a computation, kept while its inputs come again. The member set's
    inputs are the allowed-IP tuples allowed_ips() remembers, the same objects pass after
    pass: telling them unchanged is a pointer comparison each (hashing them would cost most
    of what is saved; inputs that are not the same objects are compared by value). The
    inputs are held, so no other object can come to have their identity. Any thread may
    ask: the inputs and the result are swapped in as one."""

    def __init__(self) -> None:
        self._last: tuple[tuple[object, ...], Result] | None = None

    def get(self, key: tuple[object, ...], compute: Callable[[], Result]) -> Result:
        """compute(), or its last result if `key` (everything compute reads) is unchanged."""
        last = self._last
        if last is not None and len(last[0]) == len(key):
            kept, result = last
            if all(map(operator.is_, kept, key)):  # same length: checked above
                return result
            if kept == key:
                # Equal, but other objects: these are the ones that will come again.
                self._last = (key, result)
                return result
        result = compute()
        self._last = (key, result)
        return result


_LAST_DIVISION: LastResult[
    tuple[Mapping[str, tuple[IPNetwork, ...]], Mapping[str, tuple[str, ...]], Division]
] = LastResult()
_LAST_MEMBER_SET: LastResult[tuple[tuple[IPNetwork, ...], tuple[IPNetwork, ...]]] = LastResult()
_LAST_UNIQUE: LastResult[tuple[tuple[Member, ...], list[str]]] = LastResult()
_LAST_RELAY_TEST: LastResult[Callable[[Endpoint], bool]] = LastResult()
_LAST_RULESET: LastResult[RulesetSpec] = LastResult()
_LAST_ULAS_ROUTED: LastResult[frozenset[str]] = LastResult()
_LAST_REFUSED: LastResult[frozenset[str]] = LastResult()
_NOT_RELAYED: tuple[None, None] = (None, None)
_NONE_RELAYED: frozenset[Endpoint] = frozenset()


@dataclass
class Peers:
    """What one pass decides for each peer, gathered as the peers are planned."""

    peers: list[PeerSpec] = field(default_factory=list)
    reports: list[PeerReport] = field(default_factory=list)
    tracking: dict[str, Tracking] = field(default_factory=dict)
    nudges: list[str] = field(default_factory=list)
    probes: list[ipaddress.IPv6Address] = field(default_factory=list)
    checks: list[tuple[str, tuple[Endpoint, ...]]] = field(default_factory=list)
    restarts: list[str] = field(default_factory=list)
    wake_at: float | None = None

    def decided(
        self, key: str, decision: EndpointDecision, seen: ObservedPeer | None, nudge_all: bool
    ) -> None:
        self.tracking[key] = decision.tracking
        # A peer being created sends at once by itself (its keepalive goes from off to on).
        if seen is not None and decision.restart:
            self.restarts.append(key)
        elif seen is not None and (decision.nudge or nudge_all):
            self.nudges.append(key)
        self.wake(decision.wake_at)

    def wake(self, at: float | None) -> None:
        if at is not None:
            self.wake_at = min(self.wake_at or at, at)

    def extend(self, other: Peers) -> None:
        self.peers.extend(other.peers)
        self.reports.extend(other.reports)
        self.tracking.update(other.tracking)
        self.nudges.extend(other.nudges)
        self.probes.extend(other.probes)
        self.checks.extend(other.checks)
        self.restarts.extend(other.restarts)
        if other.wake_at is not None:
            self.wake_at = min(self.wake_at or other.wake_at, other.wake_at)


def sighting(seen: ObservedPeer | None) -> Sighting:
    if seen is None:
        return Sighting(None, None, 0)
    return Sighting(seen.endpoint, seen.last_handshake, seen.rx_bytes)


# Peers kept without a member record are never probed (their ULA is unknown): judged by
# WireGuard's own bound only.
KEPT_TIMING = Timing(quiet=DOWN_AFTER)


def kept_peers(plan_input: PlanInput, known: set[str] | None = None) -> Peers:
    """The kernel's peers that no member accounts for, kept unchanged: all of them while
    no member is known at all (`known` None: unknown is not empty); otherwise those that
    did not leave and carry this cluster's preshared key, until they have been down for
    DOWN_AFTER (a handshake under that key proves a member, whatever discovery says)."""
    out = Peers()
    observed = plan_input.observed
    found = observed.peers if observed is not None else ()
    if known is not None and observed is not None:
        # Members' peers skipped without a Python step each (every pass, every member).
        strangers = observed.peer_by_key.keys() - known
        found = tuple(p for p in found if p.public_key in strangers) if strangers else ()
    for seen in found:
        key = seen.public_key
        if known is not None and (
            key in known
            or key in plan_input.departed_keys
            or seen.preshared_key != plan_input.preshared_key
        ):
            continue  # a member, a node that left, or not even of this cluster
        decision = decide_endpoint(
            plan_input.now,
            plan_input.wall,
            (),
            plan_input.tracking.get(key),
            sighting(seen),
            KEPT_TIMING,
        )
        if (
            known is not None
            and decision.state is PeerState.DOWN
            and plan_input.now - decision.tracking.since >= DOWN_AFTER
        ):
            continue
        out.decided(key, replace(decision, nudge=False), seen, plan_input.nudge_all)
        name = f"({key[:8]}…)"
        out.peers.append(PeerSpec(key, name, seen.allowed_ips, None, seen.keepalive))
        out.reports.append(
            PeerReport(
                key,
                name,
                "",
                decision.state,
                seen.endpoint,
                seen.last_handshake,
                seen.rx_bytes,
                seen.tx_bytes,
                why=decision.tracking.why,
            )
        )
    return out


def plan(plan_input: PlanInput) -> Plan:
    if plan_input.members is None:
        return _desired(plan_input, kept_peers(plan_input), [])
    warnings: list[str] = []
    held_back: list[IPNetwork] = []
    planned = member_peers(plan_input, plan_input.members, warnings, held_back)
    known = set(map(_PUBLIC_KEY, planned.peers))
    known.add(plan_input.public_key)
    kept = kept_peers(plan_input, known)
    if kept.peers or plan_input.departed_ranges:
        taken = {4: IntervalSet(), 6: IntervalSet()}
        others = [p.allowed_ips for p in planned.peers]
        own = [
            host_network(a)
            for a in (*plan_input.own_addresses, plan_input.ula, *plan_input.protected)
        ]
        for network in (*own, *held_back, *(n for nets in others for n in nets)):
            taken[network.version].add(*network_range(network))
        # What departed nodes had and no member claims now, then the kept peers behind all
        # of it, so that neither ever takes a member's ranges.
        departed = _uncovered(plan_input.departed_ranges, taken)
        held_back.extend(departed)
        for network in departed:
            taken[network.version].add(*network_range(network))
        for index, peer in enumerate(kept.peers):
            kept.peers[index] = replace(peer, allowed_ips=_uncovered(peer.allowed_ips, taken))
        planned.extend(kept)
    return _desired(plan_input, planned, warnings, tuple(held_back))


def _uncovered(
    networks: tuple[IPNetwork, ...], taken: Mapping[int, IntervalSet]
) -> tuple[IPNetwork, ...]:
    """The parts of `networks` outside `taken` (per IP version), as networks in order."""
    pieces = [
        piece
        for network in networks
        for start, end in taken[network.version].uncovered(*network_range(network))
        for piece in range_networks(network.version, start, end)
    ]
    return tuple(sorted(dict.fromkeys(pieces), key=network_sort_key))


def _no_relay(endpoint: Endpoint) -> bool:
    return False


def relay_port_test(members: tuple[Member, ...]) -> Callable[[Endpoint], bool]:
    """Whether an endpoint is a relay's port: an address a relay member announces, a port
    in the range its record offers."""
    ranges: dict[IPAddress, list[tuple[int, int]]] = {}
    for member in members:
        if member.info.relay_ports is not None:
            for endpoint in member.endpoints:
                ranges.setdefault(endpoint.address, []).append(member.info.relay_ports)
    if not ranges:
        return _no_relay  # no member relays: asked for every peer at every pass

    def on_a_relay(endpoint: Endpoint) -> bool:
        return any(
            first <= endpoint.port < first + count
            for first, count in ranges.get(endpoint.address, ())
        )

    return on_a_relay


def relayed_endpoints(
    bound: Endpoint | None, kernel: Endpoint | None, on_a_relay: Callable[[Endpoint], bool]
) -> frozenset[Endpoint]:
    """The endpoints that go through a relay: the one bound for the peer, and WireGuard's
    own when it is a relay's port (the binding left for a nearer relay, or the peer's own
    binding it roamed to): never judged as a direct path."""
    relayed = {bound} if bound is not None else set()
    if kernel is not None and kernel != bound and on_a_relay(kernel):
        relayed.add(kernel)
    return frozenset(relayed) if relayed else _NONE_RELAYED  # direct: nothing made


class _Planned:
    """One member's results at the pass that planned it, and what they were planned from."""

    __slots__ = (
        "decision",
        "direct_probed",
        "member",
        "report",
        "seen",
        "spec",
        "steady_until",
        "tracking",
        "wake_at",
    )

    def __init__(
        self,
        member: Member,
        seen: ObservedPeer | None,
        decision: EndpointDecision,
        spec: PeerSpec,
        report: PeerReport,
        direct_probed: bool,
    ) -> None:
        self.member, self.seen = member, seen
        self.decision, self.spec, self.report = decision, spec, report
        self.tracking = decision.tracking  # the next pass's input: dated anew at each reuse
        # Set by PeerMemo.keep when the decision holds by itself: a float to compare, at
        # every pass (0: never reused as it is).
        self.steady_until = 0.0
        self.wake_at = decision.wake_at
        # Up, planned with probes, neither its endpoint bound at a relay nor the kernel's a
        # relay's port: while it stays up, decided again without its candidates (decide_up).
        self.direct_probed = direct_probed


@dataclass
class PeerMemo:
    """What member_peers planned for each peer, kept for the next pass (PlanInput.memo).

    A peer is not planned again while its decision holds by itself (a dead peer waiting out
    its backoff, an up peer not yet due for a probe: EndpointDecision.steady_until) and
    every input is the very object of the pass before: its member record, the kernel's
    parsed peer (apply.wireguard keeps it while its bytes are unchanged), the tracking this
    memo gave it, its allowed IPs (allowed_ips keeps them), the timing. Only decisions that
    change nothing are kept (no endpoint set, nothing to nudge, probe or check, the
    tracking as it came but for the pass's time), so planning the peer again would give
    the same; peers with path-check answers or a relay are always planned (their decisions
    hang on answers' ages). An idle node with a hundred dead peers plans the two that live.

    A peer that answers changes the kernel's counters at every round of probes, so it is
    never steady; while it is up on a direct path, with the rest of its inputs the same
    objects, it is decided again by peerstate.probed_again (or decide_up_in_full) and its
    report copied with the new counters (_replan_up), not ranked and decided in full; a
    round's decision to probe it again is written into its entry in place
    (_probed_in_place): what a mesh of a hundred live peers costs at every grain.
    """

    planned: dict[str, _Planned] = field(default_factory=dict)
    timing: Timing | None = None
    local_networks: tuple[LocalNetwork, ...] = ()
    probing: bool = True
    on_a_relay: Callable[[Endpoint], bool] | None = None
    routes: Mapping[str, tuple[IPNetwork, ...]] | None = None

    def usable(
        self,
        plan_input: PlanInput,
        on_a_relay: Callable[[Endpoint], bool],
        routes: Mapping[str, tuple[IPNetwork, ...]],
    ) -> bool:
        """Whether what is kept was planned under this pass's settings, relays (which
        endpoints are a relay's ports, from every member's record: the same test while the
        members are unchanged) and allowed IPs (allowed_ips hands out the same mapping
        while its inputs are unchanged, and new lists for every member when they are not);
        if not, forget it."""
        same = (
            not plan_input.nudge_all
            and self.timing is plan_input.timing
            and self.on_a_relay is on_a_relay
            and self.routes is routes
            and self.probing == plan_input.probing
            and self.local_networks == plan_input.local_networks
        )
        if not same:
            self.planned.clear()
            self.timing, self.probing = plan_input.timing, plan_input.probing
            self.local_networks, self.on_a_relay = plan_input.local_networks, on_a_relay
            self.routes = routes
        return same

    def keep(
        self,
        key: str,
        previous: Tracking | None,
        planned: _Planned,
        reusable: bool,
    ) -> None:
        """Remember the peer's results: to give them again while planning it again from
        the same inputs would give the same (steady), and to decide it again without its
        candidates while it is up (direct_probed)."""
        decision = planned.decision
        if not reusable:
            self.planned.pop(key, None)
            return
        if (
            previous is not None
            and decision.steady_until is not None
            and decision.set_endpoint is None
            and not (decision.nudge or decision.probe or decision.check or decision.restart)
            and replace(decision.tracking, observed_at=previous.observed_at) == previous
        ):
            planned.steady_until = decision.steady_until
        elif not planned.direct_probed:
            self.planned.pop(key, None)
            return
        self.planned[key] = planned

    def forget_others(self, members: tuple[Member, ...]) -> None:
        """Drop what is kept for peers no longer members, once that is more than the members
        (until then, a few stale entries cost less than a set of every key at every pass)."""
        if len(self.planned) > len(members):
            keys = {m.info.public_key for m in members}
            for key in [k for k in self.planned if k not in keys]:
                del self.planned[key]


def member_peers(
    plan_input: PlanInput,
    discovered: tuple[Member, ...],
    warnings: list[str],
    held_back: list[IPNetwork],
) -> Peers:
    """One peer per member: allowed IPs, and the endpoint to try next if it must change."""
    # The membership hands out the same tuple while it is unchanged: told by identity.
    members, duplicates = _LAST_UNIQUE.get(
        (discovered, plan_input.public_key),
        lambda: unique_members(discovered, plan_input.public_key),
    )
    warnings.extend(duplicates)
    routes, refused, division = allowed_ips(members, plan_input)
    warnings.extend(division.warnings)
    held_back.extend(division.held_back)
    for lines in refused.values():
        warnings.extend(lines)
    observed_peers = plan_input.observed.peer_by_key if plan_input.observed is not None else {}

    out = Peers()
    on_a_relay = _LAST_RELAY_TEST.get((members,), lambda: relay_port_test(members))
    ulas_routed = _LAST_ULAS_ROUTED.get(
        (members, routes),
        lambda: frozenset(
            m.info.public_key
            for m in members
            if any(m.info.ula in n for n in routes[m.info.public_key])
        ),
    )
    memo = plan_input.memo
    memo_usable = memo is not None and memo.usable(plan_input, on_a_relay, routes)
    # Planned at every pass: members with refused claims, path-check answers or a relay.
    never_kept = _LAST_REFUSED.get(
        (refused,), lambda: frozenset(key for key, lines in refused.items() if lines)
    )
    if plan_input.answers or plan_input.relayed:
        # A member keeps an empty mapping once its answers are old (see PathChecker.answers).
        answered = (key for key, by_endpoint in plan_input.answers.items() if by_endpoint)
        never_kept = never_kept.union(answered, plan_input.relayed.keys())
    now, timing, nudge_all = plan_input.now, plan_input.timing, plan_input.nudge_all
    # Looked up once: the loop below runs for every member at every pass, and a kept peer
    # (most of an idle node's) costs little more than these lookups.
    kept_of = memo.planned.get if memo is not None and memo_usable else None
    observed_of, tracking_of = observed_peers.get, plan_input.tracking.get
    out_tracking, out_specs, out_reports = out.tracking, out.peers, out.reports
    for member in members:
        key = member.info.public_key
        seen = observed_of(key)
        reusable = memo_usable and key not in never_kept
        if kept_of is not None and reusable:
            kept = kept_of(key)
            if kept is not None and kept.member is member and kept.tracking is tracking_of(key):
                if now < kept.steady_until and (kept.seen is seen or _only_sent_more(kept, seen)):
                    # What the memo kept, while it holds: every input the very object it
                    # was planned from, and its decision steady until later than now.
                    kept.tracking = tracking = observed_again(kept.decision.tracking, now)
                    out_tracking[key] = tracking
                    out.wake(kept.wake_at)
                    out_specs.append(kept.spec)
                    out_reports.append(kept.report)
                    continue
                if (
                    kept.direct_probed
                    and seen is not None
                    and (
                        seen.endpoint is None
                        or on_a_relay is _no_relay
                        or not on_a_relay(seen.endpoint)
                    )
                ):
                    # Only the kernel's view of it changed (its counters, as a peer that
                    # answers probes does at every round).
                    rhythm = probed_again(now, kept.tracking, seen, timing)
                    if rhythm is not None and rhythm.probe and not nudge_all:
                        _probed_in_place(kept, seen, rhythm, out)
                        continue
                    replanned = _replan_up(plan_input, kept, seen, rhythm, on_a_relay, out)
                    if replanned is not None:
                        assert memo is not None  # kept_of is its
                        memo.keep(key, kept.tracking, replanned, True)
                        continue
        previous = tracking_of(key)
        planned = _plan_member(
            plan_input,
            member,
            seen,
            previous,
            routes[key],
            refused[key],
            on_a_relay,
            out,
            key in ulas_routed,
        )
        if memo is not None:
            memo.keep(key, previous, planned, reusable)
    if memo is not None:
        memo.forget_others(members)
    return out


def _plan_member(
    plan_input: PlanInput,
    member: Member,
    seen: ObservedPeer | None,
    previous: Tracking | None,
    routes: tuple[IPNetwork, ...],
    refused: tuple[str, ...],
    on_a_relay: Callable[[Endpoint], bool],
    out: Peers,
    ula_routed: bool,
) -> _Planned:
    """Plan one member's peer afresh, into `out`."""
    key, now = member.info.public_key, plan_input.now
    answers = plan_input.answers.get(key)
    relay_endpoint, relay_name = plan_input.relayed.get(key, _NOT_RELAYED)
    ranked = rank_candidates(member, plan_input.local_networks)
    if relay_endpoint is not None:
        # Bound at a relay after the direct paths failed: tried first (a relay that
        # goes away is replaced at once), while direct paths that answer a check win.
        ranked = (
            Candidate(relay_endpoint, Kind.RELAYED),
            *(c for c in ranked if c.endpoint != relay_endpoint),
        )
    # A probe needs the member's ULA routed to it (a disputed one is held back) and a
    # socket to send it: without either, only WireGuard's own bound judges the path.
    probed = plan_input.probing and ula_routed
    relayed = relayed_endpoints(relay_endpoint, seen.endpoint if seen else None, on_a_relay)
    decision = decide_endpoint(
        now,
        plan_input.wall,
        tuple(c.endpoint for c in ranked),
        previous,
        sighting(seen),
        plan_input.timing if probed else replace(plan_input.timing, quiet=DOWN_AFTER),
        answers,
        relayed,
    )
    out.decided(key, decision, seen, plan_input.nudge_all)
    if decision.probe and probed:
        out.probes.append(member.info.ula)
    if decision.check:
        out.checks.append((key, _checked(seen, ranked, relay_endpoint, on_a_relay)))
    spec = PeerSpec(
        public_key=key,
        name=member.info.hostname,
        allowed_ips=routes,
        endpoint=decision.set_endpoint,
    )
    report = _report(
        member, decision, seen, refused, ranked, answers, now, relay_endpoint, relay_name
    )
    out.peers.append(spec)
    out.reports.append(report)
    direct_probed = probed and not relayed and decision.state is PeerState.UP
    return _Planned(member, seen, decision, spec, report, direct_probed)


def _only_sent_more(kept: _Planned, seen: ObservedPeer | None) -> bool:
    """Whether the kernel's peer differs from the one `kept` was planned from only in what
    was sent to it, which no decision reads (WireGuard sends initiations to a dead peer
    every 5 s): then `kept` is brought to it, its report with the new count."""
    before = kept.seen
    if (
        seen is None
        or before is None
        or seen.rx_bytes != before.rx_bytes
        or seen.last_handshake != before.last_handshake
        or seen.endpoint != before.endpoint
    ):
        return False
    report = kept.report
    kept.seen = seen
    kept.report = _with_counters(report, report.state, report.endpoint, seen, report.why)
    return True


def _replan_up(
    plan_input: PlanInput,
    kept: _Planned,
    seen: ObservedPeer,
    rhythm: EndpointDecision | None,
    on_a_relay: Callable[[Endpoint], bool],
    out: Peers,
) -> _Planned | None:
    """Plan again, into `out`, a member kept at the pass before as direct_probed, whose
    inputs are the very objects they were then but for the kernel's peer (not at a relay's
    port): what _plan_member gives, when the peer is up, without ranking its candidates or
    making its report anew. `rhythm`: probed_again's decision, if it had one; without it,
    decide_up's. None when it is not up."""
    decision = (
        rhythm
        if rhythm is not None
        else decide_up_in_full(plan_input.now, kept.tracking, seen, plan_input.timing)
    )
    if decision is None:
        return None
    member, key = kept.member, kept.spec.public_key
    out.decided(key, decision, seen, plan_input.nudge_all)
    if decision.probe:
        out.probes.append(member.info.ula)
    ranked = kept.report.candidates
    if decision.check:
        out.checks.append((key, _checked(seen, ranked, None, on_a_relay)))
    spec = kept.spec
    if decision.set_endpoint != spec.endpoint:
        spec = PeerSpec(key, spec.name, spec.allowed_ips, decision.set_endpoint)
    # As _report makes it: no refused claims, path-check answers or relay (or the memo
    # would not have kept the member).
    report = _with_counters(
        kept.report,
        decision.state,
        decision.set_endpoint or seen.endpoint,
        seen,
        decision.tracking.why,
    )
    out.peers.append(spec)
    out.reports.append(report)
    return _Planned(member, seen, decision, spec, report, True)


def _probed_in_place(
    kept: _Planned, seen: ObservedPeer, decision: EndpointDecision, out: Peers
) -> None:
    """What _replan_up and PeerMemo.keep do with probed_again's decision to probe the peer
    again (up, no endpoint set, nothing to nudge, check or restart, no steady time), done
    in `kept` itself: for every peer that answers, at every round."""
    spec, tracking = kept.spec, decision.tracking
    key = spec.public_key
    out.tracking[key] = tracking
    wake = decision.wake_at
    if wake is not None and (out.wake_at is None or wake < out.wake_at):
        out.wake_at = wake
    out.probes.append(kept.member.info.ula)
    if spec.endpoint is not None:
        spec = PeerSpec(key, spec.name, spec.allowed_ips, None)
    report = _with_counters(kept.report, PeerState.UP, seen.endpoint, seen, tracking.why)
    out.peers.append(spec)
    out.reports.append(report)
    kept.seen, kept.decision, kept.spec, kept.report = seen, decision, spec, report
    kept.tracking, kept.wake_at, kept.steady_until = tracking, wake, 0.0


require_plain(PeerReport)  # _with_counters copies it by hand


def _with_counters(
    report: PeerReport,
    state: PeerState,
    endpoint: Endpoint | None,
    seen: ObservedPeer,
    why: str,
) -> PeerReport:
    """evolve(report, state=..., endpoint=..., why=...) with `seen`'s handshake and
    counters, copied by hand (for every peer that answers, at every pass)."""
    copy: PeerReport = object.__new__(PeerReport)
    fields = copy.__dict__
    fields.update(report.__dict__)
    fields["state"] = state
    fields["endpoint"] = endpoint
    fields["last_handshake"] = seen.last_handshake
    fields["rx_bytes"] = seen.rx_bytes
    fields["tx_bytes"] = seen.tx_bytes
    fields["why"] = why
    return copy


def _checked(
    seen: ObservedPeer | None,
    ranked: tuple[Candidate, ...],
    relay_endpoint: Endpoint | None,
    on_a_relay: Callable[[Endpoint], bool],
) -> tuple[Endpoint, ...]:
    """What a path check of the peer is sent to: the endpoint WireGuard has first (whether
    the path in use still answers; never cut off by a cap on how many are checked), then the
    candidates in rank order. Never a relay's port: it forwards WireGuard's messages only, so
    a check there gets no answer (and would cross the relay's segment for nothing)."""
    current = (seen.endpoint,) if seen and seen.endpoint else ()
    checked = (
        e
        for e in (*current, *(c.endpoint for c in ranked))
        if e != relay_endpoint and not on_a_relay(e)
    )
    return tuple(dict.fromkeys(checked))


def _report(
    member: Member,
    decision: EndpointDecision,
    seen: ObservedPeer | None,
    refused: tuple[str, ...],
    ranked: tuple[Candidate, ...],
    answers: Mapping[Endpoint, float] | None,
    now: float,
    relay_endpoint: Endpoint | None,
    relay_name: str | None,
) -> PeerReport:
    in_use = decision.set_endpoint or (seen.endpoint if seen else None)
    return PeerReport(
        public_key=member.info.public_key,
        name=member.info.hostname,
        node_id=member.info.node_id,
        state=decision.state,
        endpoint=in_use,
        last_handshake=seen.last_handshake if seen else None,
        rx_bytes=seen.rx_bytes if seen else 0,
        tx_bytes=seen.tx_bytes if seen else 0,
        refused=tuple(refused),
        candidates=ranked,
        why=decision.tracking.why,
        answered_ago={e: max(0.0, now - at) for e, at in (answers or {}).items()},
        relay=relay_name if in_use is not None and in_use == relay_endpoint else None,
    )


def _desired(
    plan_input: PlanInput,
    planned: Peers,
    warnings: list[str],
    held_back: tuple[IPNetwork, ...] = (),
) -> Plan:
    link = link_spec(plan_input)
    v4, v6 = member_set(
        tuple(planned.peers),
        tuple(planned.reports),
        link.address.network,
        plan_input.config.allow_down_peer_bypass,
        held_back,
    )
    desired = DesiredState(
        link=link,
        peers=tuple(planned.peers),
        # The same spec while its parts are the same objects: its text and fingerprint,
        # compared with the kernel's at every pass, are made once.
        ruleset=_LAST_RULESET.get(
            (v4, v6, link.mtu, link.listen_port, plan_input.relay_ports),
            lambda: RulesetSpec(v4, v6, link.mtu, link.listen_port, plan_input.relay_ports),
        ),
        routing=routing_spec(link.mtu, link.name),
    )
    return Plan(
        desired,
        planned.tracking,
        tuple(planned.reports),
        tuple(warnings),
        tuple(planned.nudges),
        tuple(planned.probes),
        planned.wake_at,
        tuple(planned.checks),
        tuple(planned.restarts),
    )
