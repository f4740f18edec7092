"""The node's lifecycle on a running cluster, one lab booted once: a unit ordered like kubelet
starts with the mesh configured; `kill -9` of the agent keeps a TCP stream and a ping between
members flowing; `kubespan check` explains what another program broke; with one of the
cluster's two discovery services killed, two nodes join the running cluster at once and a
powered-off node leaves every peer list. A capture on the segment runs throughout: not one
plaintext packet between members."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from natlab import Clocks, pairs_time
from upgrade import derive_extension, install_extension, serve_file, served_url

from kslab import Capture, Image, Lab, Vm, wait_until
from mesh import (
    Cluster,
    assert_only_wireguard_between,
    node_status,
    shared_cluster,
    wait_for_mesh,
    wait_for_passes,
)

pytestmark = pytest.mark.vm

STANDIN = "kubelet.service"
# Ordered exactly as kubelet is by the images that run it; it records what it found.
STANDIN_UNIT = """\
[Unit]
Description=Stands in for kubelet: records the mesh it finds at its start
Requires=kubespan.service
After=kubespan.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'ip -o link show kubespan > /run/standin.link 2>&1; \
wg show kubespan peers > /run/standin.peers 2>&1; echo $? > /run/standin.done'
"""

SINK = """\
import socket, struct
server = socket.create_server(("::", 5202), family=socket.AF_INET6)
while True:
    connection, _ = server.accept()
    received = 0
    while chunk := connection.recv(65536):
        received += len(chunk)
    connection.sendall(struct.pack("!Q", received))
    connection.close()
"""
# Sends until /run/stream.stop exists, then half-closes and reads how much the sink got.
STREAM = """\
import json, os, socket, struct, sys, time
result = {"sent": 0, "received": None, "error": None}
try:
    connection = socket.create_connection((sys.argv[1], 5202), timeout=30)
    chunk = bytes(16384)
    while not os.path.exists("/run/stream.stop"):
        connection.sendall(chunk)
        result["sent"] += len(chunk)
        time.sleep(0.01)
    connection.shutdown(socket.SHUT_WR)
    result["received"] = struct.unpack("!Q", connection.recv(8))[0]
except OSError as error:
    result["error"] = repr(error)
with open("/run/stream.result", "w") as out:
    json.dump(result, out)
