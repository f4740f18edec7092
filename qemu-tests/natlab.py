"""NAT scenarios on the image (issue 10): the lab topology, timing read from inside the
guests, and each scenario as a function that asserts its facts and returns its time. Used
by test_nat.py and by `make bench-mesh` (qemu-tests/bench_mesh.py).

The NAT lab (one boot shared by scenarios 1 to 6):

    internet 192.0.2.0/24 (no IPv6), discovery on the lab namespace at 192.0.2.1
      pub1 192.0.2.11 and 192.0.2.21     pub2 192.0.2.12
      r1 WAN 192.0.2.101 ─ site1 10.1.0.0/24: a1 10.1.0.11, a2 10.1.0.12 (both behind r1)
      r2 WAN 192.0.2.102 ─ site2 10.2.0.0/24: b1 10.2.0.21
      r3 WAN 192.0.2.103 ─ site3 10.3.0.0/24: c1 10.3.0.31 (r3 is a symmetric NAT)
    pub1 and pub2 offer to relay (issue 12). r2 drops everything to 192.0.2.11 from the
    start: b1 reaches pub1 only at its second address (scenario 4, rotation). Scenario 6
    makes r1 drop a1 <-> pub1's address in use for a while; scenario 5 renumbers pub2 to
    192.0.2.13. c1 has no direct path to a1, a2 or b1 (a symmetric NAT facing NATs that
    admit replies only): relayed (relay scenario 1). Relay scenario 4 slows c1's path to the
    relay in use for a while; relay scenario 2 blocks UDP between r1 and r2 for a while;
    relay scenario 3 kills the relay c1 and a1 use.

The lab namespace has no address on the site segments and does not forward: a site node
reaches discovery and everyone else only through its router.

Times come from the guests' journals (each guest's wall clock mapped onto the host's with
`guest-get-time`), so neither boot time nor host polling latency is counted.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kslab import (
    Capture,
    Lab,
    LabError,
    NatKind,
    NicSpec,
    Router,
    RouterSpec,
    Segment,
    Vm,
    VmSpec,
    cluster_identity,
    drop_rule,
    wait_until,
)
from mesh import DISCOVERY_PORT, machine_config, node_status

# --- names owned by the agent and the discovery service: one constant each -------------

# Where a node's status shows the public endpoint(s) it learned (a dotted path into
# `kubespan status --json`; a string, a list of strings, or a list of objects with an
# "endpoint" field are all understood).
REFLEXIVE_FIELD = "node.nat.mapped"
# The agent's journal line when a peer's state changes, and when the agent starts.
PEER_STATE_LINE = re.compile(r"\bpeer (?P<name>\S+) state=(?P<state>\w+)")
AGENT_START_LINE = re.compile(r"\bstarting node_id=")
# The discovery service's STUN responder (added when `serve --help` offers the flag).
STUN_FLAG = "--stun-listen"
STUN_PORT = 3478
WIREGUARD_PORT = 51820
IFACE = "kubespan"

Interface4 = ipaddress.IPv4Interface
Interface6 = ipaddress.IPv6Interface


# --- timing from inside the guests ---------------------------------------------------------


def clock_offset(vm: Vm) -> float:
    """Host wall clock minus the guest's wall clock, in seconds (best of three round trips
    of `guest-get-time`, a call that runs no process)."""
    if not vm.agent.connected:
        vm.wait_agent(30.0)
    best: tuple[float, float] | None = None
    for _ in range(3):
        before = time.time()
        guest = float(vm.agent.call("guest-get-time")) / 1e9
        after = time.time()
        if best is None or after - before < best[0]:
            best = (after - before, (before + after) / 2 - guest)
    assert best is not None
    return best[1]


@dataclass(frozen=True)
class Entry:
    at: float  # host wall clock
    message: str


class Clocks:
    """Per-VM clock offsets; journal entries in host time. An offset is measured again
    when it is older than OFFSET_TTL_S: a guest clock under TCG may drift from the host's
    over a lab's lifetime, and the scenarios compare times across machines."""

    OFFSET_TTL_S = 30.0

    def __init__(self) -> None:
        self.offsets: dict[str, tuple[float, float]] = {}  # name -> (offset, measured at)

    def offset(self, vm: Vm) -> float:
        known = self.offsets.get(vm.name)
        if known is None or time.time() - known[1] > self.OFFSET_TTL_S:
            known = (clock_offset(vm), time.time())
            self.offsets[vm.name] = known
        return known[0]

    def journal(self, vm: Vm, unit: str) -> list[Entry]:
        result = vm.exec(
            ["journalctl", "-b", "-u", unit, "-o", "json", "--output-fields=MESSAGE"], timeout=60
        )
        offset = self.offset(vm)
        entries = []
        for line in result.stdout.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            message = record.get("MESSAGE")
            if isinstance(message, list):
                message = bytes(message).decode(errors="replace")
            entries.append(Entry(int(record["__REALTIME_TIMESTAMP"]) / 1e6 + offset, message))
        return entries

    def agent_started(self, vm: Vm) -> float:
        starts = [
            e.at for e in self.journal(vm, "kubespan.service") if AGENT_START_LINE.search(e.message)
        ]
        if not starts:
            raise AssertionError(f"{vm.name}: no agent start in the journal")
        return starts[-1]

    def peer_up(self, vm: Vm, peer: str, after: float = 0.0) -> float | None:
        """When `vm`'s agent first reported `peer` up after `after` (host time)."""
        for entry in self.journal(vm, "kubespan.service"):
            found = PEER_STATE_LINE.search(entry.message)
            if found and found["name"] == peer and found["state"] == "up" and entry.at > after:
                return entry.at
        return None


def pair_up(clocks: Clocks, a: Vm, b: Vm, after: float = 0.0) -> float:
    """When both of a pair reported each other up (host time)."""
    ups = [clocks.peer_up(a, b.name, after), clocks.peer_up(b, a.name, after)]
    if None in ups:
        raise AssertionError(f"{a.name}/{b.name}: not reported up in the journals: {ups}")
    return max(u for u in ups if u is not None)


