"""The reconcile loop: observe, plan, diff, apply, publish status; on every input and each tick.

Inputs arrive on one queue (discovery listings and failures, the public address discovery
saw, kernel changes, stop); a pass runs after each batch of inputs and at least every TICK
seconds (twice WIDE_GRAIN in a mesh of more than WIDE_MESH peers, whose rounds of probes
come every WIDE_GRAIN), since peer state needs time to pass. Doing a pass twice changes
nothing the second time. Nothing ends the loop but Stop or a new config: any error in a pass
is logged, backed off and retried.

Members come from sealed records only (plan/membership.py), kept in the peer cache on the
state partition, so a node that boots while discovery is down rebuilds its mesh from the
cache and is READY once those peers are applied.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import logging
import operator
import os
import queue
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Mapping as ReadOnlyMap
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from kubespan import __version__, build_id, notify
from kubespan.agent.backoff import Backoff
from kubespan.agent.events import ConfigChanged, KernelChanged, Stop, Terminal
from kubespan.agent.kernelcache import KernelShell
from kubespan.agent.metrics import LoopCounters, MetricsServer
from kubespan.agent.metrics import render as render_metrics
from kubespan.agent.peercache import VersionCounter, load_membership, save_membership
from kubespan.agent.reflexive import DEFAULT_INTERVAL as STUN_INTERVAL
from kubespan.agent.reflexive import ReflexiveLearned
from kubespan.agent.session import (
    LEAVE_DEADLINE_SECONDS,
    TTL_SECONDS,
    DiscoverySession,
    ListingEvent,
    ReflexiveEvent,
    SessionFailed,
)
from kubespan.agent.status import LazyStatus, status_document, write_status_file
from kubespan.agent.statusserver import LatestStatus
from kubespan.apply.changes import DEFAULT_ROUTE, reasons_in
from kubespan.config import MachineConfig
from kubespan.crypto import ClusterKeys
from kubespan.discovery.members import Registration, open_affiliate, seal_record
from kubespan.discovery.payload import (
    MAX_ADDRESSES,
    MAX_ENDPOINTS,
    sign_record,
    valid_hostname,
)
from kubespan.errors import ApplyError
from kubespan.identity import Identity, fallback_mac, first_physical_mac, node_ula
from kubespan.identity import ula_prefix as cluster_ula_prefix
from kubespan.model import (
    AffiliateInfo,
    ListedRecord,
    LocalAddress,
    Member,
    MemberRecord,
    ObservedLink,
    ObservedPeer,
    PeerState,
)
from kubespan.names import LINK_NAME
from kubespan.netaddr import Endpoint, IPAddress, reachable_unicast
from kubespan.pathcheck.checker import PathAnswered
from kubespan.plan.dataplane import ObservedRouting, dataplane_warnings
from kubespan.plan.departed import HOLD_SECONDS, Hold, held_departed, held_ranges
from kubespan.plan.desired import (
    PeerMemo,
    PeerReport,
    Plan,
    PlanInput,
    plan,
    relay_port_test,
)
from kubespan.plan.diff import (
    NudgePeer,
    Operation,
    RemovePeer,
    SetPeer,
    diff,
    link_warnings,
    restart_peers,
)
from kubespan.plan.harvest import Harvest, harvest_candidates
from kubespan.plan.local import advertised_endpoints, excluded, underlay_networks
from kubespan.plan.membership import Membership, absorb, expire
from kubespan.plan.peerstate import (
    WIDE_GRAIN,
    WIDE_MESH,
    Timing,
    Tracking,
    given_up,
    trial_seconds,
)
from kubespan.relay.choice import (
    RTT_IDLE_SAMPLE_EVERY,
    RTT_SAMPLE_EVERY,
    RelayOffer,
    RoundTrips,
    nearer,
    offers_of,
    published_round_trips,
    relay_order,
    wants_relay,
)
from kubespan.relay.client import Bound, RelayChanged
from kubespan.relay.forward import RelayedPair
from kubespan.relay.ports import PortRange
from kubespan.stun.prober import MAX_REFLECTORS, Mapping, Reflexive

log = logging.getLogger(__name__)

TICK_SECONDS = 5.0
TIMING_WARMUP_SECONDS = 1.0  # a relay is timed this often until it has ROUND_TRIPS_WANTED
ROUND_TRIPS_WANTED = 3  # a relay's figure is the lowest of at least this many round trips
READY_TIMEOUT_SECONDS = 30.0
# With members from the cache, READY waits this long for discovery's first answer (so a
# member that joined while this node was down is known before kubelet starts), unless
# every discovery service has already failed.
CACHE_READY_GRACE_SECONDS = 5.0
REFRESH_SECONDS = TTL_SECONDS / 2
PROBLEM_LOG_INTERVAL_SECONDS = 60.0
# The status file is rewritten at least this often while only counters and ages change.
STATUS_FILE_EVERY_SECONDS = 120.0
# The peer cache is rewritten at most this often (a service can change records many times
# a second); what changed meanwhile is written at the next pass after that.
CACHE_WRITE_INTERVAL_SECONDS = 5.0
# A change of this node's addresses or default route is acted on once nothing has changed
# for this long (an interface coming up brings several notifications).
ROAM_SETTLE_SECONDS = 1.0
# NAT mappings advertised at most (one per family and a spare): what reflectors say cannot
# crowd out configured extra endpoints.
MAX_MAPPED = 4
# A probe no reflector answered says nothing new of the NAT (reflectors down or cut off, or
# their answers lost in a flood): the last verdict STUN answered stands while the underlay is
# the one it was answered on, for this long after the first such probe; then it goes (a
# mapping nobody confirms may be gone, and peers would keep trying a dead endpoint).
UNANSWERED_KEEP_SECONDS = 3 * STUN_INTERVAL
# After a probe could not be sent, peers are judged without probes for this long.
PROBE_RETRY_SECONDS = 60.0
# Passes asked for by time (trials, probes) come no closer than this.
MIN_PASS_GAP_SECONDS = 0.2


def resolve_udp(host: str, port: int) -> list[Endpoint]:
    """The addresses of a configured STUN server; none (logged) when it does not resolve."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as error:
        log.warning("stun server %s:%d does not resolve: %s", host, port, error)
        return []
    out = []
    for _family, _type, _proto, _name, address in found[:8]:
        try:
            out.append(Endpoint(ipaddress.ip_address(str(address[0]).split("%")[0]), port))
        except ValueError:
            continue
    return out


def _records(membership: Membership) -> tuple[object, ...]:
    return (
        {node: known.record for node, known in membership.known.items()},
        membership.departed,
    )


class KernelPort(KernelShell, Protocol):
    """What the loop needs from the kernel shell (agent.kernelcache.CachedKernel over
    apply.kernel.Kernel in production)."""

    def observe_link(self, name: str) -> ObservedLink | None: ...


@dataclass
class Clocks:
    wall: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic


class StunProber(Protocol):
    def start(self) -> None: ...
    def trigger(self) -> None: ...
    def stop(self) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...


