"""The reconcile loop: observe, plan, diff, apply, publish status; on every input and each tick.

Inputs arrive on one queue (discovery listings, the public address discovery saw, stop); a
pass runs after each batch of inputs and at least every TICK seconds, since peer state needs
time to pass. Doing a pass twice changes nothing the second time.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kubespan import notify
from kubespan.agent.backoff import Backoff
from kubespan.agent.events import ConfigChanged, Stop, Terminal
from kubespan.agent.session import TTL_SECONDS, DiscoverySession, ListingEvent, ReflexiveEvent
from kubespan.agent.status import status_document, write_status
from kubespan.config import MachineConfig
from kubespan.crypto import ClusterKeys
from kubespan.discovery.members import merge_members, open_listing
from kubespan.errors import ApplyError
from kubespan.identity import Identity, LinkHardware, fallback_mac, first_physical_mac, node_ula
from kubespan.identity import ula_prefix as cluster_ula_prefix
from kubespan.model import AffiliateInfo, LocalAddress, Member, ObservedLink, PeerState
from kubespan.names import LINK_NAME
from kubespan.plan.dataplane import ObservedRouting, dataplane_warnings
from kubespan.plan.desired import PeerReport, PlanInput, plan
from kubespan.plan.diff import Operation, diff
from kubespan.plan.harvest import Harvest, harvest_candidates
from kubespan.plan.local import advertised_addresses, advertised_endpoints
from kubespan.plan.peerstate import Tracking

log = logging.getLogger(__name__)

TICK_SECONDS = 5.0
READY_TIMEOUT_SECONDS = 30.0


class KernelPort(Protocol):
    """What the loop needs from the kernel shell (apply.kernel.Kernel in production)."""

    def observe_link(self, name: str) -> ObservedLink | None: ...
    def observe_routing(self, link: str) -> ObservedRouting: ...
    def local_addresses(self) -> tuple[LocalAddress, ...]: ...
    def link_hardware(self) -> tuple[LinkHardware, ...]: ...
    def apply(self, operations: list[Operation]) -> None: ...
    def teardown(self) -> list[str]: ...


@dataclass
class Clocks:
    wall: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic


class Agent:
    def __init__(
        self,
        config: MachineConfig,
        identity: Identity,
        kernel: KernelPort,
        runtime_dir: Path,
        clocks: Clocks | None = None,
        rng: random.Random | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
        hostname: Callable[[], str] = socket.gethostname,
        tick: float = TICK_SECONDS,
        ready_timeout: float = READY_TIMEOUT_SECONDS,
        events: queue.Queue[Any] | None = None,
    ) -> None:
        self.config = config
        self.identity = identity
        self.kernel = kernel
        self.runtime_dir = runtime_dir
        self.clocks = clocks or Clocks()
        self.rng = rng or random.Random()
        self.hostname = hostname
        self.tick = tick
        self.ready_timeout = ready_timeout
        self.events: queue.Queue[Any] = events if events is not None else queue.Queue()
        self.keys = ClusterKeys.derive(config.cluster.id, config.cluster.secret)
        self.sessions = [
            DiscoverySession(url, self.keys, self.events, self.rng, random_bytes)
            for url in config.cluster.discovery.service_endpoints
        ]
        self.members_by_url: dict[str, tuple[Member, ...]] = {}
        self.tracking: dict[str, Tracking] = {}
        self.ready = False
        self._reported: set[str] = set()
        self._states: dict[str, PeerState] = {}
        self._harvested: dict[Harvest, float] = {}
        self.prefix = cluster_ula_prefix(config.cluster.id)
        mac = first_physical_mac(kernel.link_hardware())
        if mac is None:
            log.warning("no physical interface with a MAC; deriving the ULA host part from node id")
            mac = fallback_mac(identity.node_id)
        self.ula = node_ula(config.cluster.id, mac)

    def stop(self) -> None:
        self.events.put(Stop())

    def run(self) -> Terminal:
        """Reconcile until stopped or given a new config; returns the event that ended it."""
        log.info(
            "starting node_id=%s public_key=%s ula=%s discovery=%s",
            self.identity.node_id,
            self.identity.public_key_b64,
            self.ula,
            ",".join(s.url for s in self.sessions),
        )
        for session in self.sessions:
            session.start()
        started = self.clocks.monotonic()
        backoff = Backoff(base=1.0, cap=30.0, rng=self.rng)
        next_pass = started
        try:
            while True:
                terminal = self._wait_inputs(next_pass)
                if terminal is not None:
                    return terminal
                try:
                    self.reconcile()
                except ApplyError as error:
                    delay = backoff.next_delay()
                    log.error(
                        "apply failed, keeping the previous state; retry_in=%.1fs error=%s",
                        delay,
                        error,
                    )
                    next_pass = self.clocks.monotonic() + delay
                    continue
                backoff.reset()
                next_pass = self.clocks.monotonic() + self.tick
                heard = bool(self.members_by_url) or not self.sessions
                waited = self.clocks.monotonic() - started >= self.ready_timeout
                if not self.ready and (heard or waited):
                    self._become_ready(heard)
        finally:
            for session in self.sessions:
                session.stop()

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
            self._take(event)
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return None

    def _take(self, event: object) -> None:
        if isinstance(event, ListingEvent):
            members, problems = open_listing(self.keys, event.listing)
            for problem in problems:
                self._report_once(f"discovery {event.url}: {problem}")
            self.members_by_url[event.url] = members
            log.info(
                "discovery update url=%s revision=%d members=%d",
                event.url,
                event.listing.revision,
                len(members),
            )
        elif isinstance(event, ReflexiveEvent):
            pass  # the pass below reads the new address from the session

    def _become_ready(self, heard: bool) -> None:
        self.ready = True
        peers = len(self.tracking)
        if heard:
            message = f"mesh configured, {peers} peers"
        else:
            message = f"discovery unreachable after {self.ready_timeout:g}s; {peers} peers"
        log.info("ready: %s", message)
        notify.ready(message)

    def _harvest(self, members: tuple[Member, ...], reports: tuple[PeerReport, ...]) -> None:
        now = self.clocks.wall()
        refresh = TTL_SECONDS / 2
        for node_id, endpoint in harvest_candidates(
            members, reports, self._harvested, now, refresh
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
        urls = {session.url for session in self.sessions}
        self.members_by_url = {u: m for u, m in previous.members_by_url.items() if u in urls}
        self.tracking = dict(previous.tracking)

    def leave(self) -> None:
        """Remove this node from every discovery service (best effort): peers drop it now
        instead of when its registration expires."""
        affiliate = self.keys.affiliate_id(self.identity.node_id)
        for session in self.sessions:
            session.leave(affiliate)

    def _report_once(self, message: str) -> None:
        if message not in self._reported:
            self._reported.add(message)
            log.warning("%s", message)

    def local_info(self) -> tuple[AffiliateInfo, tuple[Any, ...]]:
        addresses = advertised_addresses(self.kernel.local_addresses(), self.prefix)
        reflexive = next((s.reflexive for s in self.sessions if s.reflexive), None)
        endpoints = advertised_endpoints(addresses, reflexive, self.config.kubespan)
        info = AffiliateInfo(
            node_id=self.identity.node_id,
            hostname=self.hostname(),
            public_key=self.identity.public_key_b64,
            ula=self.ula,
            addresses=addresses,
        )
        return info, endpoints

    def reconcile(self) -> list[Operation]:
        """One pass; returns the operations applied (none when nothing changed)."""
        info, endpoints = self.local_info()
        for session in self.sessions:
            session.set_registration(info, endpoints)
        observed = self.kernel.observe_link(LINK_NAME)
        routing = self.kernel.observe_routing(LINK_NAME)
        members = merge_members(list(self.members_by_url.values())) if self.members_by_url else None
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
                now=self.clocks.wall(),
            )
        )
        for warning in (*result.warnings, *dataplane_warnings(LINK_NAME, routing)):
            self._report_once(warning)
        operations = diff(result.desired, observed, routing)
        for operation in operations:
            log.info("apply %s", operation.render())
        if operations:
            self.kernel.apply(operations)
        self._log_state_changes(result.reports)
        self.tracking = dict(result.tracking)
        if self.config.kubespan.harvest_extra_endpoints and members:
            self._harvest(members, result.reports)
        document = status_document(
            info,
            endpoints,
            result.reports,
            [s.status() for s in self.sessions],
            self.ready,
            self.clocks.wall(),
        )
        write_status(self.runtime_dir, document)
        up = sum(1 for r in result.reports if r.state is PeerState.UP)
        notify.status(f"{len(result.reports)} peers, {up} up")
        return operations

    def _log_state_changes(self, reports: tuple[PeerReport, ...]) -> None:
        for report in reports:
            if self._states.get(report.public_key) != report.state:
                log.info(
                    "peer %s state=%s endpoint=%s key=%s",
                    report.name,
                    report.state.value,
                    report.endpoint,
                    report.public_key,
                )
        self._states = {r.public_key: r.state for r in reports}