"""
BUILT_EXTENSION = Path(__file__).resolve().parents[1] / "build" / "extension" / "kubespan.raw"
UPGRADE_PORT = 8090
NO_ANSWER = re.compile(r"no answer yet for icmp_seq=(\d+)")
ANSWER = re.compile(r"bytes from .* icmp_seq=(\d+)")


@dataclass
class LifeLab:
    lab: Lab
    cluster: Cluster
    capture: Capture
    nodes: list[Vm]

    def members(self) -> list[str]:
        addresses = []
        for vm in self.cluster.nodes:
            addresses += [self.cluster.node_address(vm), self.cluster.node_address6(vm)]
        return addresses


@pytest.fixture(scope="module")
def life(
    image: Image, kubespan_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LifeLab]:
    directory = tmp_path_factory.mktemp("lifelab")
    with shared_cluster(image, kubespan_bin, directory, standby=True) as cluster:
        lab = cluster.lab
        capture = lab.capture("lan")
        capture.wait_ready()
        nodes = cluster.boot(3)
        wait_for_mesh(nodes)
        yield LifeLab(lab, cluster, capture, nodes)


def ula(vm: Vm) -> str:
    status = node_status(vm)
    assert status is not None, f"{vm.name} has no status"
    return str(status["node"]["ula"])


def agent_pid(vm: Vm) -> int:
    return int(vm.check(["systemctl", "show", "-P", "MainPID", "kubespan"]).strip())


def link_index(vm: Vm) -> str:
    return vm.check(["ip", "-o", "link", "show", "kubespan"]).split(":", 1)[0]


def test_a_unit_ordered_like_kubelet_starts_with_the_mesh_configured(life: LifeLab) -> None:
    node1 = life.nodes[0]
    node1.write_file(f"/run/systemd/system/{STANDIN}", STANDIN_UNIT.encode())
    node1.check(["systemctl", "daemon-reload"])
    # Nothing of ours in the kernel: whatever the stand-in finds, the agent made before it.
    node1.check(["systemctl", "stop", "kubespan"])
    node1.check(["kubespan", "agent", "--cleanup"])
    assert node1.exec(["ip", "link", "show", "kubespan"]).exit_code != 0
    node1.check(["systemctl", "start", STANDIN], timeout=300)  # starts kubespan first
    assert node1.check(["cat", "/run/standin.done"]).strip() == "0"
    assert "kubespan:" in node1.check(["cat", "/run/standin.link"])
    peers = node1.check(["cat", "/run/standin.peers"]).split()
    known = {str(p["public_key"]) for p in (node_status(node1) or {}).get("peers", [])}
    assert len(peers) == 2 and set(peers) == known, (peers, known)
    wait_for_mesh(life.nodes)


def traffic_survives(
    node: Vm, peer: Vm, disrupt: Callable[[], object], what: str, expect_pid_change: bool = True
) -> int:
    """While a TCP stream and a ping (every 0.5 s) run from `node` to `peer` over the tunnel,
    `disrupt` the agent on `node`; wait for a new agent to be ready with every peer up, and
    let it run its passes a while. Then: no stream error and every byte received, at most
    one ping lost, the same link (adopted, not rebuilt) and no link created or peer removed
    by the new agent. Returns the new agent's pid."""
    target = ula(peer)
    peer.check(["systemd-run", "--unit=sink", "python3", "-c", SINK])
    wait_until(lambda: ":5202" in peer.check(["ss", "-Hltn"]), 60, "the sink to listen", 1.0)
    node.exec(["rm", "-f", "/run/stream.stop", "/run/stream.result"])
    node.check(["systemd-run", "--unit=stream", "python3", "-c", STREAM, target])
    node.check(
        ["systemd-run", "--unit=flowping", "ping", "-O", "-n", "-i", "0.5", "-W", "2", target]
    )
    index, pid = link_index(node), agent_pid(node)
    began = time.time()
    disrupt()

    def new_agent_ready() -> bool:
        status = node_status(node)
        return (
            status is not None
            and bool(status.get("ready"))
            and (status.get("pid") not in (None, pid) or not expect_pid_change)
            and all(p["state"] == "up" for p in status["peers"])
        )

    wait_until(new_agent_ready, 240, f"the agent after {what} ready", 2.0)
    print(f"\n{what}_ready_s={time.time() - began:.1f}")
    new_pid = agent_pid(node)
    wait_for_passes(node, float(node.check(["date", "+%s.%N"])), 15)
    node.check(["touch", "/run/stream.stop"])
    wait_until(
        lambda: node.exec(["test", "-s", "/run/stream.result"]).exit_code == 0,
        120,
        "the stream to finish",
        1.0,
    )
    node.exec(["systemctl", "kill", "--signal=SIGINT", "flowping"])
    wait_until(lambda: node.unit_state("flowping") != "active", 30, "ping to stop", 1.0)
    peer.exec(["systemctl", "stop", "sink"])
    stream = json.loads(node.check(["cat", "/run/stream.result"]))
    assert stream["error"] is None and stream["received"] == stream["sent"] > 0, stream
    pings = node.journal("flowping")
    node.exec(["systemctl", "reset-failed", "flowping", "stream"])
    unanswered = set(NO_ANSWER.findall(pings)) - set(ANSWER.findall(pings))
    assert len(unanswered) <= 1, f"lost pings {sorted(unanswered, key=int)}"
    assert len(ANSWER.findall(pings)) > 10, pings[-2000:]
    assert link_index(node) == index
    new_agent = node.check(["journalctl", "-b", "-u", "kubespan", f"_PID={new_pid}"])
    assert "ip link add" not in new_agent and " remove" not in new_agent, new_agent[-3000:]
    return new_pid


def test_kill_9_of_the_agent_keeps_traffic_flowing(life: LifeLab) -> None:
    node1, node2 = life.nodes[0], life.nodes[1]
    restarts = int(node1.check(["systemctl", "show", "-P", "NRestarts", "kubespan"]))
    traffic_survives(
        node1,
        node2,
        lambda: node1.check(["systemctl", "kill", "--signal=SIGKILL", "kubespan"]),
        "agent_restart",
    )
    assert int(node1.check(["systemctl", "show", "-P", "NRestarts", "kubespan"])) == restarts + 1


def test_an_extension_upgrade_keeps_traffic_flowing(life: LifeLab, tmp_path: Path) -> None:
    """A newer extension (the built one with another build stamp) replaces the image's
    (`systemd-sysext refresh`), the service restarts on it and adopts the kernel state."""
    node2, node1 = life.nodes[1], life.nodes[0]
    build = f"upgrade-{int(time.time())}"
    newer = derive_extension(BUILT_EXTENSION, tmp_path / "kubespan.raw", build)
    host = str(life.cluster.lan.gateway.ip)
    server = serve_file(life.lab, newer, host, UPGRADE_PORT)
    url = served_url(host, UPGRADE_PORT, newer)
    versions: list[str] = []
    try:
        new_pid = traffic_survives(
            node2,
            node1,
            lambda: versions.append(install_extension(node2, url)),
            "upgrade",
        )
    finally:
        server.stop()
    assert versions and f"(build {build})" in versions[0], versions
    new_agent = node2.check(["journalctl", "-b", "-u", "kubespan", f"_PID={new_pid}"])
    started = [line for line in new_agent.splitlines() if "starting node_id=" in line]
    assert started and f"build={build}" in started[-1], new_agent[-2000:]


