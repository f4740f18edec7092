"""The agent's membership end to end on in-memory kernels: sealed leave and sealed expiry,
the peer cache and READY while discovery is down, what a node advertises, and a loop that
outlives every error."""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import socket
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import pytest

from kubespan.agent.events import KernelChanged
from kubespan.agent.loop import Agent, Clocks
from kubespan.agent.peercache import save_membership
from kubespan.agent.session import LEAVE_DEADLINE_SECONDS, ListingEvent
from kubespan.agent.status import STATUS_FILE
from kubespan.config import parse_config
from kubespan.discovery.listing import parse_listing_answer
from kubespan.discovery.payload import sign_record
from kubespan.identity import LinkHardware, load_or_create_identity
from kubespan.model import ObservedLink
from kubespan.plan.departed import HOLD_SECONDS
from kubespan.plan.membership import Known, Membership
from kubespan.plan.peerstate import GRAIN as TIMING_GRAIN
from kubespan.plan.peerstate import WIDE_GRAIN, WIDE_MESH

from agents import config_text, running, wait_for
from fakekernel import FakeKernel, local_address
from hostile import Stored, hostile_service

WALL0 = 1_800_000_000.0


class FakeTime:
    def __init__(self) -> None:
        self.offset = 0.0

    def clocks(self) -> Clocks:
        return Clocks(wall=lambda: WALL0 + self.offset, monotonic=lambda: 500.0 + self.offset)


def node(
    tmp: Path, name: str, octet: int, config: bytes, time: FakeTime | None = None
) -> tuple[Agent, FakeKernel]:
    kernel = FakeKernel(
        addresses=(
            local_address("ens3", f"192.0.2.{octet}/24"),
            local_address("ens4", f"10.96.0.{octet}/24"),
        ),
        hardware=(LinkHardware("ens3", f"52:54:00:00:00:{octet:02x}", True),),
    )
    agent = Agent(
        parse_config(config, "cfg.yaml"),
        load_or_create_identity(tmp / name / "state"),
        kernel,
        tmp / name / "run",
        tmp / name / "state",
        clocks=time.clocks() if time else None,
        hostname=lambda: name,
        tick=0.2,
        ready_timeout=30,
    )
    return agent, kernel


def peers(kernel: FakeKernel) -> set[str]:
    return {p.public_key for p in kernel.link.peers} if kernel.link else set()


def stored(agent: Agent) -> Stored:
    """The agent's current record, as the service would hold it after its PUT."""
    assert agent.registration is not None
    return Stored(base64.b64encode(agent.registration.data).decode(), [])


def listing_of(url: str, body: bytes) -> ListingEvent:
    listing, problems = parse_listing_answer(json.loads(body))
    return ListingEvent(url, listing, tuple(problems))


def test_a_sealed_leave_removes_the_member_at_once(
    tmp_path: Path, cluster_id: str, cluster_secret: str
) -> None:
    with hostile_service() as service:
        config = config_text(service.url, cluster_id, cluster_secret)
        alpha, _ = node(tmp_path, "alpha", 11, config)
        beta, beta_kernel = node(tmp_path, "beta", 12, config)
        alpha.reconcile()  # seals alpha's record
        assert alpha.registration is not None
        registration = alpha.registration
        service.current[registration.affiliate_id] = stored(alpha)
        service.history[registration.affiliate_id] = [stored(alpha)]
        beta._take(listing_of(service.url, service.honest_body()))
        beta.reconcile()
        assert peers(beta_kernel) == {alpha.identity.public_key_b64}

        alpha.leave()  # puts a sealed leave record on the service
        beta._take(listing_of(service.url, service.honest_body()))
        beta.reconcile()
        assert peers(beta_kernel) == set()
        # The service serving alpha's older record again cannot bring it back.
        old = service.history[registration.affiliate_id][0]
        with service.lock:
            service.current[registration.affiliate_id] = old
        beta._take(listing_of(service.url, service.honest_body()))
        beta.reconcile()
        assert peers(beta_kernel) == set()


