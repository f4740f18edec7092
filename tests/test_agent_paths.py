"""The agent's paths to its peers on in-memory kernels: the NAT mapping STUN learned is
advertised and shown; an underlay change is acted on once settled (STUN asked again, every
peer nudged, a new record); quiet peers are probed; passes come as soon as a trial needs."""

from __future__ import annotations

import ipaddress
import json
import queue
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kubespan.agent import loop
from kubespan.agent.events import KernelChanged
from kubespan.agent.loop import ROAM_SETTLE_SECONDS, STATUS_FILE_EVERY_SECONDS, Agent, Clocks
from kubespan.agent.reflexive import ReflexiveLearned
from kubespan.agent.status import STATUS_FILE, LazyStatus, status_document
from kubespan.agent.statusserver import LatestStatus
from kubespan.apply.changes import DEFAULT_ROUTE, OTHER_LINK, joined
from kubespan.config import parse_config
from kubespan.identity import LinkHardware, load_or_create_identity
from kubespan.model import AffiliateInfo, MemberRecord
from kubespan.netaddr import Endpoint, IPAddress
from kubespan.pathcheck.checker import PathAnswered
from kubespan.plan.membership import Known, Membership
from kubespan.stun.prober import Mapping, ReflectorAnswer, Reflexive

from agents import config_text
from fakekernel import FakeKernel, local_address

MAPPED = Endpoint(ipaddress.ip_address("198.51.100.40"), 61000)
REFLECTOR = Endpoint(ipaddress.ip_address("192.0.2.1"), 3478)


class FakeStun:
    """Stands in for the STUN prober thread: counts what the agent asks of it."""

    def __init__(
        self, events: queue.Queue[Any], port: int, reflectors: Callable[[], Sequence[Endpoint]]
    ) -> None:
        self.port = port
        self.reflectors = reflectors
        self.triggers = 0
        self.running = False

    def start(self) -> None:
        self.running = True

    def trigger(self) -> None:
        self.triggers += 1

    def stop(self) -> None:
        self.running = False

    def join(self, timeout: float | None = None) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def clocks(self) -> Clocks:
        return Clocks(wall=lambda: 1_800_000_000 + self.now, monotonic=lambda: self.now)


class FakePaths:
    """Stands in for the path checker thread: records what the agent asks; the test says
    which endpoints answered."""

    def __init__(
        self, events: queue.Queue[Any], port: int, private: bytes, public: bytes, key: bytes
    ) -> None:
        self.members: tuple[str, ...] = ()
        self.own: tuple[IPAddress, ...] = ()
        self.checked: list[tuple[str, tuple[Endpoint, ...]]] = []
        self.answered: dict[str, dict[Endpoint, float]] = {}
        self.measured: list[tuple[str, Endpoint]] = []
        self.timings: dict[tuple[str, Endpoint], tuple[float, ...]] = {}  # what the test says
        self.running = False

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False

    def join(self, timeout: float | None = None) -> None:
        pass

    def set_members(self, public_keys: Iterable[str]) -> None:
        self.members = tuple(public_keys)

    def set_own_addresses(self, addresses: Iterable[IPAddress]) -> None:
        self.own = tuple(addresses)

    def check(self, public_key: str, endpoints: Sequence[Endpoint]) -> None:
        self.checked.append((public_key, tuple(endpoints)))

    def measure(self, public_key: str, endpoint: Endpoint) -> None:
        self.measured.append((public_key, endpoint))

    def round_trips(self, public_key: str, endpoint: Endpoint) -> tuple[float, ...]:
        return self.timings.get((public_key, endpoint), ())

    def answers(self) -> dict[str, dict[Endpoint, float]]:
        return {k: dict(v) for k, v in self.answered.items()}