def test_check_explains_an_underlay_mtu_too_small_and_a_rule_at_our_priority(
    life: LifeLab,
) -> None:
    node3 = life.nodes[2]
    device = node3.check(
        [
            "sh",
            "-c",
            f"ip -o -4 addr show | awk '/{life.cluster.node_address(node3)}/ {{print $2}}'",
        ]
    ).strip()
    assert device, "node3's underlay interface"
    healthy = node3.exec(["kubespan", "check", "--json"])
    assert healthy.exit_code == 0, healthy
    assert {f["severity"] for f in json.loads(healthy.stdout)} <= {"info"}, healthy.stdout
    node3.check(["ip", "link", "set", device, "mtu", "1400"])
    node3.check(["ip", "rule", "add", "priority", "32500", "fwmark", "0x1", "lookup", "100"])
    try:
        result = node3.exec(["kubespan", "check", "--json"])
        text = node3.exec(["kubespan", "check"]).stdout
        status = node3.exec(["kubespan", "status"]).stdout
    finally:
        node3.exec(["ip", "rule", "del", "priority", "32500", "fwmark", "0x1", "lookup", "100"])
        node3.exec(["ip", "link", "set", device, "mtu", "1500"])
    assert result.exit_code == 1, result
    codes = {f["code"] for f in json.loads(result.stdout)}
    assert {"mtu-too-large", "rule-priority-taken"} <= codes, result.stdout
    assert "1400" in text and "32500" in text, text
    summary = next((line for line in status.splitlines() if line.startswith("check: ")), "")
    assert "mtu-too-large" in summary and "rule-priority-taken" in summary, status
    print(f"\n--- kubespan check on node3 (underlay MTU 1400, a foreign rule at 32500) ---\n{text}")


def test_two_nodes_join_a_running_cluster_and_a_powered_off_one_leaves(
    life: LifeLab,
) -> None:
    # Every node is registered with two discovery services; the first is killed outright.
    # The new nodes join through the other, and the running ones learn of them there.
    assert life.cluster.standby_url is not None
    life.cluster.discovery.stop(timeout=0)  # SIGTERM then at once SIGKILL: it is gone
    joined = life.cluster.boot(2, first_host=14)
    everyone = [*life.nodes, *joined]
    statuses = wait_for_mesh(everyone, 300)
    for name, status in statuses.items():
        assert len(status["peers"]) == len(everyone) - 1, (name, status["peers"])
    clocks = Clocks()
    pairs = [(old, new) for old in everyone for new in joined if old is not new]
    print(f"\njoin_mesh_s={pairs_time(clocks, pairs):.1f}")
    leaving, staying = joined[-1], everyone[:-1]
    key = str((node_status(leaving) or {})["node"]["public_key"])
    # Traffic to the leaving node all along, by its ULA.
    leaving_ula = ula(leaving)
    for vm in staying:
        vm.check(["systemd-run", "--unit=toleaving", "ping", "-i", "1", "-W", "1", leaving_ula])
    powered_off = time.time()
    leaving.poweroff()

    def dropped_everywhere() -> bool:
        for vm in staying:
            status = node_status(vm)
            if status is None or any(p["public_key"] == key for p in status["peers"]):
                return False
            if key in vm.check(["wg", "show", "kubespan", "peers"]).split():
                return False
        return True

    wait_until(dropped_everywhere, 60, f"every peer to drop {leaving.name}", 2.0)
    print(f"\nleave_dropped_s={time.time() - powered_off:.1f}")
    # What it was routed stays in the tunnel for a while, with no peer: traffic still sent
    # to its underlay addresses is dropped, never sent in the clear (the capture, checked
    # by test_no_plaintext_between_members, covers the node that left).
    for vm in staying:
        for address in (life.cluster.node_address(leaving), life.cluster.node_address6(leaving)):
            vm.exec(["ping", "-c", "3", "-i", "0.5", "-W", "1", address])
    for vm in staying:
        vm.exec(["systemctl", "stop", "toleaving"])
    life.nodes[:] = staying  # the capture still covers the node that left (cluster.nodes)


def test_no_plaintext_between_members(life: LifeLab) -> None:
    assert assert_only_wireguard_between(life.capture, life.members()) > 0