def pairs_time(clocks: Clocks, pairs: list[tuple[Vm, Vm]]) -> float:
    """From the last agent start among the scenario's nodes to every one of its pairs up
    (the issue's definition of mesh_full_s, used for every mesh figure). A pair whose
    nodes started early is not charged for the seconds its first passes spent sharing two
    emulated cores with the other guests' boots: the clock starts once all are running."""
    nodes = {vm.name: vm for pair in pairs for vm in pair}
    last_start = max(clocks.agent_started(vm) for vm in nodes.values())
    return max(pair_up(clocks, a, b) for a, b in pairs) - last_start


def all_pairs(vms: list[Vm]) -> list[tuple[Vm, Vm]]:
    return [(a, b) for i, a in enumerate(vms) for b in vms[i + 1 :]]


# --- waiting on the mesh ---------------------------------------------------------------


def peer_entry(status: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    for peer in (status or {}).get("peers", []):
        if peer.get("name") == name:
            entry: dict[str, Any] = peer
            return entry
    return None


def wait_for_pairs(pairs: list[tuple[Vm, Vm]], timeout: float = 240.0, what: str = "pairs") -> None:
    """Wait until, for each pair, each side's own status shows the other up."""
    pending = {(a.name, b.name): (a, b) for a, b in pairs}

    def done() -> bool:
        statuses: dict[str, dict[str, Any] | None] = {}
        for key, (a, b) in list(pending.items()):
            for vm in (a, b):
                if vm.name not in statuses:
                    statuses[vm.name] = node_status(vm)
            ea, eb = peer_entry(statuses[a.name], b.name), peer_entry(statuses[b.name], a.name)
            if ea and eb and ea["state"] == "up" and eb["state"] == "up":
                del pending[key]
        return not pending

    try:
        wait_until(done, timeout, what, interval=1.0)
    except LabError as e:
        raise AssertionError(f"{e}; still not up: {sorted(pending)}") from e


def wg_endpoints(vm: Vm) -> dict[str, str]:
    """`wg show kubespan endpoints`: public key -> endpoint ("(none)" when unset)."""
    out = vm.check(["wg", "show", IFACE, "endpoints"])
    return dict(line.split("\t", 1) for line in out.strip().splitlines() if "\t" in line)


def public_key(vm: Vm) -> str:
    return vm.check(["wg", "show", IFACE, "public-key"]).strip()


def learned_public_endpoints(status: dict[str, Any] | None) -> set[str]:
    """What the node's status says it learned about its public endpoint (REFLEXIVE_FIELD)."""
    value: Any = status
    for part in REFLEXIVE_FIELD.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    items = value if isinstance(value, list) else [value] if value is not None else []
    out = set()
    for item in items:
        text = item.get("endpoint") or item.get("address") if isinstance(item, dict) else item
        if isinstance(text, str):
            out.add(text)
    return out


def guest_time(clocks: Clocks, vm: Vm) -> float:
    """Now by `vm`'s clock, in host time (the offset cancels against the guest's journal)."""
    return float(vm.check(["date", "+%s.%N"])) + clocks.offset(vm)


def peer_view(vm: Vm, name: str) -> object:
    """What `vm`'s agent reports about peer `name` (for failure messages)."""
    status = node_status(vm) or {}
    return next((p for p in status.get("peers", []) if p.get("name") == name), None)


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


# --- traffic that flows while something changes -----------------------------------------


def start_flow(vm: Vm, unit: str, target: str, interval: float = 0.2) -> None:
    """A ping every `interval` s from `vm` to `target`, as a transient unit whose lines
    (each answer, and "no answer yet" for each miss) land in the guest's journal, each
    stamped by ping itself (-D: ping's output is block-buffered, so the journal's own
    timestamps say when a buffer was flushed, not when an answer came)."""
    vm.check(
        [
            "systemd-run",
            f"--unit={unit}",
            "ping",
            "-D",
            "-O",
            "-n",
            "-i",
            str(interval),
            "-W",
            "1",
            target,
        ]
    )


def stop_flow(vm: Vm, unit: str) -> None:
    vm.exec(["systemctl", "stop", unit])


REPLY = re.compile(r"^\[(?P<at>[\d.]+)\] .*icmp_seq=(?P<seq>\d+) .*time=(?P<ms>[\d.]+) ms")


def answered_after(clocks: Clocks, vm: Vm, unit: str, after: float) -> float | None:
    """When the flow first got an answer to a ping *sent* after `after` (host time)."""
    offset = clocks.offset(vm)
    for entry in clocks.journal(vm, unit):
        found = REPLY.search(entry.message)
        if found:
            at = float(found["at"]) + offset
            if at - float(found["ms"]) / 1000 > after:
                return at
    return None


def wait_flows_recovered(
    clocks: Clocks,
    flows: list[tuple[Vm, str]],
    after: float,
    timeout: float,
    since: float | None = None,
) -> float:
    """Wait until every flow was answered for a ping sent after `after`; return the
    longest time from `since` (default `after`) to such an answer."""
    answered: dict[str, float] = {}

    def done() -> bool:
        for vm, unit in flows:
            key = f"{vm.name}/{unit}"
            if key not in answered:
                at = answered_after(clocks, vm, unit, after)
                if at is not None:
                    answered[key] = at
        return len(answered) == len(flows)

    try:
        wait_until(done, timeout, "every ping flow answered again", interval=1.0)
    except LabError as e:
        missing = [f"{vm.name}/{unit}" for vm, unit in flows if f"{vm.name}/{unit}" not in answered]
        raise AssertionError(f"{e}; not answered again: {missing}") from e
    return max(answered.values()) - (after if since is None else since)


# --- the labs ----------------------------------------------------------------------------


def discovery_argv(
    kubespan_bin: Path, host: str, state_dir: Path, second_reflector: str | None = None
) -> list[str]:
    """`kubespan discovery serve` on HOST (IPv6 in brackets), with the STUN responder when
    this version of the service has one, also on `second_reflector` (an address of the same
    host) so nodes can tell how their NAT maps."""
    listen = f"[{host}]" if ":" in host else host
    argv = [
        str(kubespan_bin),
        "discovery",
        "serve",
        "--listen",
        f"{listen}:{DISCOVERY_PORT}",
        "--state-dir",
        str(state_dir),
    ]
    helptext = subprocess.run(
        [str(kubespan_bin), "discovery", "serve", "--help"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    if STUN_FLAG in helptext:
        argv += [STUN_FLAG, f"{listen}:{STUN_PORT}"]
        if second_reflector is not None:
            argv += [STUN_FLAG, f"{second_reflector}:{STUN_PORT}"]
            argv += ["--stun-advertise", f":{STUN_PORT}"]
            argv += ["--stun-advertise", f"{second_reflector}:{STUN_PORT}"]
    return argv


def start_discovery(
    lab: Lab, kubespan_bin: Path, host: str, state_dir: Path, second_reflector: str | None = None
) -> str:
    lab.spawn("discovery", discovery_argv(kubespan_bin, host, state_dir, second_reflector))
    lab.wait_tcp(host, DISCOVERY_PORT)
    return f"http://[{host}]:{DISCOVERY_PORT}" if ":" in host else f"http://{host}:{DISCOVERY_PORT}"


@dataclass
class NatLab:
    lab: Lab
    wan: Segment
    r1: Router
    r2: Router
    r3: Router
    capture: Capture
    vms: dict[str, Vm] = field(default_factory=dict)
    relay_capture: Capture | None = None  # started by the first relay scenario
    relay_killed_at: float | None = None  # host time: when the failover killed a relay
    clocks: Clocks = field(default_factory=Clocks)

    def __getitem__(self, name: str) -> Vm:
        return self.vms[name]

    @property
    def member_underlay(self) -> list[str]:
        """The members' addresses as seen on the internet segment."""
        return [
            "192.0.2.11",
            "192.0.2.21",
            "192.0.2.12",
            self.r1.public_ip,
            self.r2.public_ip,
            self.r3.public_ip,
        ]


PUB1_SECOND = "192.0.2.21"
RELAY_PORTS = (29100, 256)  # the relays' default ports (relay.ports in machine config)
RELAYS = ("pub1", "pub2")
SECOND_REFLECTOR = "192.0.2.2"  # the discovery host's second address: NAT kinds are told


def build_nat_lab(lab: Lab, kubespan_bin: Path, state_dir: Path) -> NatLab:
    """Segments, routers, discovery, a capture on the internet segment, five VMs booted."""
    wan = lab.add_segment("wan", "192.0.2.0/24", None, host=(4,))
    lab.add_segment("site1", "10.1.0.0/24", None, host=())
    lab.add_segment("site2", "10.2.0.0/24", None, host=())
    lab.add_segment("site3", "10.3.0.0/24", None, host=())
    r1 = lab.add_router(
        RouterSpec("r1", "wan", Interface4("192.0.2.101/24"), "site1", Interface4("10.1.0.1/24"))
    )
    r2 = lab.add_router(
        RouterSpec("r2", "wan", Interface4("192.0.2.102/24"), "site2", Interface4("10.2.0.1/24"))
    )
    r3 = lab.add_router(
        RouterSpec(
            "r3",
            "wan",
            Interface4("192.0.2.103/24"),
            "site3",
            Interface4("10.3.0.1/24"),
            kind=NatKind.SYMMETRIC,
        )
    )
    assert r1.spec.kind is NatKind.ENDPOINT_INDEPENDENT
    r2.drop(drop_rule(destination="192.0.2.11"))  # scenario 4: pub1's first address
    lab.ns.ip("address", "add", f"{SECOND_REFLECTOR}/24", "dev", wan.bridge, "nodad")
    url = start_discovery(lab, kubespan_bin, str(wan.gateway.ip), state_dir, SECOND_REFLECTOR)
    capture = lab.capture("wan", "wan-capture")
    cluster_id, secret = cluster_identity()
    config = machine_config(url, cluster_id, secret)
    relay = machine_config(url, cluster_id, secret, relay={"enabled": True})

    def spec(
        name: str, segment: str, addresses: list[str], gateway: str | None, text: str = config
    ) -> VmSpec:
        nic = NicSpec(
            segment,
            tuple(Interface4(a) for a in addresses),
            (ipaddress.IPv4Address(gateway),) if gateway else (),
        )
        return VmSpec(name, nics=(nic,), machineconfig=text)

    specs = [
        spec("pub1", "wan", ["192.0.2.11/24", f"{PUB1_SECOND}/24"], None, relay),
        spec("pub2", "wan", ["192.0.2.12/24"], None, relay),
        spec("a1", "site1", ["10.1.0.11/24"], "10.1.0.1"),
        spec("a2", "site1", ["10.1.0.12/24"], "10.1.0.1"),
        spec("b1", "site2", ["10.2.0.21/24"], "10.2.0.1"),
        spec("c1", "site3", ["10.3.0.31/24"], "10.3.0.1"),
    ]
    vms = lab.boot_all(specs, timeout=600)
    nat = NatLab(lab, wan, r1, r2, r3, capture, {vm.name: vm for vm in vms})
    for vm in vms:
        nat.clocks.offset(vm)
    return nat


def ula(vm: Vm) -> str:
    status = node_status(vm)
    assert status is not None, f"{vm.name}: no status"
    return str(status["node"]["ula"])


# --- scenarios ---------------------------------------------------------------------------


def scenario_nat_site(nat: NatLab) -> float:
    """1. A site behind NAT (a1) and two public nodes: full mesh."""
    group = [nat["a1"], nat["pub1"], nat["pub2"]]
    wait_for_pairs(all_pairs(group), 300, "a1, pub1, pub2 meshed")
    return pairs_time(nat.clocks, all_pairs(group))


def scenario_shared_nat(nat: NatLab) -> float:
    """2. Two nodes behind one NAT and a public node: all meshed; the public node's
    WireGuard reaches each at the router's address on a port of its own, and each NATed
    node's status shows that very endpoint as learned."""
    a1, a2, pub1 = nat["a1"], nat["a2"], nat["pub1"]
    group = [a1, a2, pub1]
    wait_for_pairs(all_pairs(group), 300, "a1, a2, pub1 meshed")
    seen = wg_endpoints(pub1)
    mapped = {vm.name: seen.get(public_key(vm), "(none)") for vm in (a1, a2)}
    for name, endpoint in mapped.items():
        assert endpoint != "(none)", f"pub1 has no endpoint for {name}: {seen}"
        assert split_endpoint(endpoint)[0] == nat.r1.public_ip, mapped
    ports = {split_endpoint(e)[1] for e in mapped.values()}
    assert len(ports) == 2, f"pub1 sees both NATed nodes on one port: {mapped}"
    for vm in (a1, a2):
        status = node_status(vm)
        assert (status or {}).get("node", {}).get("nat", {}).get("mapping") == (
            "endpoint-independent"
        ), f"{vm.name}: two reflectors should show r1's mapping kind: {status}"
        learned = learned_public_endpoints(status)
        assert mapped[vm.name] in learned, (
            f"{vm.name}: its status ({REFLEXIVE_FIELD}) shows {sorted(learned)}, "
            f"not the mapping pub1 sees ({mapped[vm.name]})"
        )
    return pairs_time(nat.clocks, all_pairs(group))


def scenario_nat_to_nat(nat: NatLab) -> float:
    """3. Two sites each behind its own endpoint-independent NAT (+ a public node): the
    NATed nodes end with a direct tunnel, each's endpoint for the other being the other's
    router; and only WireGuard crossed the internet segment between members."""
    a1, a2, b1, pub1 = nat["a1"], nat["a2"], nat["b1"], nat["pub1"]
    cross = [(a1, b1), (a2, b1)]
    wait_for_pairs([*cross, (a1, pub1), (b1, pub1)], 180, "a1/a2 and b1 meshed directly")
    ends = ((a1, b1, nat.r2), (a2, b1, nat.r2), (b1, a1, nat.r1), (b1, a2, nat.r1))
    # A pair whose hole punch took longer than the relay's wait may be relayed a moment
    # first; a direct path that answers takes over within seconds.
    wait_direct(ends, DIRECT_WITHIN_S)
    for x, y in cross:
        x.check(["ping", "-c", "2", "-W", "3", ula(y)])
    return pairs_time(nat.clocks, cross)


DIRECT_WITHIN_S = 90.0  # a relayed pair with a direct path moves to it within this


def wait_direct(ends: tuple[tuple[Vm, Vm, Router], ...], timeout: float) -> None:
    """Wait until each (x, y, router): x's WireGuard endpoint for y is y's router."""

    def direct() -> bool:
        return all(
            split_endpoint(wg_endpoints(x).get(public_key(y), "(none):0"))[0] == router.public_ip
            for x, y, router in ends
        )

    try:
        wait_until(direct, timeout, "direct tunnels", interval=1.0)
    except LabError as e:
        shown = {f"{x.name}->{y.name}": wg_endpoints(x).get(public_key(y)) for x, y, _ in ends}
        raise AssertionError(f"{e}: no direct tunnel, endpoints {shown}") from e


def check_only_wireguard(nat: NatLab, capture: Capture | None = None) -> int:
    """A capture of the internet segment (the lab's own, stopped here, unless another
    stopped one is given): zero plaintext between member addresses; between a relay and
    the sides it carries, only WireGuard messages and binds on its ports (told by payload:
    behind NATs that give random ports, WireGuard's port is not a mark)."""
    from mesh import assert_only_wireguard_between

    if capture is None:
        capture = nat.capture
        capture.stop()
    return assert_only_wireguard_between(capture, nat.member_underlay, by_payload=True)


def scenario_rotation(nat: NatLab) -> float:
    """4. b1's router drops everything to pub1's first address: the pair comes up through
    pub1's next candidate."""
    b1, pub1 = nat["b1"], nat["pub1"]
    wait_for_pairs([(b1, pub1)], 180, "b1 and pub1 meshed")
    second = f"{PUB1_SECOND}:{WIREGUARD_PORT}"
    try:
        wait_until(
            lambda: wg_endpoints(b1).get(public_key(pub1)) == second,
            DIRECT_WITHIN_S,
            "b1 on pub1's second address",
        )
    except LabError as e:
        raise AssertionError(f"b1's endpoint for pub1: {wg_endpoints(b1)}, not {second}") from e
    return pairs_time(nat.clocks, [(b1, pub1)])


def scenario_dead_path(nat: NatLab) -> float:
    """6. a1's path to pub1 breaks while up (r1 drops a1 <-> the address in use, both
    ways, while a ping flows): detected and repaired over pub1's other address. Returns the
    time from the break to the flow answered again."""
    a1, pub1 = nat["a1"], nat["pub1"]
    wait_for_pairs([(a1, pub1)], 120, "a1 and pub1 up")
    in_use = wg_endpoints(a1)[public_key(pub1)]
    broken = split_endpoint(in_use)[0]
    other = PUB1_SECOND if broken != PUB1_SECOND else "192.0.2.11"
    start_flow(a1, "deadpath-flow", ula(pub1))
    wait_flows_recovered(nat.clocks, [(a1, "deadpath-flow")], time.time() - 60, 60)
    # Both ends of the break are read from a1's own clock, the one its pings are stamped
    # by: a ping sent after `broken_by` certainly met the drop, and the time is counted
    # from `breaking`, so a drift between host and guest clocks can neither pass a ping
    # answered before the break off as the repair nor shorten the figure.
    breaking = guest_time(nat.clocks, a1)
    nat.r1.drop(drop_rule(source="10.1.0.11", destination=broken))
    nat.r1.drop(drop_rule(source=broken, destination="10.1.0.11"))
    broken_by = guest_time(nat.clocks, a1)
    try:
        took = wait_flows_recovered(
            nat.clocks, [(a1, "deadpath-flow")], broken_by, 90, since=breaking
        )
        endpoint = wg_endpoints(a1)[public_key(pub1)]
        assert split_endpoint(endpoint)[0] == other, (
            f"a1's endpoint for pub1 is {endpoint} ({took:.1f} s after the break of "
            f"{broken}); a1's view: {peer_view(a1, 'pub1')}"
        )
        wait_for_pairs([(a1, pub1)], 60, "a1 and pub1 up again")
    finally:
        stop_flow(a1, "deadpath-flow")
        nat.r1.clear_drops()
    return took


PUB2_ROAMED = "192.0.2.13"


OLD_ADDRESS_PAIRS_GONE_S = 15.0  # bindings otherwise live 60 s after their last bind


def relayed_at(vm: Vm, address: str) -> list[dict[str, Any]]:
    """The pairs `vm`'s relay forwards with a side that sends to `address` (its status)."""
    pairs = ((node_status(vm) or {}).get("node", {}).get("relay") or {}).get("pairs", [])
    return [
        p
        for p in pairs
        if any(str(p.get(side, "")).split(" -> ")[-1].startswith(f"{address}:")
               for side in ("first", "second"))
    ]  # fmt: skip


def scenario_roaming(nat: NatLab) -> float:
    """5. pub2's underlay address changes (192.0.2.12 -> 192.0.2.13, as a renumbered
    server) while pings flow to and from it. The NATed nodes cannot hear pub2's new address
    until they send to it (their routers admit only replies from 192.0.2.12), so pub2 must
    re-advertise and its peers try the new candidate at once; no restart. Returns the time
    from the change to every flow answered again; then pub2 must advertise the new address
    and no longer the old one, and its relay forward nothing at the old one.

    (A NATed node renumbered behind its router is not a fair test: the router's stale
    mappings, kept alive by the peers' own traffic, make the new mappings port-dependent.)"""
    pub2, pub1, a1, b1 = nat["pub2"], nat["pub1"], nat["a1"], nat["b1"]
    pairs = [(pub2, a1), (pub2, b1), (pub2, pub1)]
    wait_for_pairs(pairs, 120, "pub2 meshed")
    target = ula(pub2)
    flows = [(pub2, "roam-a1"), (pub2, "roam-b1"), (a1, "roam-pub2"), (b1, "roam-pub2"),
             (pub1, "roam-pub2")]  # fmt: skip
    start_flow(pub2, "roam-a1", ula(a1))
    start_flow(pub2, "roam-b1", ula(b1))
    for vm in (a1, b1, pub1):
        start_flow(vm, "roam-pub2", target)
    try:
        wait_flows_recovered(nat.clocks, flows, time.time() - 60, 60)
        restarts_before = pub2.check(["systemctl", "show", "-P", "NRestarts", "kubespan"])
        dev = pub2.check(["sh", "-c", "ip -o -4 addr show | awk '/192.0.2.12/ {print $2}'"])
        dev = dev.strip()
        assert dev, "pub2's underlay interface"
        script = (
            f"sysctl -q -w net.ipv4.conf.{dev}.promote_secondaries=1 && "
            f"ip addr add {PUB2_ROAMED}/24 dev {dev} && "
            f"date +%s.%N && ip addr del 192.0.2.12/24 dev {dev}"
        )
        result = pub2.sh(script)
        assert result.exit_code == 0, result
        changed = float(result.stdout.split()[-1]) + nat.clocks.offset(pub2)
        took = wait_flows_recovered(nat.clocks, flows, changed, 120)
        wait_for_pairs(pairs, 60, "pub2 meshed again")

        # A peer whose only address died may be relayed until its new one is advertised;
        # the direct path then takes over (checked at once, and every minute while relayed).
        def direct() -> bool:
            return all(
                split_endpoint(wg_endpoints(x).get(public_key(pub2), "(none):0"))[0] == PUB2_ROAMED
                for x in (a1, b1, pub1)
            )

        try:
            wait_until(direct, DIRECT_WITHIN_S, "pub2's peers on its new address", 1.0)
        except LabError as e:
            shown = {x.name: wg_endpoints(x).get(public_key(pub2)) for x in (a1, b1, pub1)}
            seen = {
                x.name: [
                    p for p in (node_status(x) or {}).get("peers", []) if p.get("name") == "pub2"
                ]
                for x in (a1, b1, pub1)
            }
            raise AssertionError(f"{e}: endpoints for pub2 {shown}; as seen {seen}") from e

        def readvertised() -> bool:
            advertised = (node_status(pub2) or {}).get("node", {}).get("endpoints", [])
            hosts = {split_endpoint(e)[0] for e in advertised}
            return PUB2_ROAMED in hosts and "192.0.2.12" not in hosts

        try:
            wait_until(readvertised, 30, "pub2 to advertise its new address only", 1.0)
        except LabError as e:
            raise AssertionError(f"{e}: {node_status(pub2)}") from e
        # What pub2 relayed at its old address stops at once: its sides' releases, sent
        # there, never arrive, and a binding left would pair with the other side binding at
        # the new address and forward to it from the old one.
        try:
            wait_until(
                lambda: not relayed_at(pub2, "192.0.2.12"),
                max(1.0, changed + OLD_ADDRESS_PAIRS_GONE_S - time.time()),
                "pub2 to forward nothing at its old address",
                1.0,
            )
        except LabError as e:
            raise AssertionError(f"{e}: {relayed_at(pub2, '192.0.2.12')}") from e
        restarts = pub2.check(["systemctl", "show", "-P", "NRestarts", "kubespan"])
        assert restarts == restarts_before, "the agent restarted"
    finally:
        for vm, unit in flows:
            stop_flow(vm, unit)
    return took


# --- relay scenarios (issue 12) ------------------------------------------------------------

SINK_ONCE = """\
import socket, struct
server = socket.create_server(("::", 5203), family=socket.AF_INET6)
connection, _ = server.accept()
received = 0
while chunk := connection.recv(65536):
    received += len(chunk)
connection.sendall(struct.pack("!Q", received))
"""
# Sends argv[2] bytes to [argv[1]]:5203 (retrying the connect while the sink starts), then
# half-closes and reads how much the sink got; prints {"sent", "received", "seconds"}.
SEND = """\
import json, socket, struct, sys, time
deadline = time.monotonic() + 20
while True:
    try:
        connection = socket.create_connection((sys.argv[1], 5203), timeout=60)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
size, chunk, sent = int(sys.argv[2]), bytes(65536), 0
started = time.monotonic()
while sent < size:
    connection.sendall(chunk)
    sent += len(chunk)
connection.shutdown(socket.SHUT_WR)
received = struct.unpack("!Q", connection.recv(8))[0]
print(json.dumps({"sent": sent, "received": received, "seconds": time.monotonic() - started}))
"""
# Long enough that a stream's start (slow start, the host's bursts of other work) weighs
# little: of 8 MiB streams (under a second here), the same path's best of three moved by a
# third from one measurement to the next.
TRANSFER_BYTES = 32 << 20


def tcp_rate(sender: Vm, receiver: Vm, size: int = TRANSFER_BYTES) -> float:
    """One TCP stream of `size` bytes from `sender` to `receiver`'s ULA (through the
    tunnel): every byte must arrive; bytes a second, the sink's count read back."""
    receiver.exec(["systemctl", "reset-failed", "relay-sink"])
    receiver.check(["systemd-run", "--unit=relay-sink", "python3", "-c", SINK_ONCE])
    result = json.loads(
        sender.check(["python3", "-c", SEND, ula(receiver), str(size)], timeout=300)
    )
    assert result["received"] == result["sent"] == size, result
    return float(size / result["seconds"])


RATE_RUNS = 3


def best_tcp_rate(sender: Vm, receiver: Vm, runs: int = RATE_RUNS) -> float:
    """The best of `runs` streams: under TCG the host's other work slows single streams by
    up to half, in bursts; the best of a few is what the path can carry."""
    return max(tcp_rate(sender, receiver) for _ in range(runs))


def relay_of(vm: Vm, peer: Vm) -> str | None:
    """The relay `vm`'s status says carries its pair with `peer` (None: direct, or down)."""
    entry = peer_entry(node_status(vm), peer.name)
    if not entry or entry["state"] != "up":
        return None
    relay = entry.get("relay")
    return relay if isinstance(relay, str) else None


def wait_relayed(pairs: list[tuple[Vm, Vm]], timeout: float) -> None:
    """Wait until both sides of each pair report it up through a relay, the same one."""

    def relayed() -> bool:
        for x, y in pairs:
            used = relay_of(x, y)
            if used is None or used != relay_of(y, x):
                return False
        return True

    try:
        wait_until(relayed, timeout, "relayed pairs", interval=1.0)
    except LabError as e:
        shown = {f"{x.name}-{y.name}": (relay_of(x, y), relay_of(y, x)) for x, y in pairs}
        raise AssertionError(f"{e}: relays {shown}") from e


def assert_through_relay(nat: NatLab, x: Vm, y: Vm) -> str:
    """x's WireGuard endpoint for y is a port of the relay its status names; that relay's
    status shows pairs. Returns the relay's name."""
    relay = relay_of(x, y)
    assert relay in RELAYS, (x.name, y.name, relay)
    endpoint = wg_endpoints(x).get(public_key(y), "(none):0")
    host, port = split_endpoint(endpoint)
    relay_addresses = {
        split_endpoint(e)[0]
        for e in (node_status(nat[relay]) or {}).get("node", {}).get("endpoints", [])
    }
    first, count = RELAY_PORTS
    assert host in relay_addresses and first <= port < first + count, (
        f"{x.name}'s endpoint for {y.name} is {endpoint}, not a port of {relay} "
        f"({sorted(relay_addresses)})"
    )
    carried = (node_status(nat[relay]) or {}).get("node", {}).get("relay") or {}
    assert carried.get("pairs"), f"{relay} shows no pairs: {carried}"
    return relay


def scenario_relayed(nat: NatLab) -> float:
    """Relay 1. c1, behind a symmetric NAT, has no direct path to the nodes behind r1 and
    r2 (NATs that admit replies only): its pairs with them come up through a relay, each
    side's endpoint a port of the relay; ULAs answer pings, a TCP stream arrives whole.
    Returns the time from the pair's agents' start to the relayed pairs up."""
    c1, a1, b1 = nat["c1"], nat["a1"], nat["b1"]
    pairs = [(c1, a1), (c1, b1)]
    if nat.relay_capture is None:
        nat.relay_capture = nat.lab.capture("wan", "relay-capture")
    wait_relayed(pairs, 240)
    for x, y in pairs:
        assert_through_relay(nat, x, y)
        assert_through_relay(nat, y, x)
        x.check(["ping", "-c", "2", "-W", "3", ula(y)])
        y.check(["ping", "-c", "2", "-W", "3", ula(x)])
    tcp_rate(c1, a1, 1 << 20)
    # The relay counts what it carried: the stream's megabyte at least, in its status.
    carrier = nat[assert_through_relay(nat, c1, a1)]

    def counted() -> bool:
        relay = (node_status(carrier) or {}).get("node", {}).get("relay") or {}
        return any(p.get("bytes", 0) >= 1 << 20 for p in relay.get("pairs", []))

    try:
        wait_until(counted, 30, f"{carrier.name} to count the stream", interval=1.0)
    except LabError as e:
        raise AssertionError(f"{e}: {node_status(carrier)}") from e
    return pairs_time(nat.clocks, pairs)


NEARER_DELAY_MS = 150  # added to c1's path to the relay its pair with a1 uses


def relay_round_trips(vm: Vm) -> dict[str, int]:
    """The round trips to relays `vm`'s record says (its status), by relay name, in ms."""
    relays = (node_status(vm) or {}).get("node", {}).get("relays", [])
    return {r["name"]: r["rtt_ms"] for r in relays}


def scenario_nearer_relay(nat: NatLab) -> float:
    """Relay 4. Relays are ranked by the round trip through them. c1 and a1 are relayed
    (relay scenario 1); c1's path to the relay in use is then slowed by NEARER_DELAY_MS
    (netem on c1, towards that relay's addresses only): c1 times it, says so in its record,
    and both sides move the pair to the other relay, now much nearer. Returns the time from
    the delay to the pair up through the other relay on both sides."""
    c1, a1 = nat["c1"], nat["a1"]
    wait_relayed([(c1, a1)], 120)
    used = assert_through_relay(nat, c1, a1)
    (other,) = [r for r in RELAYS if r != used]

    def timed_both() -> bool:
        return all(set(relay_round_trips(vm)) == set(RELAYS) for vm in (c1, a1))

    try:  # both sides have said how far both relays are: the ranking is by round trip
        wait_until(timed_both, 120, "c1 and a1 to time both relays", interval=1.0)
    except LabError as e:
        raise AssertionError(f"{e}: {[relay_round_trips(vm) for vm in (c1, a1)]}") from e
    addresses = sorted(
        {
            split_endpoint(e)[0]
            for e in (node_status(nat[used]) or {}).get("node", {}).get("endpoints", [])
        }
    )
    assert addresses, f"{used} advertises no endpoint"
    dev = c1.check(["sh", "-c", "ip -o -4 addr show | awk '/10.3.0.31/ {print $2}'"]).strip()
    assert dev, "c1's underlay interface"
    # Four bands, everything in the first but what the filters send to the fourth.
    filters = " && ".join(
        f"tc filter add dev {dev} parent 1: protocol ip prio 1 u32 match ip dst {a}/32 flowid 1:4"
        for a in addresses
    )
    script = (
        f"tc qdisc add dev {dev} root handle 1: prio bands 4 "
        "priomap 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 && "
        f"tc qdisc add dev {dev} parent 1:4 handle 40: netem delay {NEARER_DELAY_MS}ms && "
        f"{filters} && date +%s.%N"
    )
    result = c1.sh(script)
    assert result.exit_code == 0, result
    delayed = float(result.stdout.split()[-1]) + nat.clocks.offset(c1)
    try:

        def moved() -> bool:
            return relay_of(c1, a1) == other == relay_of(a1, c1)

        try:
            wait_until(moved, 240, f"c1 and a1 to move to {other}", interval=1.0)
        except LabError as e:
            shown = {
                vm.name: (relay_of(vm, peer), relay_round_trips(vm))
                for vm, peer in ((c1, a1), (a1, c1))
            }
            raise AssertionError(f"{e}: (relay, round trips) {shown}") from e
        took = time.time() - delayed
        assert assert_through_relay(nat, c1, a1) == other
        assert assert_through_relay(nat, a1, c1) == other
        c1.check(["ping", "-c", "2", "-W", "3", ula(a1)])
        timed = relay_round_trips(c1)
        assert timed.get(used, 0) >= NEARER_DELAY_MS > timed.get(other, NEARER_DELAY_MS), timed
    finally:
        c1.sh(f"tc qdisc del dev {dev} root")
    return took


@dataclass(frozen=True)
class BlockedSites:
    relayed_s: float  # from blocking UDP between the sites to the pair up through a relay
    direct_again_s: float  # from unblocking to a direct tunnel again
    direct_rate: float  # bytes a second of the best direct stream (two VMs busy)
    relayed_rate: float  # bytes a second of the best stream through the relay (three)
    # The best direct stream with its packets routed through the relay's VM, as a plain
    # router (three VMs busy, each packet on the same VMs and segment crossings as relayed).
    routed_rate: float

    @property
    def throughput_ratio(self) -> float:
        """Through the relay over the same direct tunnel through the same VMs: what the
        relay's forwarding costs, apart from the lab's one more VM on two host cores."""
        return self.relayed_rate / self.routed_rate

    @property
    def throughput_ratio_two_vms(self) -> float:
        """Through the relay over the direct tunnel as the lab routes it (the sites' routers
        are namespaces: two VMs busy, against three relayed, on two host cores)."""
        return self.relayed_rate / self.direct_rate


def scenario_blocked_sites(nat: NatLab) -> BlockedSites:
    """Relay 2. a1 and b1 have a direct tunnel (scenario 3); their routers then drop all
    UDP between the two sites: the pair comes up through a relay. Unblocked, it moves back
    to a direct tunnel within two minutes. TCP throughput is measured (best of RATE_RUNS
    streams each) on the direct tunnel, through the relay, and on the direct tunnel again
    with the routers sending it through the relay's VM (at the address each side sent to
    the relay), so that the same VMs carry it."""
    a1, b1 = nat["a1"], nat["b1"]
    ends = ((a1, b1, nat.r2), (b1, a1, nat.r1))
    wait_direct(ends, DIRECT_WITHIN_S)
    direct_rate = best_tcp_rate(a1, b1)
    blocks = ((nat.r1, nat.r2), (nat.r2, nat.r1))
    for router, other in blocks:
        router.drop(drop_rule(destination=other.public_ip, protocol="udp"))
        router.drop(drop_rule(source=other.public_ip, protocol="udp"))
    blocked = time.time()
    try:
        wait_relayed([(a1, b1)], 120)
        relayed_s = time.time() - blocked
        relay = nat[assert_through_relay(nat, a1, b1)]
        # Where each side reaches the relay (r2 may not reach pub1's first address).
        via = {
            router: split_endpoint(wg_endpoints(side)[public_key(other)])[0]
            for side, other, router in ((a1, b1, nat.r1), (b1, a1, nat.r2))
        }
        a1.check(["ping", "-c", "2", "-W", "3", ula(b1)])
        relayed_rate = best_tcp_rate(a1, b1)
    finally:
        for router, _ in blocks:
            router.clear_drops()
        nat.r2.drop(drop_rule(destination="192.0.2.11"))  # scenario 4's, kept
    opened = time.time()
    wait_direct(ends, 120)
    direct_again_s = time.time() - opened
    routed_rate = routed_tcp_rate(a1, b1, relay, [(r, o, via[r]) for r, o in blocks])
    wait_direct(ends, 60)
    return BlockedSites(relayed_s, direct_again_s, direct_rate, relayed_rate, routed_rate)


def routed_tcp_rate(
    sender: Vm, receiver: Vm, through: Vm, routes: list[tuple[Router, Router, str]]
) -> float:
    """best_tcp_rate on the direct tunnel while each router sends what goes to the other's
    public address through `through`'s VM at the address given (`routes`: router, other,
    next hop); every stream's packets are checked to have been forwarded there."""
    try:
        for router, other, hop in routes:
            router.ns.ip("route", "add", f"{other.public_ip}/32", "via", hop)
        forwarded = forwarded_datagrams(through)
        rate = best_tcp_rate(sender, receiver)
        # Each stream's data, in datagrams of at most the tunnel's MTU, crossed `through`.
        crossed = forwarded_datagrams(through) - forwarded
        assert crossed >= RATE_RUNS * TRANSFER_BYTES // 1420, (through.name, crossed)
        return rate
    finally:
        for router, other, hop in routes:
            router.ns.ip("route", "del", f"{other.public_ip}/32", "via", hop)


def forwarded_datagrams(vm: Vm) -> int:
    """The kernel's count of IPv4 datagrams `vm` forwarded (Ip: ForwDatagrams)."""
    header, values = (
        line.split()
        for line in vm.check(["cat", "/proc/net/snmp"]).splitlines()
        if line.startswith("Ip:")
    )
    return int(values[header.index("ForwDatagrams")])


def scenario_relay_failover(nat: NatLab) -> float:
    """Relay 3. The relay carrying c1 and a1 is killed (the plug pulled, no leave) while
    a ping flows: the pair is up again through the other relay. Returns the time from the
    kill to the flow answered again. Last: the lab has one relay fewer afterwards."""
    c1, a1 = nat["c1"], nat["a1"]
    wait_relayed([(c1, a1)], 120)
    used = assert_through_relay(nat, c1, a1)
    (other,) = [r for r in RELAYS if r != used]
    start_flow(c1, "relay-failover", ula(a1))
    try:
        wait_flows_recovered(nat.clocks, [(c1, "relay-failover")], time.time() - 60, 60)
        killed = nat.relay_killed_at = time.time()
        nat[used].kill()
        took = wait_flows_recovered(nat.clocks, [(c1, "relay-failover")], killed, 120)
    finally:
        stop_flow(c1, "relay-failover")
    wait_relayed([(c1, a1)], 60)
    assert relay_of(c1, a1) == other, (relay_of(c1, a1), other)
    return took


# What the failover's sides and relays said: their peer states and relay bindings.
FAILOVER_LINE = re.compile(r"\bpeer \S+ state=|kubespan\.relay\.|round trips to relays")


def failover_timeline(nat: NatLab, since: float, limit: int = 60) -> str:
    """The failover pair's and the relays' agents' lines on states and relays since `since`
    (host time), in host time order: what a slow failover is read from, within the
    assertion's message (a CI run's output is kept in part only)."""
    lines = []
    for name in ("c1", "a1", *RELAYS):
        vm = nat[name]
        if not vm.running:
            continue
        try:
            entries = nat.clocks.journal(vm, "kubespan.service")
        except LabError as e:
            lines.append((since, f"{name}: no journal: {e}"))
            continue
        lines += [
            (e.at, f"{e.at - since:7.2f} {name}: {e.message[:220]}")
            for e in entries
            if e.at >= since and FAILOVER_LINE.search(e.message)
        ]
    shown = [text for _, text in sorted(lines)]
    if len(shown) > limit:
        shown = [*shown[:limit], f"... {len(shown) - limit} lines more"]
    return "\n".join(shown)


def check_relay_capture(nat: NatLab) -> int:
    """The capture taken through the relay scenarios: no plaintext between members (the
    relays' forwarding included); returns the WireGuard messages relays carried."""
    from mesh import relayed_udp

    capture = nat.relay_capture
    assert capture is not None, "no relay scenario ran"
    capture.stop()
    check_only_wireguard(nat, capture)
    return len(capture.packets(relayed_udp(RELAY_PORTS)))


# --- flat LAN and IPv6-only labs -----------------------------------------------------------


def boot_flat(lab: Lab, kubespan_bin: Path, state_dir: Path, count: int) -> list[Vm]:
    lan = lab.add_segment("lan")
    url = start_discovery(lab, kubespan_bin, str(lan.gateway.ip), state_dir)
    cluster_id, secret = cluster_identity()
    config = machine_config(url, cluster_id, secret)
    specs = [
        VmSpec(
            f"node{i}",
            nics=(NicSpec("lan", (lan.address(10 + i), lan.address6(10 + i))),),
            machineconfig=config,
        )
        for i in range(1, count + 1)
    ]
    return lab.boot_all(specs, timeout=600)


def flat_mesh_time(vms: list[Vm], clocks: Clocks) -> float:
    """From the last agent's start to every pair up (both sides)."""
    wait_for_pairs(all_pairs(vms), 300, f"a full mesh of {len(vms)}")
    return pairs_time(clocks, all_pairs(vms))


@dataclass
class V6Lab:
    lab: Lab
    segment: Segment
    vms: list[Vm]
    capture: Capture
    clocks: Clocks = field(default_factory=Clocks)

    def underlay(self, vm: Vm) -> str:
        return str(self.segment.address6(10 + self.vms.index(vm) + 1).ip)


def build_v6_lab(lab: Lab, kubespan_bin: Path, state_dir: Path, count: int = 3) -> V6Lab:
    """One segment with global IPv6 only (the lab namespace holds 2001:db8::1 and no IPv4
    address; the nodes get no IPv4 at all); discovery over IPv6."""
    segment = lab.add_segment("wan6", "198.18.0.0/24", "2001:db8::/64", host=(6,))
    url = start_discovery(lab, kubespan_bin, str(segment.address6(1).ip), state_dir)
    capture = lab.capture("wan6", "wan6-capture")
    cluster_id, secret = cluster_identity()
    config = machine_config(url, cluster_id, secret)
    specs = [
        VmSpec(
            f"six{i}",
            nics=(NicSpec("wan6", (segment.address6(10 + i),)),),
            machineconfig=config,
        )
        for i in range(1, count + 1)
    ]
    return V6Lab(lab, segment, lab.boot_all(specs, timeout=600), capture)


def scenario_ipv6_only(six: V6Lab) -> float:
    """7. IPv6-only underlay: full mesh, and every member pings every other by ULA and by
    underlay address, all through the tunnel: the capture of the segment holds nothing but
    WireGuard (and neighbour discovery) between members."""
    from mesh import assert_only_wireguard_between

    wait_for_pairs(all_pairs(six.vms), 300, "an IPv6-only mesh")
    took = flat_mesh_time(six.vms, six.clocks)
    ulas = {vm.name: ula(vm) for vm in six.vms}
    failures = []
    for vm in six.vms:
        for other in six.vms:
            if other is vm:
                continue
            for target in (ulas[other.name], six.underlay(other)):
                result = vm.exec(["ping", "-c", "2", "-W", "3", target])
                if result.exit_code != 0:
                    failures.append(f"{vm.name} -> {other.name} {target}")
    assert not failures, "unanswered: " + "; ".join(failures)
    six.capture.stop()
    assert assert_only_wireguard_between(six.capture, [six.underlay(vm) for vm in six.vms]) > 0
    return took