def agent_with_peer(
    tmp: Path, cluster_id: str, secret: str, paths: type[FakePaths] | None = None
) -> tuple[Agent, FakeKernel, Clock]:
    clock = Clock()
    kernel = FakeKernel(
        addresses=(local_address("ens3", "10.1.0.10/24"),),
        hardware=(LinkHardware("ens3", "52:54:00:00:00:0a", True),),
    )
    agent = Agent(
        parse_config(config_text("http://127.0.0.1:9", cluster_id, secret), "cfg.yaml"),
        load_or_create_identity(tmp / "state"),
        kernel,
        tmp / "run",
        tmp / "state",
        clocks=clock.clocks(),
        hostname=lambda: "alpha",
        stun=FakeStun,
        paths=paths,
    )
    peer_key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="
    info = AffiliateInfo(
        "peer", "peer", peer_key, agent.prefix[7], (ipaddress.ip_address("10.2.0.11"),)
    )
    endpoints = (
        Endpoint(ipaddress.ip_address("10.2.0.11"), 51820),
        Endpoint(ipaddress.ip_address("203.0.113.9"), 51820),
    )
    agent.membership = Membership({"peer": Known(MemberRecord(info, endpoints, 1, 1 << 40))})
    agent.members_known = True
    return agent, kernel, clock


def stun_of(agent: Agent) -> FakeStun:
    assert isinstance(agent.stun, FakeStun)
    return agent.stun


def test_the_learned_mapping_is_advertised_and_shown(
    tmp_path: Path, cluster_id: str, cluster_secret: str
) -> None:
    agent, _, _ = agent_with_peer(tmp_path, cluster_id, cluster_secret)
    agent.reconcile()
    assert agent.registration is not None
    assert MAPPED not in agent.registration.record.endpoints
    result = Reflexive.of([ReflectorAnswer(REFLECTOR, MAPPED)])
    agent._take(ReflexiveLearned(result))
    agent.reconcile()
    assert agent.registration.record.endpoints[-1] == MAPPED  # after the host address
    status = json.loads((tmp_path / "run" / STATUS_FILE).read_text())
    assert status["node"]["nat"]["mapped"] == [str(MAPPED)]
    assert status["node"]["nat"]["mapping"] == Mapping.UNKNOWN.value  # one reflector
    (peer,) = status["peers"]
    assert [c["kind"] for c in peer["candidates"]] == ["private", "announced"]
    assert peer["why"] == "trial: best candidate"


def test_a_probe_no_reflector_answered_keeps_the_mapping_for_a_while(
    tmp_path: Path, cluster_id: str, cluster_secret: str
) -> None:
    """Reflectors cut off (or their answers drowned in junk) say nothing new of the NAT:
    the mapping they last gave is still advertised, until probes have gone unanswered for
    UNANSWERED_KEEP_SECONDS; answers bring it back."""
    agent, _, clock = agent_with_peer(tmp_path, cluster_id, cluster_secret)
    agent.reconcile()
    agent._take(ReflexiveLearned(Reflexive.of([ReflectorAnswer(REFLECTOR, MAPPED)])))
    agent.reconcile()

    def advertised() -> bool:
        assert agent.registration is not None
        return MAPPED in agent.registration.record.endpoints

    def nat() -> dict[str, Any]:
        status = json.loads((tmp_path / "run" / STATUS_FILE).read_text())
        return dict(status["node"]["nat"])

    assert advertised()
    other = Endpoint(ipaddress.ip_address("203.0.113.50"), 3478)
    agent._take(ReflexiveLearned(Reflexive.of([ReflectorAnswer(REFLECTOR, None)])))
    clock.now += 1
    agent.reconcile()
    assert advertised()
    assert nat()["mapped"] == [str(MAPPED)]
    assert nat()["reflectors"] == [{"reflector": str(REFLECTOR), "mapped": None}]
    keep = loop.UNANSWERED_KEEP_SECONDS
    clock.now += keep / 2
    # Another reflector named, no answer either: still counted from the first silence.
    silent = Reflexive.of([ReflectorAnswer(REFLECTOR, None), ReflectorAnswer(other, None)])
    agent._take(ReflexiveLearned(silent))
    agent.reconcile()
    assert advertised()
    clock.now += keep / 2 - 2
    agent.reconcile()
    assert advertised()
    clock.now += 1  # no report comes: the prober reports only changes
    agent.reconcile()
    assert not advertised()
    assert nat()["mapped"] == []
    agent._take(ReflexiveLearned(Reflexive.of([ReflectorAnswer(REFLECTOR, MAPPED)])))
    agent.reconcile()
    assert advertised()