StunFactory = Callable[[queue.Queue[Any], int, Callable[[], Sequence[Endpoint]]], StunProber]


class PathChecks(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...
    def set_members(self, public_keys: Iterable[str]) -> None: ...
    def set_own_addresses(self, addresses: Iterable[IPAddress]) -> None: ...
    def check(self, public_key: str, endpoints: Sequence[Endpoint]) -> None: ...
    def measure(self, public_key: str, endpoint: Endpoint) -> None: ...
    def round_trips(self, public_key: str, endpoint: Endpoint) -> tuple[float, ...]: ...
    def answers(self) -> dict[str, dict[Endpoint, float]]: ...


# (events, listen port, private key, public key, cluster path-check key)
PathCheckFactory = Callable[[queue.Queue[Any], int, bytes, bytes, bytes], PathChecks]


class RelaySides(Protocol):
    """This node's side of relayed pairs (relay.client.RelayClient)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...
    def want(
        self,
        wanted: ReadOnlyMap[bytes, tuple[RelayOffer, ...]],
        failing: frozenset[bytes],
        nearer: frozenset[bytes],
    ) -> None: ...
    def bound(self) -> dict[bytes, Bound]: ...


class RelayCarrier(Protocol):
    """The relay this node offers to be (relay.server.RelayServer)."""

    ready: threading.Event

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...
    def set_members(self, public_keys: Iterable[bytes]) -> None: ...
    def set_own_addresses(self, addresses: Iterable[IPAddress]) -> None: ...
    def traffic(self) -> list[tuple[RelayedPair, int]]: ...


# (events, listen port, private key, public key, cluster relay-bind key)
RelayClientFactory = Callable[[queue.Queue[Any], int, bytes, bytes, bytes], RelaySides]
# (private key, public key, cluster relay-bind key, ports, most pairs)
RelayServerFactory = Callable[[bytes, bytes, bytes, PortRange, int], RelayCarrier]


# What of a peer's report the status file must say at once when it changes (not counters).
_STATE = operator.attrgetter("state")
_KEY_AND_STATE = operator.attrgetter("public_key", "state")
_LASTING_REPORT = operator.attrgetter(
    "public_key", "state", "endpoint", "relay", "why", "refused", "candidates"
)


@functools.lru_cache(maxsize=8192)
def raw_key(public_key: str) -> bytes:
    """A member's WireGuard key as bytes (checked canonical base64 when its record was read)."""
    return base64.b64decode(public_key)


class _GivenUp:
    """The peers this agent has given up on (peerstate.given_up), as a container: asked only
    of members whose record expired, not of every peer at every pass."""

    def __init__(self, agent: Agent, now: float) -> None:
        self._agent, self._now = agent, now

    def __contains__(self, key: object) -> bool:
        agent = self._agent
        state = agent._states.get(key) if isinstance(key, str) else None
        tracking = agent.tracking.get(key) if isinstance(key, str) else None
        return state is not None and tracking is not None and given_up(self._now, tracking, state)


class Agent:
    def __init__(
        self,
        config: MachineConfig,
        identity: Identity,
        kernel: KernelPort,
        runtime_dir: Path,
        state_dir: Path,
        clocks: Clocks | None = None,
        rng: random.Random | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
        hostname: Callable[[], str] = socket.gethostname,
        tick: float = TICK_SECONDS,
        ready_timeout: float = READY_TIMEOUT_SECONDS,
        events: queue.Queue[Any] | None = None,
        stun: StunFactory | None = None,
        paths: PathCheckFactory | None = None,
        latest: LatestStatus | None = None,
        relay_client: RelayClientFactory | None = None,
        relay_server: RelayServerFactory | None = None,
    ) -> None:
        self.config = config
        self.identity = identity
        self.kernel = kernel
        self.runtime_dir = runtime_dir
        self.state_dir = state_dir
        self.clocks = clocks or Clocks()
        self.rng = rng or random.Random()
        self.random_bytes = random_bytes
        self.hostname = hostname
        self.tick = tick
        # systemd's watchdog: fed by the loop in run() and by each change a pass applies.
        self._watchdog = notify.Watchdog(self.clocks.monotonic)
        self.ready_timeout = ready_timeout
        self.events: queue.Queue[Any] = events if events is not None else queue.Queue()
        self.keys = ClusterKeys.derive(config.cluster.id, config.cluster.secret)
        self.sessions = [
            DiscoverySession(
                url, self.keys, self.events, self.rng, random_bytes, self.clocks.monotonic
            )
            for url in config.cluster.discovery.service_endpoints
        ]
        cached = load_membership(state_dir, self.keys.cluster_address)
        self.membership = cached or Membership()
        self.members_known = cached is not None
        self.from_cache = cached is not None
        if cached is not None:
            log.info("peer cache loaded members=%d", len(cached.known))
        self.versions = VersionCounter(state_dir)
        self.registration: Registration | None = None
        self._sealed_content: tuple[AffiliateInfo, tuple[Endpoint, ...]] | None = None
        self._sealed_at = 0.0
        self._opened: dict[tuple[str, bytes, tuple[bytes, ...]], ListedRecord | None] = {}
        self.heard: set[str] = set()
        self.failed: set[str] = set()
        self._started = self.clocks.monotonic()
        self.listings_taken = 0
        self.passes = 0
        self.tracking: dict[str, Tracking] = {}
        self._peer_memo = PeerMemo()  # what the planner need not plan again (plan.desired)
        self.ready = False
        self.last_error: str | None = None
        self._reported: set[str] = set()
        self._problems_logged: dict[str, float] = {}
        self._cache_dirty = False
        self._cache_saved_at = -CACHE_WRITE_INTERVAL_SECONDS
        self._warnings: tuple[str, ...] = ()
        self._states: dict[str, PeerState] = {}
        self._init_status(latest)
        self._harvested: dict[Harvest, float] = {}
        self._init_paths(config)
        self._init_helpers(config, identity, stun, paths)
        self._init_relay(config, identity, relay_client, relay_server)
        self.prefix = cluster_ula_prefix(config.cluster.id)
        self.ula = self._node_ula()

    def _node_ula(self) -> ipaddress.IPv6Address:
        mac = first_physical_mac(self.kernel.link_hardware())
        if mac is None:
            log.warning("no physical interface with a MAC; deriving the ULA host part from node id")
            mac = fallback_mac(self.identity.node_id)
        return node_ula(self.config.cluster.id, mac)

    def _init_status(self, latest: LatestStatus | None) -> None:
        self.counters = LoopCounters()
        self._status_line: str | None = None  # what systemd was last told
        self.metrics: MetricsServer | None = None  # started with the threads, if configured
        self._state_since: dict[str, float] = {}  # wall time of each peer's last change
        self.latest = latest  # what the status socket serves; None: file only (tests)
        self._last_status: LazyStatus | None = None
        self._status_file_said: object = None
        self._status_file_at = -STATUS_FILE_EVERY_SECONDS

    def _init_helpers(
        self,
        config: MachineConfig,
        identity: Identity,
        stun: StunFactory | None,
        paths: PathCheckFactory | None,
    ) -> None:
        """The threads that learn our NAT mapping (agent/reflexive.py) and check peers'
        candidates from the WireGuard port (pathcheck/); None: not used (tests)."""
        port = config.kubespan.listen_port
        self.stun = stun(self.events, port, self.stun_reflectors) if stun is not None else None
        if self.stun is not None:
            for session in self.sessions:
                session.on_reflectors = self.stun.trigger
        self.paths = (
            paths(
                self.events,
                port,
                identity.private_key,
                identity.public_key,
                self.keys.path_check_key,
            )
            if paths is not None
            else None
        )
        self._path_members: tuple[str, ...] | None = None
        self._path_members_of: tuple[Member, ...] | None = None  # what they were taken from
        self._departed_holds: dict[str, Hold] = {}

    def _init_relay(
        self,
        config: MachineConfig,
        identity: Identity,
        client: RelayClientFactory | None,
        server: RelayServerFactory | None,
    ) -> None:
        """This node's side of relayed pairs, and the relay it offers to be when configured
        to (relay/); None: not used (tests)."""
        kubespan = config.kubespan
        self.relay_client = (
            client(
                self.events,
                kubespan.listen_port,
                identity.private_key,
                identity.public_key,
                self.keys.relay_bind_key,
            )
            if client is not None
            else None
        )
        self.relay_server: RelayCarrier | None = None
        if server is not None and kubespan.relay:
            first, count = kubespan.relay_ports
            self.relay_server = server(
                identity.private_key,
                identity.public_key,
                self.keys.relay_bind_key,
                PortRange(first, count),
                count // 2,
            )
        self._relay_members: tuple[str, ...] | None = None
        self._relay_local: tuple[LocalAddress, ...] = ()  # the addresses the relay was told
        self._relay_members_of: tuple[Member, ...] | None = None
        # Members that offer to relay (key -> node id, name, ports), and what they were found in.
        self._offered: dict[bytes, tuple[str, str, tuple[int, int]]] = {}
        self._offered_by: tuple[Member, ...] | None = None
        self._relay_rtts: RoundTrips = ()  # as this node's record says them
        self._timed_at: dict[bytes, float] = {}  # relay key -> when its round trip was asked
        self._relay_names: dict[str, str] = {}  # relay node id -> name, for the status
        self._timing_read_at: float | None = None  # a relay's next warm-up timing is due

    def _init_paths(self, config: MachineConfig) -> None:
        """What the agent tracks about its own way out and when to look again."""
        self._narrow_timing = Timing(trial=trial_seconds(config.kubespan.endpoint_trial_seconds))
        self._wide_timing = self._narrow_timing.widened()
        self.timing = self._narrow_timing  # widened for a mesh of more than WIDE_MESH
        self._underlay: tuple[IPAddress, ...] | None = None
        self._underlay_changed_at: float | None = None
        self._wake_at: float | None = None
        self._probing_back_at = float("-inf")
        self.mapped: tuple[Endpoint, ...] = ()  # the NAT mappings STUN reported
        self.nat_status: dict[str, Any] | None = None
        self.symmetric_nat = False
        self._stun_answered: set[int] = set()  # families STUN gave a mapping for
        self._stun_heard = False  # whether reflectors answered the probe behind `mapped`
        self._heard_on: tuple[IPAddress, ...] | None = None  # the underlay they answered on
        self._unanswered: tuple[Reflexive, float] | None = None  # held back, since when

    def stop(self) -> None:
        self.events.put(Stop())

    def run(self) -> Terminal:
        """Reconcile until stopped or given a new config; returns the event that ended it."""
        log.info(
            "starting node_id=%s public_key=%s ula=%s discovery=%s version=%s build=%s",
            self.identity.node_id,
            self.identity.public_key_b64,
            self.ula,
            ",".join(s.url for s in self.sessions),
            __version__,
            build_id() or "-",
        )
        self._start_threads()
        self._started = self.clocks.monotonic()
        backoff = Backoff(base=1.0, cap=30.0, rng=self.rng)
        next_pass = self._started
        # Fed by this loop, not by a thread of its own: a loop stuck in a pass (a netlink
        # call that never returns) stops feeding, and systemd restarts the agent, which
        # adopts the kernel's state.
        try:
            while True:
                self._watchdog.feed()
                terminal = self._wait_inputs(next_pass)
                if terminal is not None:
                    return terminal
                try:
                    self.reconcile()
                except Exception as error:  # the loop must outlive any single pass
                    delay = backoff.next_delay()
                    self.last_error = str(error) or type(error).__name__
                    if isinstance(error, ApplyError):
                        log.error(
                            "apply failed, keeping the previous state; retry_in=%.1fs error=%s",
                            delay,
                            error,
                        )
                    else:
                        log.exception("reconcile pass failed; retry_in=%.1fs", delay)
                    self.counters.pass_errors += 1
                    self._publish_failure()
                    next_pass = self.clocks.monotonic() + delay
                    continue
                backoff.reset()
                self.last_error = None
                next_pass = self.next_pass_at()
        finally:
            self._save_cache(force=True)
            self._stop_threads()
            self._write_last_status()

    def next_pass_at(self) -> float:
        """After the tick, or sooner when a trial or a probe needs a look (not too soon)."""
        now = self.clocks.monotonic()
        # A wide mesh's rounds come every WIDE_GRAIN, longer than the tick: a tick between
        # two would be a pass for nothing.
        tick = self.tick if self.timing is self._narrow_timing else 2 * WIDE_GRAIN
        next_pass = now + max(self.tick, tick)
        if self._wake_at is not None:
            next_pass = min(next_pass, max(self._wake_at, now + MIN_PASS_GAP_SECONDS))
        return next_pass

    def _start_threads(self) -> None:
        for session in self.sessions:
            if session.url.startswith("http://"):
                log.warning(
                    "discovery url=%s is plain http: anyone on the path sees which cluster "
                    "registers when and from where, and can delay or drop answers (nothing "
                    "sealed can be read or changed); use https",
                    session.url,
                )
            session.start()
        if self.stun is not None:
            self.stun.start()
        if self.paths is not None:
            self.paths.start()
        for relay in (self.relay_client, self.relay_server):
            if relay is not None:
                relay.start()
        self._start_metrics()

    def _start_metrics(self) -> None:
        listen = self.config.kubespan.metrics_listen
        if listen is None:
            return
        server = MetricsServer(
            listen,
            lambda: render_metrics(self._last_document or {}, self.counters, self.clocks.wall()),
        )
        try:
            server.start()
        except OSError as error:
            # Metrics are for watching the mesh, never a reason to stop making it.
            log.error("metrics not served on %s: %s", listen, error.strerror or error)
            return
        self.metrics = server
        log.info("metrics served on http://%s/metrics", listen)

    def _stop_threads(self) -> None:
        for session in self.sessions:
            session.stop()
        if self.stun is not None:
            self.stun.stop()
        if self.paths is not None:
            self.paths.stop()
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        for session in self.sessions:
            session.join(2.0)  # a thread stuck in a request ends at its deadline
        if self.stun is not None:
            self.stun.join(3.0)
        if self.paths is not None:
            self.paths.join(3.0)
        for relay in (self.relay_client, self.relay_server):
            if relay is not None:
                relay.stop()
                relay.join(3.0)

    def _may_be_ready(self) -> bool:
        """Ready once the members discovery reports are applied; with members from the
        cache, once discovery answered, every service failed, or a short grace passed; and
        in any case after the timeout, so a dead discovery cannot block boot forever."""
        if not self.sessions or self.heard:
            return True
        elapsed = self.clocks.monotonic() - self._started
        if self.from_cache and (
            elapsed >= CACHE_READY_GRACE_SECONDS or all(s.url in self.failed for s in self.sessions)
        ):
            return True
        return elapsed >= self.ready_timeout

    def _wait_inputs(self, next_pass: float) -> Terminal | None:
        """Block until an input arrives or the next pass is due; the event that ends the run."""
        timeout = max(0.0, next_pass - self.clocks.monotonic())
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            return None
        while True:
            if isinstance(event, Stop | ConfigChanged):
                return event
            try:
                self._take(event)
            except Exception:  # one bad input must not end the loop
                log.exception("could not take in %s", type(event).__name__)
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return None

    def _take(self, event: object) -> None:
        if isinstance(event, ListingEvent):
            self._absorb_listing(event)
        elif isinstance(event, SessionFailed):
            self.failed.add(event.url)
        elif isinstance(event, KernelChanged):
            log.debug("kernel changed: %s", event.reason)
            if DEFAULT_ROUTE in reasons_in(event.reason):
                self._underlay_changed_at = self.clocks.monotonic()
        elif isinstance(event, ReflexiveEvent):
            # The pass below reads the new address from the session; the reflectors it
            # names may be new: learn the mapping again.
            if self.stun is not None:
                self.stun.trigger()
        elif isinstance(event, ReflexiveLearned):
            self._learned(event.result)
        elif isinstance(event, PathAnswered | RelayChanged):
            pass  # the pass that follows every event sets the endpoint that answered

    def _absorb_listing(self, event: ListingEvent) -> None:
        listed: list[ListedRecord] = []
        problems = list(event.problems)
        opened: dict[tuple[str, bytes, tuple[bytes, ...]], ListedRecord | None] = {}
        for affiliate in event.listing.affiliates:
            key = (affiliate.id, affiliate.data, affiliate.endpoints)
            if key in self._opened:
                result = self._opened[key]
            else:
                result, found = open_affiliate(self.keys, affiliate)
                problems.extend(found)
            opened[key] = result
            if result is not None:
                listed.append(result)
        # Keep the opened records of this listing only: the cache stays as large as a cluster.
        self._opened = {k: v for k, v in {**self._opened, **opened}.items() if k in opened}
        self._report_problems(event.url, problems)
        membership, changes = absorb(
            self.membership, listed, self.identity.node_id, self.clocks.wall()
        )
        self.heard.add(event.url)
        self.members_known = True
        self.listings_taken += 1
        log.info(
            "discovery update url=%s revision=%d records=%d members=%d",
            event.url,
            event.listing.revision,
            len(listed),
            len(membership.known),
        )
        self._set_membership(membership, changes)

    def _report_problems(self, url: str, problems: list[str]) -> None:
        """What a listing held that was refused: one line, with a count and the first few,
        and no more than one such line a minute per service (a hostile service could
        otherwise fill the journal with lines that each differ)."""
        if not problems:
            return
        now = self.clocks.monotonic()
        last = self._problems_logged.get(url)
        if last is not None and now - last < PROBLEM_LOG_INTERVAL_SECONDS:
            return
        self._problems_logged[url] = now
        shown = "; ".join(problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        log.warning("discovery %s: %d listed items refused: %s%s", url, len(problems), shown, more)

    def _set_membership(self, membership: Membership, changes: list[str]) -> None:
        for change in changes:
            if "record ignored" in change:
                self._report_once(change)  # served again with every listing: said once
            else:
                log.info("%s", change)
        if membership == self.membership:
            return
        if _records(membership) != _records(self.membership):
            self._cache_dirty = True  # only harvested hints moving is not worth a write
        self.membership = membership
        self._save_cache()

    def _save_cache(self, force: bool = False) -> None:
        now = self.clocks.monotonic()
        if not self._cache_dirty or (
            not force and now - self._cache_saved_at < CACHE_WRITE_INTERVAL_SECONDS
        ):
            return
        try:
            save_membership(self.state_dir, self.membership, self.keys.cluster_address)
        except OSError as error:
            self._report_once(
                f"cannot write the peer cache under {self.state_dir}: {error.strerror}; a "
                "restart while discovery is down would start without members"
            )
        self._cache_dirty, self._cache_saved_at = False, now

    def _become_ready(self) -> None:
        self.ready = True
        peers = len(self.tracking)
        if self.heard or not self.sessions:
            message = f"mesh configured, {peers} peers"
        elif self.from_cache:
            message = f"mesh configured from the peer cache, {peers} peers; discovery not heard"
        else:
            message = f"discovery unreachable after {self.ready_timeout:g}s; {peers} peers"
        log.info("ready: %s", message)
        notify.ready(message)

    def _harvest(self, reports: tuple[PeerReport, ...]) -> None:
        now = self.clocks.monotonic()
        self._harvested = {h: t for h, t in self._harvested.items() if now - t < REFRESH_SECONDS}
        members = self.membership.members()
        for node_id, endpoint in harvest_candidates(
            members, reports, self._harvested, now, REFRESH_SECONDS
        ):
            self._harvested[(node_id, endpoint)] = now
            for session in self.sessions:
                session.harvest(self.keys.affiliate_id(node_id), endpoint)

    def inherit(self, previous: Agent) -> None:
        """Carry what the previous agent knew (members, endpoint tracking) across a config
        change that keeps the cluster, so the mesh is not rebuilt from nothing."""
        same_cluster = (
            previous.config.cluster.id == self.config.cluster.id
            and previous.config.cluster.secret == self.config.cluster.secret
        )
        if not same_cluster:
            return
        self.membership = previous.membership
        self.members_known = previous.members_known
        self.from_cache = previous.members_known
        self.tracking = dict(previous.tracking)
        self._departed_holds = dict(previous._departed_holds)

    def leave(self) -> None:
        """Publish this node's sealed leave record on every discovery service (best effort,
        a few seconds at most): peers drop it at once, and no older record of it can bring
        it back."""
        info, endpoints = self.local_info()
        wall = self.clocks.wall()
        record = MemberRecord(
            info, endpoints, self.versions.next(wall), int(wall) + TTL_SECONDS, leave=True
        )
        registration = self._seal(record)

        # All services at once: one after another, a few slow ones would outlast the unit's
        # TimeoutStopSec and the agent would be killed before telling the rest.
        def leave_one(session: DiscoverySession) -> None:
            try:
                session.leave(registration)
            except Exception:  # a thread must not die of it; the others go on
                log.exception("could not leave discovery url=%s", session.url)

        leaving = [
            threading.Thread(target=leave_one, args=(session,), name=f"leave {session.url}")
            for session in self.sessions
        ]
        for thread in leaving:
            thread.daemon = True
            thread.start()
        deadline = time.monotonic() + LEAVE_DEADLINE_SECONDS + 1.0
        for thread in leaving:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _seal(self, record: MemberRecord) -> Registration:
        """Sign with this node's WireGuard key, then seal for the cluster."""
        signed = sign_record(record, self.identity.private_key, self.random_bytes(64))
        return seal_record(self.keys, signed, self.random_bytes(24))

    def _report_once(self, message: str) -> None:
        if message not in self._reported:
            if len(self._reported) > 4096:
                self._reported.clear()
            self._reported.add(message)
            log.warning("%s", message)

    def local_info(
        self, networks: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...] | None = None
    ) -> tuple[AffiliateInfo, tuple[Endpoint, ...]]:
        kubespan = self.config.kubespan
        if networks is None:
            networks = underlay_networks(self.kernel.local_addresses(), self.prefix)
        addresses = tuple(dict.fromkeys(n.ip for n in networks))
        addresses = tuple(
            a for a in addresses if not excluded(a, kubespan.exclude_advertised_networks)
        )
        if len(addresses) > MAX_ADDRESSES:
            self._report_once(
                f"this node has {len(addresses)} addresses; advertising the first {MAX_ADDRESSES}"
            )
            addresses = addresses[:MAX_ADDRESSES]
        reflexive = next((s.reflexive for s in self.sessions if s.reflexive), None)
        if self.symmetric_nat or (reflexive and reflexive.version in self._stun_answered):
            reflexive = None  # symmetric: its port is the one mapped for discovery only
        endpoints = advertised_endpoints(addresses, reflexive, kubespan, self.mapped, MAX_ENDPOINTS)
        name = self.hostname()
        if not valid_hostname(name):
            safe = "".join(c if c.isalnum() or c in "-." else "-" for c in name)[:253]
            self._report_once(f"hostname {name!r} is not a DNS name; advertising {safe!r}")
            name = safe.strip(".") or "node"
        info = AffiliateInfo(
            node_id=self.identity.node_id,
            hostname=name,
            public_key=self.identity.public_key_b64,
            ula=self.ula,
            addresses=addresses,
            # Offered once the relay listens and its table is in place.
            relay_ports=kubespan.relay_ports
            if self.relay_server is not None and self.relay_server.ready.is_set()
            else None,
            relay_rtts=self._relay_rtts,
        )
        return info, endpoints

    def _register(self, info: AffiliateInfo, endpoints: tuple[Endpoint, ...]) -> None:
        """Seal a new record when what we say changed, or half its life has passed."""
        now = self.clocks.monotonic()
        content = (info, endpoints)
        if (
            self.registration is not None
            and content == self._sealed_content
            and now - self._sealed_at < REFRESH_SECONDS
        ):
            return
        wall = self.clocks.wall()
        record = MemberRecord(info, endpoints, self.versions.next(wall), int(wall) + TTL_SECONDS)
        try:
            try:
                self.registration = self._seal(record)
            except ValueError:
                if not info.relay_rtts:
                    raise
                # Too large with the round trips to relays: said without them (pairs then
                # rank this node's relays by hash), rather than not at all.
                self.registration = self._seal(replace(record, info=replace(info, relay_rtts=())))
        except ValueError as error:
            self._report_once(f"cannot register: {error}")
            return
        self._sealed_content, self._sealed_at = content, now
        for session in self.sessions:
            session.set_registration(self.registration)

    def _roamed(self, addresses: tuple[IPAddress, ...], now: float) -> bool:
        """Whether this node's underlay (its addresses, its default route) changed and has
        settled: then its NAT mapping is learned again and every peer hears from it at once,
        so they follow it to its new address without waiting for discovery."""
        if self._underlay is not None and addresses != self._underlay:
            self._underlay_changed_at = now
        self._underlay = addresses
        changed = self._underlay_changed_at
        if changed is None or now - changed < ROAM_SETTLE_SECONDS:
            return False
        self._underlay_changed_at = None
        log.info(
            "underlay changed: addresses=%s; learning the NAT mapping again, nudging peers",
            ",".join(str(a) for a in addresses) or "(none)",
        )
        self._on_roam()
        return True

    def _on_roam(self) -> None:
        if self.stun is not None:
            self.stun.trigger()
        for session in self.sessions:
            session.refresh_address()

    def stun_reflectors(self) -> tuple[Endpoint, ...]:
        """Where to ask for the NAT mapping: what the discovery services name, then the
        configured STUN servers (resolved here: called from the prober's own thread)."""
        named = [r for s in self.sessions for r in s.stun_reflectors]
        for host, port in self.config.kubespan.stun_servers:
            named.extend(resolve_udp(host, port))
        return tuple(dict.fromkeys(named))[:MAX_REFLECTORS]

    def _learned(self, result: Reflexive) -> None:
        """Take a probe's result; one no reflector answered is held back (see
        UNANSWERED_KEEP_SECONDS) while the last answered one stands."""
        if self._stun_heard and not any(a.mapped for a in result.answers):
            now = self.clocks.monotonic()
            first = self._unanswered is None
            since = now if self._unanswered is None else self._unanswered[1]
            self._unanswered = (result, since)
            self._forget_unanswered(now)
            if self._unanswered is not None:
                if first:
                    log.info(
                        "no STUN reflector answered; keeping the NAT mapping %s for up to %ds",
                        ",".join(str(e) for e in self.mapped) or "none",
                        UNANSWERED_KEEP_SECONDS,
                    )
                self.nat_status = {
                    **(self.nat_status or {}),
                    "reflectors": self._reflector_status(result),
                }
            return
        self._unanswered = None
        self._adopt(result)

    def _forget_unanswered(self, now: float) -> None:
        """Once kept too long, or the underlay changed, what the unanswered probe said
        stands. Every pass asks: the prober reports a result only when it changes, so no
        report comes while probes go on unanswered."""
        if self._unanswered is None:
            return
        result, since = self._unanswered
        known = self._heard_on is not None and self._underlay is not None
        moved = known and self._underlay != self._heard_on
        if not moved and now - since < UNANSWERED_KEEP_SECONDS:
            return
        log.info(
            "no STUN reflector answered for %ds%s: forgetting the NAT mapping",
            now - since,
            " and the underlay changed" if moved else "",
        )
        self._unanswered = None
        self._adopt(result)

    def _adopt(self, result: Reflexive) -> None:
        """Advertise what a peer can use: mappings of an endpoint-independent NAT (or of
        the one reflector asked), sendable addresses, not our own; a NAT that maps every
        destination anew gives nothing worth advertising, and neither does its address."""
        self._stun_heard = any(a.mapped for a in result.answers)
        self._heard_on = self._underlay
        mapped: tuple[Endpoint, ...] = ()
        if result.mapping is not Mapping.ENDPOINT_DEPENDENT:
            own = set(self._underlay or ())
            mapped = tuple(
                e for e in result.endpoints if reachable_unicast(e.address) and e.address not in own
            )[:MAX_MAPPED]
        self.symmetric_nat = result.mapping is Mapping.ENDPOINT_DEPENDENT
        # Where STUN answered, what discovery's HTTP side saw is not needed (and may be an
        # address this node no longer has).
        self._stun_answered = {
            a.mapped.address.version
            for a in result.answers
            if a.mapped and reachable_unicast(a.mapped.address)
        }
        if mapped != self.mapped:
            log.info(
                "NAT mapping of the WireGuard port: %s (%s)",
                ",".join(str(e) for e in mapped) or "none learned",
                result.mapping.value,
            )
        self.mapped = mapped
        self.nat_status = {
            "mapped": [str(e) for e in mapped],
            "mapping": result.mapping.value,
            "reflectors": self._reflector_status(result),
        }

    @staticmethod
    def _reflector_status(result: Reflexive) -> list[dict[str, str | None]]:
        return [
            {"reflector": str(a.reflector), "mapped": str(a.mapped) if a.mapped else None}
            for a in result.answers
        ]

    def _apply_plan(
        self, result: Plan, observed: ObservedLink | None, routing: ObservedRouting
    ) -> list[Operation]:
        """Apply a pass's plan; the operations applied. Keeps the plan's tracking."""
        deferred = set(result.restarts)
        operations = [
            op
            for op in diff(result.desired, observed, routing)
            if not (isinstance(op, SetPeer | RemovePeer) and op.public_key in deferred)
        ]
        if result.nudges:
            link = result.desired.link
            by_key = {p.public_key: p for p in result.desired.peers}
            operations.extend(
                NudgePeer(link.name, key, by_key[key].name, by_key[key].keepalive)
                for key in result.nudges
            )
        applied = self._apply_all(operations)
        tracking = dict(result.tracking)
        if deferred:
            # Recreations go last, decided on a fresh look at the kernel (see _still_silent).
            restarts, heard = self._still_silent(result.restarts, observed)
            applied += self._apply_all(restart_peers([], result.desired, restarts))
            self.counters.peer_restarts += len(restarts)
            for key, before in heard.items():
                # Not recreated: judged next pass against what the kernel had before this
                # one, so what the peer sent meanwhile counts as the evidence it is.
                tracking[key] = replace(
                    tracking[key], rx_bytes=before.rx_bytes, handshake=before.last_handshake
                )
        self.tracking = tracking
        return applied

    def _apply_all(self, operations: list[Operation]) -> list[Operation]:
        for operation in operations:
            self.kernel.apply([operation])
            self._log_applied(operation)
            # Each change applied is progress: a pass that adds a hundred peers on a starved
            # machine may take longer than WatchdogSec, and must not be killed for it (a
            # call that hangs still stops the feeding).
            self._watchdog.feed()
            if isinstance(operation, SetPeer) and operation.endpoint is not None:
                self.counters.endpoint_changes += 1
        return operations

    def _still_silent(
        self, keys: tuple[str, ...], observed: ObservedLink | None
    ) -> tuple[tuple[str, ...], dict[str, ObservedPeer]]:
        """Of the peers the plan recreates, those still unheard from now; and the others,
        with what the kernel had of them before the pass. Recreating a peer throws its
        session away: under load a pass can take seconds, and a handshake the peer completed
        meanwhile (which the plan could not see) must not be undone."""
        before = observed.peer_by_key if observed is not None else {}
        now_seen = self.kernel.observe_link(LINK_NAME)
        current = now_seen.peer_by_key if now_seen is not None else {}
        silent: list[str] = []
        heard: dict[str, ObservedPeer] = {}
        for key in keys:
            was, now = before.get(key), current.get(key)
            if (
                was is not None
                and now is not None
                and (now.rx_bytes > was.rx_bytes or now.last_handshake != was.last_handshake)
            ):
                log.debug("peer %s heard from during the pass: not recreated", key)
                heard[key] = was
                continue
            silent.append(key)
        return tuple(silent), heard

    def _hold_departed(
        self, observed: ObservedLink | None, departed_keys: frozenset[str], now: float
    ) -> None:
        holds = held_departed(self._departed_holds, observed, departed_keys, now)
        for key in holds.keys() - self._departed_holds.keys():
            log.info(
                "peer %s left: what it was routed stays in the tunnel (dropped, never sent in "
                "the clear) for %ds unless a member claims it: %s",
                key,
                HOLD_SECONDS,
                ",".join(str(n) for n in holds[key].ranges[:16]),
            )
        self._departed_holds = holds

    def protected_addresses(self) -> tuple[IPAddress, ...]:
        return tuple(a for s in self.sessions for a in s.addresses)

    def _choose_timing(self, members: tuple[Member, ...] | None) -> None:
        """The wide grid for a mesh of more than WIDE_MESH members (a change is logged)."""
        wide = members is not None and len(members) > WIDE_MESH
        timing = self._wide_timing if wide else self._narrow_timing
        if timing is not self.timing:
            log.info(
                "%d members: probes on a %g s grid (%s %d members), a dead path found within %g s",
                len(members or ()),
                timing.probe_grain,
                "more than" if wide else "at most",
                WIDE_MESH,
                timing.dead_path_within(),
            )
            self.timing = timing

    def reconcile(self) -> list[Operation]:
        """One pass; returns the operations applied (none when nothing changed)."""
        began = self.clocks.monotonic()
        self._forget_unanswered(began)
        local = self.kernel.local_addresses()
        networks = underlay_networks(local, self.prefix)
        info, endpoints = self.local_info(networks)
        self._register(info, endpoints)
        observed = self.kernel.observe_link(LINK_NAME)
        routing = self.kernel.observe_routing(LINK_NAME)
        now, wall = self.clocks.monotonic(), self.clocks.wall()
        roamed = self._roamed(info.addresses, now)
        self._set_membership(*expire(self.membership, wall, _GivenUp(self, now)))
        members = self.membership.members() if self.members_known else None
        self._choose_timing(members)
        departed_keys = self.membership.departed_keys()
        self._hold_departed(observed, departed_keys, now)
        self._tell_own_addresses(local, networks)
        answers = self._path_answers(members)
        relayed = self._relays(members, observed, answers, now)
        if info.relay_rtts != self._relay_rtts:  # said at once: the pair's order hangs on it
            info = replace(info, relay_rtts=self._relay_rtts)
            self._register(info, endpoints)
        result = plan(
            PlanInput(
                config=self.config.kubespan,
                public_key=self.identity.public_key_b64,
                private_key=self.identity.private_key_b64,
                preshared_key=self.keys.wireguard_psk_b64,
                ula=self.ula,
                own_addresses=info.addresses,
                members=members,
                observed=observed,
                tracking=self.tracking,
                now=now,
                wall=wall,
                pod_subnets=self.config.cluster.pod_subnets,
                node_subnets=self.config.cluster.node_subnets,
                protected=self.protected_addresses(),
                departed_keys=departed_keys,
                departed_ranges=held_ranges(self._departed_holds),
                local_networks=networks,
                timing=self.timing,
                nudge_all=roamed,
                probing=now >= self._probing_back_at,
                answers=answers,
                relayed=relayed,
                relay_ports=self.config.kubespan.relay_ports
                if self.relay_server is not None
                else None,
                memo=self._peer_memo,
            )
        )
        self._warnings = (
            *result.warnings,
            *link_warnings(LINK_NAME, observed),
            *dataplane_warnings(LINK_NAME, routing),
        )
        for warning in self._warnings:
            self._report_once(warning)
        applied = self._apply_plan(result, observed, routing)
        if self.paths is not None:
            for key, checked in result.checks:
                self.paths.check(key, checked)
        if result.probes:
            sent = self.kernel.probe(result.probes)
            if sent < len(result.probes):
                # Judged without probes for a while: an unsent probe gets no answer, and
                # silence must not be read as a dead path.
                self._probing_back_at = now + PROBE_RETRY_SECONDS
        self._wake_at = result.wake_at
        if self._timing_read_at is not None:
            self._wake_at = min(self._wake_at or self._timing_read_at, self._timing_read_at)
        if self._underlay_changed_at is not None:
            settle = self._underlay_changed_at + ROAM_SETTLE_SECONDS
            self._wake_at = min(self._wake_at or settle, settle)
        self._log_state_changes(result.reports)
        if self.config.kubespan.harvest_extra_endpoints and members:
            self._harvest(result.reports)
        if not self.ready and self._may_be_ready():
            self._become_ready()
        self._save_cache()
        self._publish(info, endpoints, result.reports)
        self.passes += 1
        self.counters.passes += 1
        self.counters.last_pass_seconds = self.clocks.monotonic() - began
        return applied

    def _tell_own_addresses(
        self,
        local: tuple[LocalAddress, ...],
        networks: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...],
    ) -> None:
        """The path checker hears where peers may see us; the relay, when they change, every
        address configured here, links down included (a relay renumbered drops what was
        bound at the old address; a link that flaps keeps its pairs)."""
        if self.paths is not None:
            self.paths.set_own_addresses(self._own_addresses(networks))
        if self.relay_server is not None and local != self._relay_local:
            self._relay_local = local
            self.relay_server.set_own_addresses(a.address.ip for a in local)

    def _own_addresses(
        self, networks: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...]
    ) -> tuple[IPAddress, ...]:
        """Where peers may see our packets come from: our underlay addresses, the NAT
        mappings STUN learned, and the address discovery saw."""
        mapped = (e.address for e in self.mapped)
        seen = (s.reflexive for s in self.sessions if s.reflexive is not None)
        return (*(n.ip for n in networks), *mapped, *seen)

    def _path_answers(self, members: tuple[Member, ...] | None) -> dict[str, dict[Endpoint, float]]:
        """Tell the path checker who the members are (it answers only them); what their
        candidates answered."""
        if self.paths is None:
            return {}
        if members is not None and members is not self._path_members_of:
            self._path_members_of = members  # the membership's tuple: the same while unchanged
            keys = tuple(sorted(m.info.public_key for m in members))
            if keys != self._path_members:
                self._path_members = keys
                self.paths.set_members(keys)
        return self.paths.answers()

    def _relays(
        self,
        members: tuple[Member, ...] | None,
        observed: ObservedLink | None,
        answers: dict[str, dict[Endpoint, float]],
        now: float,
    ) -> dict[str, tuple[Endpoint, str]]:
        """Tell the relay this node offers to be who the members are; tell this node's side
        which peers to bind at which relays (relay.choice); what is bound, per peer."""
        self._timing_read_at = None
        if members is None:
            return {}
        if self.relay_server is not None and members is not self._relay_members_of:
            self._relay_members_of = members
            keys = tuple(sorted(m.info.public_key for m in members))
            if keys != self._relay_members:
                self._relay_members = keys
                self.relay_server.set_members(raw_key(k) for k in keys)
        if self.relay_client is None:
            return {}
        bound = {base64.b64encode(k).decode(): b for k, b in self.relay_client.bound().items()}
        if members is not self._offered_by:  # the membership's tuple: the same while unchanged
            self._offered_by = members
            self._offered = {
                raw_key(m.info.public_key): (m.info.node_id, m.info.hostname, m.info.relay_ports)
                for m in members
                if m.info.relay_ports is not None
            }
        offered = self._offered
        if not offered and not bound:
            # No member relays, none is bound: nothing per peer (an idle pass's common case).
            self._time_relays((), {}, now, RTT_IDLE_SAMPLE_EVERY)
            self.relay_client.want({}, frozenset(), frozenset())
            return {}
        endpoints = {
            raw_key(p.public_key): p.endpoint
            for p in (observed.peers if observed is not None else ())
            if p.endpoint is not None
        }
        up = [
            raw_key(k)
            for k, state in self._states.items()
            if state is PeerState.UP and k not in bound  # a relay reached through a relay: none
        ]
        offers = offers_of(offered, endpoints, up)
        needed = bool(bound) or any(
            self._states.get(m.info.public_key) is not PeerState.UP for m in members
        )
        self._time_relays(
            offers, endpoints, now, RTT_SAMPLE_EVERY if needed else RTT_IDLE_SAMPLE_EVERY
        )
        if not offers and not bound:
            self.relay_client.want({}, frozenset(), frozenset())  # none reached, none bound
            return {}
        own = self.identity.public_key
        # This side's figures as its sealed record says them: what the peer ranks with.
        ours = self.registration.record.info.relay_rtts if self.registration else ()
        on_a_relay = relay_port_test(members)
        wanted: dict[bytes, tuple[RelayOffer, ...]] = {}
        failing: set[bytes] = set()
        moving: set[bytes] = set()
        for member in members:
            key = member.info.public_key
            at = bound.get(key)
            state = self._states.get(key, PeerState.UNKNOWN)
            relayed_at = at.endpoint if at else None
            direct_answered = any(
                endpoint != relayed_at and now - answered <= self.timing.proven_for
                for endpoint, answered in answers.get(key, {}).items()
            )
            current = endpoints.get(raw_key(key))
            tracked = self.tracking.get(key)
            via_relay = any(
                e is not None and on_a_relay(e)
                for e in (current, tracked.endpoint if tracked else None)
            )
            if offers and wants_relay(
                now, tracked, state, relayed_at, direct_answered, current, via_relay
            ):
                theirs = member.info.relay_rtts
                order = relay_order(own, raw_key(key), offers, ours, theirs)
                if order:
                    wanted[raw_key(key)] = order
                if at is not None and at.paired and nearer(order, at.relay, ours, theirs):
                    moving.add(raw_key(key))
            tracking = self.tracking.get(key)
            if at is not None and at.paired and tracking and at.endpoint in tracking.failed:
                failing.add(raw_key(key))  # said forwarded, yet its trial failed
        self.relay_client.want(wanted, frozenset(failing), frozenset(moving))
        return {
            key: (at.endpoint, at.relay.name) for key, at in bound.items() if raw_key(key) in wanted
        }

    def _time_relays(
        self,
        offers: tuple[RelayOffer, ...],
        endpoints: dict[bytes, Endpoint],
        now: float,
        every: float,
    ) -> None:
        """Time a round trip to each relay this node may use (a path check to its WireGuard
        port): every TIMING_WARMUP_SECONDS until it has ROUND_TRIPS_WANTED, then `every`.
        A relay's figure is the lowest of the latest (pathcheck's ROUND_TRIPS_KEPT), the
        path's own latency (what a busy host or a queue adds to a few answers is noise, and
        must move no pair); what the record says
        follows the figures (relay.choice.published_round_trips)."""
        if self.paths is None:
            return
        self._timed_at = {o.public_key: self._timed_at.get(o.public_key, -1e9) for o in offers}
        figures: dict[str, float] = {}
        for offer in offers:
            key, endpoint = base64.b64encode(offer.public_key).decode(), endpoints[offer.public_key]
            samples = self.paths.round_trips(key, endpoint)
            warm = len(samples) >= ROUND_TRIPS_WANTED
            if warm:
                figures[offer.node_id] = min(samples)
            due = self._timed_at[offer.public_key] + (every if warm else TIMING_WARMUP_SECONDS)
            if now >= due:
                self._timed_at[offer.public_key] = now
                self.paths.measure(key, endpoint)
                due = now + (every if warm else TIMING_WARMUP_SECONDS)
            if not warm:
                self._timing_read_at = min(self._timing_read_at or due, due)
        self._relay_names = {o.node_id: o.name for o in offers}
        published = published_round_trips(self._relay_rtts, figures)
        if published != self._relay_rtts:
            log.info(
                "round trips to relays: %s",
                " ".join(f"{self._relay_names.get(n, n)}={ms}ms" for n, ms in published) or "-",
            )
            self._relay_rtts = published

    def _relay_status(self) -> dict[str, Any] | None:
        if self.relay_server is None:
            return None
        first, count = self.config.kubespan.relay_ports
        return {
            "ports": f"{first}-{first + count - 1}",
            "pairs": [
                {
                    "first": f"{p.first.mapping} -> {p.relay_address(p.first)}:{p.first.port}",
                    "second": f"{p.second.mapping} -> {p.relay_address(p.second)}:{p.second.port}",
                    "bytes": sent,
                }
                for p, sent in self.relay_server.traffic()
            ],
        }

    def _publish(
        self, info: AffiliateInfo, endpoints: tuple[Endpoint, ...], reports: tuple[PeerReport, ...]
    ) -> None:
        discovery = [s.status() for s in self.sessions]
        ready, wall, warnings, last_error = (
            self.ready,
            self.clocks.wall(),
            self._warnings,
            self.last_error,
        )
        # What the document is made of, as this pass leaves it: nat_status, _state_since and
        # _relay_names are replaced by later passes, never changed in place.
        nat, state_since, relay, relay_names = (
            self.nat_status,
            self._state_since,
            self._relay_status(),
            self._relay_names,
        )
        status = LazyStatus(
            lambda: status_document(
                info,
                endpoints,
                reports,
                discovery,
                ready,
                wall,
                warnings=warnings,
                last_error=last_error,
                nat=nat,
                state_since=state_since,
                pid=os.getpid(),
                relay=relay,
                relay_names=relay_names,
            )
        )
        self._last_status = status
        # The file is only the fallback when no agent answers: written when what it says
        # changed beyond counters and ages, and every STATUS_FILE_EVERY_SECONDS otherwise
        # (at every pass it was a tenth of an idle pass; every 30 s, with a hundred peers,
        # still a fifth); the live status has every pass.
        lasting = (
            ready,
            last_error,
            warnings,
            info,
            endpoints,
            nat,
            tuple(map(_LASTING_REPORT, reports)),
            tuple(
                (d["url"], d["registered"], d["public_address"], d["last_error"]) for d in discovery
            ),
        )
        now = self.clocks.monotonic()
        to_file = (
            lasting != self._status_file_said
            or now - self._status_file_at >= STATUS_FILE_EVERY_SECONDS
        )
        self._write_status(status, to_file)
        if to_file:
            self._status_file_said, self._status_file_at = lasting, now
        up = list(map(_STATE, reports)).count(PeerState.UP)  # no Python per report
        line = f"{len(reports)} peers, {up} up"
        if line != self._status_line:  # systemd has it: each datagram costs PID 1 work too
            self._status_line = line
            notify.status(line)

    @property
    def _last_document(self) -> dict[str, Any] | None:
        """The last pass's status document (made now if nothing asked for it yet)."""
        return None if self._last_status is None else self._last_status.document()

    def _write_status(self, status: LazyStatus, to_file: bool = True) -> None:
        if to_file:
            write_status_file(self.runtime_dir, status.encoded())
        if self.latest is not None:
            self.latest.set(status.encoded)

    def _write_last_status(self) -> None:
        """The file says what the last pass saw, counters too, when the loop ends."""
        if self._last_status is None:
            return
        try:
            write_status_file(self.runtime_dir, self._last_status.encoded())
        except OSError as error:
            log.warning("could not write the status file: %s", error)

    def _publish_failure(self) -> None:
        """A pass that failed still shows in the status: its error, and the rest as the
        last good pass left it (or this node alone, when none has succeeded yet)."""
        try:
            document = self._last_document
            if document is None:
                info = AffiliateInfo(
                    self.hostname(),
                    self.identity.node_id,
                    self.identity.public_key_b64,
                    self.ula,
                    (),
                )
                document = status_document(
                    info, (), (), [s.status() for s in self.sessions], False, 0.0
                )
            self._write_status(
                LazyStatus.of(
                    {
                        **document,
                        "updated_at": self.clocks.wall(),
                        "ready": self.ready,
                        "last_error": self.last_error,
                        "pid": os.getpid(),
                    }
                )
            )
        except Exception:  # the status must never be what stops the loop
            log.exception("could not publish the status")

    @staticmethod
    def _log_applied(operation: Operation) -> None:
        # Endpoint trials are routine (debug); every other change is news (info).
        routine = isinstance(operation, NudgePeer) or (
            isinstance(operation, SetPeer)
            and operation.allowed_ips is None
            and operation.preshared_key is None
            and operation.keepalive is None
        )
        log.log(logging.DEBUG if routine else logging.INFO, "applied %s", operation.render())

    def _log_state_changes(self, reports: tuple[PeerReport, ...]) -> None:
        states = dict(map(_KEY_AND_STATE, reports))  # no Python step per report
        if states == self._states:
            return  # an idle pass: no peer changed state
        wall = self.clocks.wall()
        self._state_since = {
            r.public_key: self._state_since.get(r.public_key, wall)
            if self._states.get(r.public_key) == r.state
            else wall
            for r in reports
        }
        for report in reports:
            if self._states.get(report.public_key) != report.state:
                log.info(
                    "peer %s state=%s endpoint=%s why=%r key=%s",
                    report.name,
                    report.state.value,
                    report.endpoint,
                    report.why,
                    report.public_key,
                )
        self._states = states
