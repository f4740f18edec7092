"""A kubespan cluster in a lab: discovery on the host side, N nodes booted from the image,
and waits on the mesh that read each node's own `kubespan status`. Used by the VM tests and
by `make demo`."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubespan.config.render import new_config_document, to_yaml

from kslab import (
    Capture,
    HostProcess,
    Image,
    Lab,
    NicSpec,
    Segment,
    Vm,
    VmSpec,
    cluster_identity,
    wait_until,
)

DISCOVERY_PORT = 3000


def machine_config(
    discovery_url: str,
    cluster_id: str,
    secret: str,
    enabled: bool = True,
    standby_url: str | None = None,
    **kubespan: Any,
) -> str:
    """The machine config of a node of this cluster; with `standby_url`, registered with two
    independent discovery services."""
    document = new_config_document(discovery_url, cluster_id, secret)
    document["machine"]["network"]["kubespan"] = {"enabled": enabled, **kubespan}
    if standby_url is not None:
        registries = document["cluster"]["discovery"]["registries"]
        registries["service"] = {"endpoints": [discovery_url, standby_url]}
    return to_yaml(document)


@dataclass
class Cluster:
    lab: Lab
    lan: Segment
    discovery_url: str
    cluster_id: str
    secret: str
    discovery: HostProcess
    discovery_argv: list[str]
    nodes: list[Vm] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    standby_url: str | None = None  # a second, independent discovery service

    def stop_discovery(self) -> None:
        self.discovery.stop()

    def start_discovery(self, name: str) -> None:
        """Start the discovery service again (under a new process name), same flags."""
        self.discovery = self.lab.spawn(name, self.discovery_argv)
        host = self.discovery_url.split("//")[1]
        self.lab.wait_tcp(host.rsplit(":", 1)[0], int(host.rsplit(":", 1)[1]))

    def listed(self) -> int:
        """How many members the discovery service lists (asked as a member would)."""
        script = (
            "import sys\n"
            "from kubespan.crypto import ClusterKeys\n"
            "from kubespan.discovery.client import DiscoveryClient\n"
            "from kubespan.config.interpret import decode_key32\n"
            "keys = ClusterKeys.derive(sys.argv[2], decode_key32(sys.argv[3]))\n"
            "print(len(DiscoveryClient(sys.argv[1], keys).listing().affiliates))\n"
        )
        result = self.lab.run(
            [sys.executable, "-c", script, self.discovery_url, self.cluster_id, self.secret],
            check=False,
        )
        return int(result.stdout) if result.returncode == 0 and result.stdout.strip() else -1

    def node_address(self, vm: Vm) -> str:
        return str(self.lan.address(10 + int(vm.name.removeprefix("node"))).ip)

    def node_address6(self, vm: Vm) -> str:
        return str(self.lan.address6(10 + int(vm.name.removeprefix("node"))).ip)

    def config(self, **kubespan: Any) -> str:
        return machine_config(
            self.discovery_url,
            self.cluster_id,
            self.secret,
            standby_url=self.standby_url,
            **kubespan,
        )

    def boot(self, count: int, first_host: int = 11, **kubespan: Any) -> list[Vm]:
        specs = [
            VmSpec(
                f"node{first_host + i - 10}",
                nics=(
                    NicSpec(
                        "lan", (self.lan.address(first_host + i), self.lan.address6(first_host + i))
                    ),
                ),
                machineconfig=self.config(**kubespan),
            )
            for i in range(count)
        ]
        vms = self.lab.boot_all(specs)
        self.nodes.extend(vms)
        return vms


def start_cluster(lab: Lab, kubespan_bin: Path, state_dir: Path, standby: bool = False) -> Cluster:
    """One LAN segment, the discovery service on its host side, a fresh cluster identity; with
    `standby`, a second discovery service (port DISCOVERY_PORT + 1) every node registers with
    too."""
    lan = lab.add_segment("lan")
    host = str(lan.gateway.ip)

    def serve(name: str, port: int, state: Path) -> tuple[HostProcess, list[str]]:
        argv = [
            str(kubespan_bin),
            "discovery",
            "serve",
            "--listen",
            f"{host}:{port}",
            "--state-dir",
            str(state),
        ]
        process = lab.spawn(name, argv)
        lab.wait_tcp(host, port)
        return process, argv

    process, argv = serve("discovery", DISCOVERY_PORT, state_dir)
    standby_url = None
    if standby:
        serve("standby", DISCOVERY_PORT + 1, state_dir.with_name(f"{state_dir.name}-standby"))
        standby_url = f"http://{host}:{DISCOVERY_PORT + 1}"
    cluster_id, secret = cluster_identity()
    url = f"http://{host}:{DISCOVERY_PORT}"
    return Cluster(lab, lan, url, cluster_id, secret, process, argv, standby_url=standby_url)


@contextmanager
def shared_cluster(
    image: Image, kubespan_bin: Path, directory: Path, standby: bool = False
) -> Iterator[Cluster]:
    """A lab of its own with one LAN and a discovery service (state in DIRECTORY/discovery),
    and with `standby` a second one, for the tests of one module to share; torn down when the
    block ends."""
    with Lab(directory / "lab", image) as lab:
        yield start_cluster(lab, kubespan_bin, directory / "discovery", standby)


def node_status(vm: Vm) -> dict[str, Any] | None:
    """The live agent's report (`kubespan status --json`, ready or not), or None while there
    is none: no agent answers (exit 3: what it printed then is the file a previous agent
    left), or the agent is still starting (a placeholder, with no "peers"). Without the
    check's summary: polled often, on guests whose CPU the agents need."""
    result = vm.exec(["kubespan", "status", "--json", "--no-check"], timeout=60)
    if result.exit_code not in (0, 1) or not result.stdout.strip():
        return None
    document: dict[str, Any] = json.loads(result.stdout)
    return document if "peers" in document else None