def test_a_kept_mapping_goes_when_the_underlay_changes(
    tmp_path: Path, cluster_id: str, cluster_secret: str
) -> None:
    """A mapping learned on the network the node left is not kept for want of answers."""
    agent, kernel, clock = agent_with_peer(tmp_path, cluster_id, cluster_secret)
    agent.reconcile()
    agent._take(ReflexiveLearned(Reflexive.of([ReflectorAnswer(REFLECTOR, MAPPED)])))
    agent.reconcile()
    agent._take(ReflexiveLearned(Reflexive.of([ReflectorAnswer(REFLECTOR, None)])))
    clock.now += 1
    agent.reconcile()
    assert agent.mapped == (MAPPED,)
    kernel.addresses = (local_address("ens3", "10.1.0.20/24"),)
    clock.now += 1
    agent.reconcile()  # sees the new address
    clock.now += 1
    agent.reconcile()
    assert agent.registration is not None
    assert MAPPED not in agent.registration.record.endpoints


def test_an_underlay_change_is_acted_on_once_settled(
    tmp_path: Path, cluster_id: str, cluster_secret: str
) -> None:
    agent, kernel, clock = agent_with_peer(tmp_path, cluster_id, cluster_secret)
    agent.reconcile()
    kernel.receive(kernel.link.peers[0].public_key if kernel.link else "", 92, None)
    clock.now += 0.5
    agent.reconcile()
    triggers, nudged = stun_of(agent).triggers, len(kernel.nudged)

    kernel.addresses = (local_address("ens3", "10.1.0.20/24"),)  # the node moved
    clock.now += 0.5
    agent.reconcile()
    assert agent._wake_at is not None and agent._wake_at <= clock.now + ROAM_SETTLE_SECONDS
    assert (stun_of(agent).triggers, len(kernel.nudged)) == (triggers, nudged)  # settling
    assert agent.registration is not None
    assert Endpoint(ipaddress.ip_address("10.1.0.20"), 51820) in agent.registration.record.endpoints

    clock.now += ROAM_SETTLE_SECONDS
    assert not agent.sessions[0]._hello_wanted
    agent.reconcile()
    assert stun_of(agent).triggers == triggers + 1
    assert agent.sessions[0]._hello_wanted  # discovery is asked where it sees us again
    assert len(kernel.nudged) == nudged + 1  # every peer hears from us at once
    clock.now += 0.5
    agent.reconcile()
    assert len(kernel.nudged) == nudged + 1  # once

    agent._take(KernelChanged(DEFAULT_ROUTE))  # a new way out, same addresses
    clock.now += ROAM_SETTLE_SECONDS
    agent.reconcile()
    assert stun_of(agent).triggers == triggers + 2
    assert len(kernel.nudged) == nudged + 2

    # In one burst with other news (an uplink coming up and its default route), as the
    # watcher hands a burst on: still a new way out.
    agent._take(KernelChanged(joined({OTHER_LINK, DEFAULT_ROUTE, "address"})))
    clock.now += ROAM_SETTLE_SECONDS
    agent.reconcile()
    assert stun_of(agent).triggers == triggers + 3
    assert len(kernel.nudged) == nudged + 3