def test_an_expired_member_is_removed_only_when_its_tunnel_is_down(
    tmp_path: Path, cluster_id: str, cluster_secret: str
) -> None:
    time = FakeTime()
    config = config_text("http://127.0.0.1:9", cluster_id, cluster_secret)
    alpha, _ = node(tmp_path, "alpha", 11, config, time)
    gamma, _ = node(tmp_path, "gamma", 13, config, time)
    beta, kernel = node(tmp_path, "beta", 12, config, time)
    for agent in (alpha, gamma):
        agent.reconcile()
    with hostile_service() as service:
        for agent in (alpha, gamma):
            assert agent.registration is not None
            service.current[agent.registration.affiliate_id] = stored(agent)
        beta._take(listing_of(service.url, service.honest_body()))
    beta.reconcile()
    alpha_key, gamma_key = alpha.identity.public_key_b64, gamma.identity.public_key_b64
    assert peers(kernel) == {alpha_key, gamma_key}
    # Both records expire 30 minutes on; gamma's tunnel keeps working, alpha's never did.
    for minute in range(1, 41):
        time.offset = minute * 60.0
        kernel.handshake(gamma_key, WALL0 + time.offset - 10)
        beta.reconcile()
        expected = {alpha_key, gamma_key} if minute < 30 else {gamma_key}
        assert peers(kernel) == expected, minute


def test_a_node_booting_while_discovery_is_down_is_ready_from_its_cache(
    tmp_path: Path, cluster_id: str, cluster_secret: str
) -> None:
    config = config_text("http://127.0.0.1:9", cluster_id, cluster_secret)
    time = FakeTime()
    alpha, _ = node(tmp_path, "alpha", 11, config, time)
    alpha.reconcile()
    beta, _ = node(tmp_path, "beta", 12, config, time)
    with hostile_service() as service:
        assert alpha.registration is not None
        service.current[alpha.registration.affiliate_id] = stored(alpha)
        beta._take(listing_of(service.url, service.honest_body()))
    assert (tmp_path / "beta" / "state" / "peers.json").exists()

    # "Reboot": a new agent and an empty kernel; discovery (port 9) refuses connections.
    rebooted, kernel = node(tmp_path, "beta", 12, config, time)
    assert rebooted.from_cache
    with running(rebooted):
        wait_for(lambda: rebooted.ready, "READY from the cache", timeout=15)
        assert peers(kernel) == {alpha.identity.public_key_b64}
        status_file = tmp_path / "beta" / "run" / STATUS_FILE
        # READY is sent within the pass; the status file is written at its end.
        wait_for(lambda: json.loads(status_file.read_text())["ready"], "the status to say it")
        assert len(json.loads(status_file.read_text())["peers"]) == 1


def test_without_cache_or_discovery_ready_waits_for_the_timeout(
    tmp_path: Path, cluster_id: str, cluster_secret: str
) -> None:
    config = config_text("http://127.0.0.1:9", cluster_id, cluster_secret)
    agent, _ = node(tmp_path, "lonely", 11, config)
    agent.ready_timeout = 8
    with running(agent):
        wait_for(lambda: agent.failed == {"http://127.0.0.1:9"}, "discovery to fail")
        assert not agent.ready  # nothing known: not ready on a failure alone
        wait_for(lambda: agent.ready, "READY after the timeout", timeout=15)