def meshed(document: dict[str, Any] | None, peers: int) -> bool:
    if document is None or not document.get("ready"):
        return False
    states = [p["state"] for p in document["peers"]]
    return len(states) == peers and all(s == "up" for s in states)


def wait_for_mesh(vms: list[Vm], timeout: float = 240.0) -> dict[str, dict[str, Any]]:
    """Wait until every node reports every other node up; return each node's status."""
    statuses: dict[str, dict[str, Any]] = {}

    def all_up() -> bool:
        for vm in vms:
            if vm.name in statuses:
                continue
            document = node_status(vm)
            if meshed(document, len(vms) - 1):
                assert document is not None
                statuses[vm.name] = document
        return len(statuses) == len(vms)

    wait_until(all_up, timeout, f"a full mesh of {len(vms)} nodes", interval=2.0)
    return statuses


def wait_for_passes(vm: Vm, after: float, seconds: float) -> None:
    """Wait until the agent has published status more than `seconds` after `after` (its
    own clock), i.e. until it has run its reconcile passes for that long."""

    def published() -> bool:
        document = node_status(vm)
        return document is not None and document["updated_at"] > after + seconds

    wait_until(published, seconds + 60, f"{vm.name} to keep reconciling for {seconds:g} s")


def between(a: str, b: str) -> str:
    """A capture filter for packets from `a` to `b` or back."""
    return f"((src {a} and dst {b}) or (src {b} and dst {a}))"


# What kubespan sends between members over UDP, told by the payload (IPv4 captures): a
# WireGuard message (type 1 to 4, three zero bytes), a path check ("KSpc") or a relay bind
# ("KSrb"), both authenticated control without member data.
WIREGUARD_PAYLOAD = "(udp[8] >= 1 and udp[8] <= 4 and udp[9:2] = 0 and udp[11] = 0)"
KUBESPAN_UDP = f"(udp and ({WIREGUARD_PAYLOAD} or udp[8:4] = 0x4b537063 or udp[8:4] = 0x4b537262))"


def relayed_udp(relay_ports: tuple[int, int]) -> str:
    """A capture filter for WireGuard messages to or from a relay's ports."""
    first, count = relay_ports
    return f"(udp portrange {first}-{first + count - 1} and {WIREGUARD_PAYLOAD})"


def assert_only_wireguard_between(
    capture: Capture, addresses: list[str], port: int = 51820, by_payload: bool = False
) -> int:
    """Zero plaintext packets between any two member addresses (IPv4 and IPv6) in the whole
    capture. Allowed besides WireGuard's UDP: ICMP errors about WireGuard's own UDP (they quote
    its ciphertext; e.g. port unreachable while a booting peer has no link yet) and, for IPv6,
    neighbour discovery (link-layer control, ICMPv6 types 135 and 136). WireGuard's UDP is
    what goes to or from `port`; with `by_payload` (IPv4 only), behind NATs that give any
    port, and through relays, it is any UDP whose payload is a WireGuard message, a path
    check or a relay bind. Returns how many WireGuard packets went between them."""
    about_wireguard = {
        # ICMP header 8 bytes, the quoted IPv4 header 20: the quoted UDP ports at 28 and 30.
        "ip": f"(icmp and (icmp[28:2] == {port} or icmp[30:2] == {port}))",
        # ICMPv6 header 8 bytes after the IPv6 header 40, the quoted IPv6 header 40.
        "ip6": f"(icmp6 and ip6[40] < 128 and (ip6[88:2] == {port} or ip6[90:2] == {port}))",
    }
    neighbour = {"ip": "", "ip6": " and not (icmp6 and (ip6[40] == 135 or ip6[40] == 136))"}
    ours = KUBESPAN_UDP if by_payload else f"udp port {port}"
    wireguard_udp = f"udp and {WIREGUARD_PAYLOAD}" if by_payload else f"udp port {port}"
    wireguard = 0
    for index, a in enumerate(addresses):
        for b in addresses[index + 1 :]:
            if (":" in a) != (":" in b):
                continue
            family = "ip6" if ":" in a else "ip"
            if by_payload and family == "ip6":
                raise ValueError("payload checks are for IPv4 captures")
            plain = capture.packets(
                f"{family} and {between(a, b)} and not {ours}"
                f" and not {about_wireguard[family]}{neighbour[family]}"
            )
            assert plain == [], f"plaintext between members {a} and {b}: {plain[:5]}"
            wireguard += len(capture.packets(f"{wireguard_udp} and {between(a, b)}"))
    return wireguard


def start_pingers(vms: list[Vm], targets: dict[str, list[str]]) -> None:
    """Keep traffic flowing from each node to each of its targets (one ping a second, as a
    transient unit), so that a capture sees what members send each other all along."""
    for vm in vms:
        for index, address in enumerate(targets[vm.name]):
            vm.check(
                ["systemd-run", f"--unit=pinger{index}", "ping", "-i", "1", "-W", "1", address]
            )