def answered_first_trial(agent: Agent, kernel: FakeKernel, clock: Clock) -> str:
    """The first pass starts a trial (and probes at once); the peer answers it."""
    agent.reconcile()
    assert kernel.link is not None
    key = kernel.link.peers[0].public_key
    assert kernel.probed == [agent.membership.known["peer"].record.info.ula]
    assert agent._wake_at is not None and agent._wake_at - clock.now <= 0.5
    kernel.receive(key, 92, 1_800_000_000 + clock.now)
    clock.now += 0.5
    agent.reconcile()
    return key


def test_a_quiet_peer_is_probed_and_a_dead_path_moves_on(
    tmp_path: Path, cluster_id: str, cluster_secret: str
) -> None:
    agent, kernel, clock = agent_with_peer(tmp_path, cluster_id, cluster_secret)
    key = answered_first_trial(agent, kernel, clock)
    assert kernel.link is not None
    status = json.loads((tmp_path / "run" / STATUS_FILE).read_text())
    assert status["peers"][0]["state"] == "up"
    probes = len(kernel.probed)
    # Silence: probed after `quiet`, found dead after the probe timeout, next candidate.
    for _ in range(40):
        clock.now = agent._wake_at if agent._wake_at else clock.now + 5
        agent.reconcile()
        if kernel.link.peers[0].endpoint == Endpoint(ipaddress.ip_address("203.0.113.9"), 51820):
            break
    assert len(kernel.probed) > probes
    assert kernel.link.peers[0].endpoint == Endpoint(ipaddress.ip_address("203.0.113.9"), 51820)
    assert key in kernel.nudged
    status = json.loads((tmp_path / "run" / STATUS_FILE).read_text())
    assert status["peers"][0]["why"] == "trial: the path died"


def test_stun_reflectors_are_the_services_then_the_configured_ones(
    tmp_path: Path, cluster_id: str, cluster_secret: str
) -> None:
    agent, _, _ = agent_with_peer(tmp_path, cluster_id, cluster_secret)
    agent.config = replace(
        agent.config,
        kubespan=replace(
            agent.config.kubespan, stun_servers=(("127.0.0.1", 3479), ("no-such-host.invalid", 1))
        ),
    )
    agent.sessions[0].stun_reflectors = (REFLECTOR,)
    assert agent.stun_reflectors() == (REFLECTOR, Endpoint(ipaddress.ip_address("127.0.0.1"), 3479))


def test_when_probes_cannot_be_sent_silence_is_not_a_dead_path(
    tmp_path: Path, cluster_id: str, cluster_secret: str
) -> None:
    agent, kernel, clock = agent_with_peer(tmp_path, cluster_id, cluster_secret)
    answered_first_trial(agent, kernel, clock)
    kernel.probes_fail = True  # e.g. no CAP_NET_RAW, or the link is being recreated
    for _ in range(60):
        clock.now += 2.0
        agent.reconcile()
        status = json.loads((tmp_path / "run" / STATUS_FILE).read_text())
        assert status["peers"][0]["state"] == "up"
    assert kernel.link is not None
    assert kernel.link.peers[0].endpoint == Endpoint(ipaddress.ip_address("10.2.0.11"), 51820)


def test_only_mappings_a_peer_can_use_are_advertised(
    tmp_path: Path, cluster_id: str, cluster_secret: str
) -> None:
    agent, _, _ = agent_with_peer(tmp_path, cluster_id, cluster_secret)
    agent.reconcile()
    other = Endpoint(ipaddress.ip_address("203.0.113.50"), 3478)
    # A symmetric NAT: every reflector saw another port. Useless to peers: nothing from
    # STUN, and not the address discovery saw either.
    agent.sessions[0].reflexive = ipaddress.ip_address("198.51.100.40")
    symmetric = Reflexive.of(
        [
            ReflectorAnswer(REFLECTOR, MAPPED),
            ReflectorAnswer(other, Endpoint(MAPPED.address, 61001)),
        ]
    )
    assert symmetric.mapping is Mapping.ENDPOINT_DEPENDENT
    agent._take(ReflexiveLearned(symmetric))
    agent.reconcile()
    assert agent.registration is not None
    assert [str(e) for e in agent.registration.record.endpoints] == ["10.1.0.10:51820"]
    # An answer naming loopback is not advertised; what discovery saw stands in. An answer
    # naming our own address says there is no NAT: nothing else is advertised.
    for answered, expected in (
        ("127.0.0.1", ["10.1.0.10:51820", "198.51.100.40:51820"]),
        ("10.1.0.10", ["10.1.0.10:51820"]),
    ):
        answer = Endpoint(ipaddress.ip_address(answered), 9)
        agent._take(
            ReflexiveLearned(
                Reflexive.of([ReflectorAnswer(REFLECTOR, answer), ReflectorAnswer(other, answer)])
            )
        )
        agent.reconcile()
        assert [str(e) for e in agent.registration.record.endpoints] == expected