def test_a_damaged_cache_is_set_aside_and_the_agent_starts(
    tmp_path: Path, cluster_id: str, cluster_secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_text("http://127.0.0.1:9", cluster_id, cluster_secret)
    (tmp_path / "n" / "state").mkdir(parents=True)
    (tmp_path / "n" / "state" / "peers.json").write_bytes(b"{" * 100_000)
    agent, _ = node(tmp_path, "n", 11, config)
    assert not agent.members_known
    assert "peer cache is damaged" in caplog.text


def test_excluded_networks_are_not_advertised(
    tmp_path: Path, cluster_id: str, cluster_secret: str
) -> None:
    config = config_text("https://discovery.example", cluster_id, cluster_secret).replace(
        b"      enabled: true\ncluster",
        b"      enabled: true\n      filters:\n        excludeAdvertisedNetworks: [10.96.0.0/12]"
        b"\ncluster",
    )
    agent, _ = node(tmp_path, "n", 11, config)
    info, endpoints = agent.local_info()
    assert [str(a) for a in info.addresses] == ["192.0.2.11"]
    assert [str(e) for e in endpoints] == ["192.0.2.11:51820"]


def test_plain_http_discovery_is_warned_about(
    tmp_path: Path, cluster_id: str, cluster_secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    agent, _ = node(
        tmp_path, "n", 11, config_text("http://127.0.0.1:9", cluster_id, cluster_secret)
    )
    with running(agent):
        wait_for(lambda: "is plain http" in caplog.text, "the warning")
    assert "is plain http" in caplog.text and "use https" in caplog.text


def test_a_foreign_link_under_our_name_blocks_member_traffic(
    tmp_path: Path, cluster_id: str, cluster_secret: str
) -> None:
    config = config_text("http://127.0.0.1:9", cluster_id, cluster_secret)
    agent, kernel = node(tmp_path, "n", 11, config)
    agent.membership, agent.members_known = Membership(), True
    kernel.link = ObservedLink(1500, True, (), None, 0, 0, (), kind="veth")
    operations = [op.render() for op in agent.reconcile()]
    assert not any(op.startswith(("wg ", "ip link", "ip address", "sysctl")) for op in operations)
    assert not any("dev kubespan" in op for op in operations)
    assert any("unreachable default" in op for op in operations)
    status = json.loads((tmp_path / "n" / "run" / STATUS_FILE).read_text())
    assert any("of kind veth exists and is not kubespan's" in w for w in status["warnings"])


class Flaky(FakeKernel):
    """A kernel shell that fails in ways nobody planned for, a few times."""

    failures = 3

    def observe_link(self, name: str) -> ObservedLink | None:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("something nobody expected")
        return super().observe_link(name)


def test_the_loop_outlives_unexpected_errors(
    tmp_path: Path, cluster_id: str, cluster_secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = config_text("http://127.0.0.1:9", cluster_id, cluster_secret)
    agent, kernel = node(tmp_path, "n", 11, config)
    flaky = Flaky(addresses=kernel.addresses, hardware=kernel.hardware)
    agent.kernel = flaky
    with running(agent):
        wait_for(lambda: flaky.link is not None, "a pass that works", timeout=30)
        assert "reconcile pass failed" in caplog.text


def test_refused_claims_are_shown_in_status(
    tmp_path: Path, cluster_id: str, cluster_secret: str
) -> None:
    config = config_text("http://127.0.0.1:9", cluster_id, cluster_secret)
    alpha, _ = node(tmp_path, "alpha", 11, config)
    alpha.reconcile()
    beta, _ = node(tmp_path, "beta", 12, config)
    assert alpha.registration is not None
    record = alpha.registration.record
    greedy = sign_record(
        replace(
            record,
            info=replace(record.info, pod_cidrs=(ipaddress.ip_network("0.0.0.0/1"),)),
            version=record.version + 1,
        ),
        alpha.identity.private_key,
        bytes(64),
    )
    known = Membership({record.info.node_id: Known(greedy)})
    save_membership(beta.state_dir, known, beta.keys.cluster_address)
    beta, _ = node(tmp_path, "beta", 12, config)
    beta.reconcile()
    status = json.loads((tmp_path / "beta" / "run" / STATUS_FILE).read_text())
    (peer,) = status["peers"]
    assert peer["refused"] == [
        "0.0.0.0/1 claimed by member alpha is not routed to it: a pod CIDR must be no shorter "
        "than /16"
    ]


def test_a_kernel_change_wakes_the_loop_before_its_tick(
    tmp_path: Path, cluster_id: str, cluster_secret: str
) -> None:
    """The KernelWatcher's callback puts KernelChanged on the agent's queue (cli.py); the loop
    runs a pass on it at once, not at its next tick."""
    config = config_text("http://127.0.0.1:9", cluster_id, cluster_secret)
    agent, _ = node(tmp_path, "n", 11, config)
    agent.tick = 3600.0
    agent.sessions = []  # nothing else to wake the loop
    with running(agent):
        wait_for(lambda: agent.passes >= 1, "the first pass")
        before = agent.passes
        agent.events.put(KernelChanged("nftables table inet kubespan"))
        wait_for(lambda: agent.passes > before, "a pass on the kernel change", timeout=10)


def test_leaving_tells_every_service_at_once_within_one_deadline(
    tmp_path: Path, cluster_id: str, cluster_secret: str
) -> None:
    """Three services that never answer and one that does: the leave reaches the one that
    answers, and leaving takes one deadline, not one per service (one after another, a few
    slow services would outlast the unit's TimeoutStopSec=30 and the agent be killed)."""
    with ExitStack() as stack:
        service = stack.enter_context(hostile_service())
        silent = [stack.enter_context(socket.create_server(("127.0.0.1", 0))) for _ in range(3)]
        urls = [f"http://127.0.0.1:{s.getsockname()[1]}" for s in silent] + [service.url]
        config = config_text(urls[0], cluster_id, cluster_secret).replace(
            f"endpoint: {urls[0]}".encode(), f"endpoints: [{', '.join(urls)}]".encode()
        )
        agent, _ = node(tmp_path, "leaving", 11, config)
        agent.reconcile()
        assert agent.registration is not None
        affiliate = agent.registration.affiliate_id
        started = time.monotonic()
        agent.leave()
        took = time.monotonic() - started
        assert took < 2 * LEAVE_DEADLINE_SECONDS, took
        assert affiliate in service.puts


def test_what_a_node_that_left_was_routed_stays_in_the_tunnel_for_a_while(
    tmp_path: Path, cluster_id: str, cluster_secret: str
) -> None:
    with hostile_service() as service:
        time = FakeTime()
        config = config_text(service.url, cluster_id, cluster_secret)
        alpha, _ = node(tmp_path, "alpha", 11, config, time)
        beta, beta_kernel = node(tmp_path, "beta", 12, config, time)
        alpha.reconcile()
        assert alpha.registration is not None
        service.current[alpha.registration.affiliate_id] = stored(alpha)
        beta._take(listing_of(service.url, service.honest_body()))
        beta.reconcile()
        assert peers(beta_kernel) == {alpha.identity.public_key_b64}
        alpha_address = ipaddress.ip_network("192.0.2.11/32")

        def in_tunnel() -> bool:
            ruleset = beta_kernel.last_ruleset
            assert ruleset is not None
            return any(alpha_address.subnet_of(n) for n in ruleset.members_v4)  # type: ignore[arg-type]

        assert in_tunnel()
        alpha.leave()
        beta._take(listing_of(service.url, service.honest_body()))
        beta.reconcile()
        assert peers(beta_kernel) == set()
        assert in_tunnel()  # no peer takes it: dropped, not sent in the clear
        time.offset += HOLD_SECONDS - 1
        beta.reconcile()
        assert in_tunnel()
        time.offset += 1
        beta.reconcile()
        assert not in_tunnel()


def test_a_mesh_of_more_than_wide_mesh_peers_probes_on_the_wide_grid(
    tmp_path: Path, cluster_id: str, cluster_secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Up to WIDE_MESH members, the default timing and tick; past it, the agent plans with
    the widened timing (rounds of probes every WIDE_GRAIN) and its tick makes no pass
    between two rounds; the change is logged, once."""
    caplog.set_level(logging.INFO, logger="kubespan")
    time = FakeTime()
    config = config_text("http://127.0.0.1:9", cluster_id, cluster_secret)
    others = [node(tmp_path, f"m{i}", 20 + i, config, time)[0] for i in range(WIDE_MESH + 1)]
    beta, kernel = node(tmp_path, "beta", 12, config, time)
    for agent in others:
        agent.reconcile()  # seals its record
    with hostile_service() as service:

        def listed(members: list[Agent]) -> None:
            service.current.clear()
            for agent in members:
                assert agent.registration is not None
                service.current[agent.registration.affiliate_id] = stored(agent)
            beta._take(listing_of(service.url, service.honest_body()))
            beta.reconcile()

        listed(others[:WIDE_MESH])
        assert len(peers(kernel)) == WIDE_MESH
        assert beta.timing.probe_grain == beta.timing.backoff_grain == TIMING_GRAIN
        beta._wake_at = None  # no trial to poll: the tick alone
        assert beta.next_pass_at() == pytest.approx(time.clocks().monotonic() + 0.2)

        listed(others)
        assert len(peers(kernel)) == WIDE_MESH + 1
        assert beta.timing.probe_grain == beta.timing.probe_interval == WIDE_GRAIN
        assert beta.timing.backoff_grain == WIDE_GRAIN
        beta._wake_at = None
        assert beta.next_pass_at() == pytest.approx(time.clocks().monotonic() + 2 * WIDE_GRAIN)
        wide = (
            "17 members: probes on a 8 s grid (more than 16 members), a dead path found within 19 s"
        )
        assert caplog.text.count(wide) == 1
        assert "probes on a 4 s grid" not in caplog.text