def test_path_checks_go_to_every_candidate_and_the_one_that_answered_is_set(
    tmp_path: Path, cluster_id: str, cluster_secret: str
) -> None:
    agent, kernel, clock = agent_with_peer(tmp_path, cluster_id, cluster_secret, FakePaths)
    paths = agent.paths
    assert isinstance(paths, FakePaths)
    public = Endpoint(ipaddress.ip_address("203.0.113.9"), 51820)
    private = Endpoint(ipaddress.ip_address("10.2.0.11"), 51820)
    agent.reconcile()
    assert kernel.link is not None
    key = kernel.link.peers[0].public_key
    assert paths.members == (key,)  # only members' checks are answered
    assert paths.own == (ipaddress.ip_address("10.1.0.10"),)  # where peers see us
    assert paths.checked == [(key, (private, public))]  # all at once, in rank order
    assert kernel.link.peers[0].endpoint == private  # the best candidate's trial
    applied = len(kernel.applied)

    clock.now += 0.1
    paths.answered = {key: {public: clock.now}}
    agent._take(PathAnswered(key, public))
    agent.reconcile()
    assert kernel.link.peers[0].endpoint == public  # not waiting out the private trial
    # Created anew, so WireGuard sends its handshake now (a nudge would wait for the 5 s
    # since the initiation to the private address).
    assert [a.split(" preshared")[0] for a in kernel.applied[applied:]] == [
        f"wg set kubespan peer {key} remove",
        f"wg set kubespan peer {key}",
    ]
    assert f"endpoint {public}" in kernel.applied[-1]
    status = json.loads((tmp_path / "run" / STATUS_FILE).read_text())
    assert status["peers"][0]["why"] == "trial: answered a path check"
    answered = [c["path_check_answered_s"] for c in status["peers"][0]["candidates"]]
    assert answered == [None, 0.0]  # the private one never answered


def test_a_peer_heard_from_during_the_pass_is_not_recreated(
    tmp_path: Path, cluster_id: str, cluster_secret: str
) -> None:
    """Under load a pass takes seconds: a handshake the peer completes after the pass read
    the kernel must not be thrown away by recreating the peer for a path check answer."""
    agent, kernel, clock = agent_with_peer(tmp_path, cluster_id, cluster_secret, FakePaths)
    paths = agent.paths
    assert isinstance(paths, FakePaths)
    public = Endpoint(ipaddress.ip_address("203.0.113.9"), 51820)
    agent.reconcile()
    assert kernel.link is not None
    key = kernel.link.peers[0].public_key
    applied = len(kernel.applied)

    clock.now += 0.1
    paths.answered = {key: {public: clock.now}}
    agent._take(PathAnswered(key, public))
    reads = 0
    observe = kernel.observe_link

    def handshake_after_first_read(name: str) -> Any:
        nonlocal reads
        seen = observe(name)
        reads += 1
        if reads == 1:
            kernel.handshake(key, 1_800_000_000 + clock.now)  # lands while the pass plans
        return seen

    kernel.observe_link = handshake_after_first_read  # type: ignore[method-assign]
    agent.reconcile()
    kernel.observe_link = observe  # type: ignore[method-assign]
    assert reads == 2  # the pass looked again before recreating
    assert not any(a.endswith(" remove") for a in kernel.applied[applied:]), kernel.applied
    clock.now += 0.5
    agent.reconcile()
    status = json.loads((tmp_path / "run" / STATUS_FILE).read_text())
    assert status["peers"][0]["state"] == "up"


def test_the_status_file_follows_news_at_once_and_counters_every_two_minutes(
    tmp_path: Path, cluster_id: str, cluster_secret: str
) -> None:
    agent, kernel, clock = agent_with_peer(tmp_path, cluster_id, cluster_secret)
    key = answered_first_trial(agent, kernel, clock)
    status_file = tmp_path / "run" / STATUS_FILE

    def in_file() -> dict[str, Any]:
        (peer,) = json.loads(status_file.read_text())["peers"]
        return dict(peer)

    assert in_file()["state"] == "up"  # news: written by the pass that saw it
    written = in_file()["rx_bytes"]
    kernel.receive(key, 500, 1_800_000_000 + clock.now)  # only counters move
    clock.now += 1
    agent.reconcile()
    assert in_file()["rx_bytes"] == written
    assert agent._last_document is not None
    assert agent._last_document["peers"][0]["rx_bytes"] > written  # the live status has it
    clock.now += STATUS_FILE_EVERY_SECONDS
    agent.reconcile()
    assert in_file()["rx_bytes"] == agent._last_document["peers"][0]["rx_bytes"]
    agent._take(ReflexiveLearned(Reflexive.of([ReflectorAnswer(REFLECTOR, MAPPED)])))
    clock.now += 1
    agent.reconcile()  # news again (a mapping learned): at once
    assert json.loads(status_file.read_text())["node"]["nat"]["mapped"] == [str(MAPPED)]


def test_a_status_nobody_asks_for_is_never_made(
    tmp_path: Path, cluster_id: str, cluster_secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the status file's writes, an idle pass makes no document unless the status
    socket (or metrics) asks; what it serves when asked is that pass's."""
    agent, kernel, clock = agent_with_peer(tmp_path, cluster_id, cluster_secret)
    latest = LatestStatus()
    agent.latest = latest
    key = answered_first_trial(agent, kernel, clock)
    made: list[float] = []

    def counted(*args: Any, **kwargs: Any) -> dict[str, Any]:
        made.append(args[5])  # the pass's wall time
        return status_document(*args, **kwargs)

    monkeypatch.setattr(loop, "status_document", counted)
    for _ in range(5):
        kernel.receive(key, 500, 1_800_000_000 + clock.now)  # only counters move
        clock.now += 1
        agent.reconcile()
    assert made == []
    served = json.loads(latest.get())
    wall = 1_800_000_000 + clock.now
    assert made == [wall] and served["updated_at"] == wall
    assert served["peers"][0]["rx_bytes"] == kernel.link.peers[0].rx_bytes  # type: ignore[union-attr]
    assert json.loads(latest.get()) == served and len(made) == 1  # made once


def test_a_status_that_cannot_be_made_serves_the_last_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    latest = LatestStatus()
    latest.set(LazyStatus.of({"version": 1, "peers": []}).encoded)
    good = latest.get()

    def broken() -> bytes:
        raise KeyError("node")

    latest.set(broken)
    assert latest.get() == good  # and the asking thread lives on
    assert "could not make the status document" in caplog.text


def test_a_status_that_cannot_be_made_is_tried_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client polling the socket must not make the agent rebuild, nor log, a document
    that failed at every request."""
    builds: list[int] = []

    def build() -> dict[str, Any]:
        builds.append(1)
        raise KeyError("node")

    latest = LatestStatus()
    latest.set(LazyStatus(build).encoded)
    for _ in range(3):
        latest.get()
    assert len(builds) == 1
    assert caplog.text.count("could not make the status document") == 1
