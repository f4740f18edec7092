"""Membership that fails closed, on the image: the discovery service loses its state, or is
down while a node reboots, and the mesh stays whole. A capture runs on the underlay for the
whole of each test (the first one's from before the nodes boot) and must hold zero plaintext
packets between members, while every node keeps pinging every other node's addresses all
along. The two tests share one booted cluster, in this order."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kslab import Capture, Image, Lab, Vm, wait_until
from mesh import (
    Cluster,
    assert_only_wireguard_between,
    node_status,
    shared_cluster,
    start_pingers,
    wait_for_mesh,
)

pytestmark = pytest.mark.vm


def member_addresses(cluster: Cluster, vms: list[Vm]) -> list[str]:
    return [cluster.node_address(vm) for vm in vms] + [cluster.node_address6(vm) for vm in vms]


def ping_everyone(cluster: Cluster, vms: list[Vm], among: list[Vm] | None = None) -> None:
    """From each of `vms`, ping every address of the others of `among` (default: `vms`)."""
    addresses = member_addresses(cluster, among or vms)
    start_pingers(
        vms, {vm.name: [a for a in addresses if a not in _own(cluster, vm)] for vm in vms}
    )


def _own(cluster: Cluster, vm: Vm) -> tuple[str, str]:
    return cluster.node_address(vm), cluster.node_address6(vm)


def peers_removed(vm: Vm) -> list[str]:
    """The agent's removals of peers from its link, from its journal. A restart is not one:
    a peer removed and at once added again (the next peer change, for the same key), which
    the agent does to switch a peer that is not up to a path that answered a check, as may
    happen while a mesh forms."""
    changes = [line for line in vm.journal("kubespan").splitlines() if PEER_CHANGE in line]
    removed = []
    for line, after in zip(changes, [*changes[1:], ""], strict=True):
        if line.endswith(" remove"):
            key = line.split(PEER_CHANGE, 1)[1].split()[0]
            if not after.split(PEER_CHANGE, 1)[-1].startswith(f"{key} ") or after.endswith(
                " remove"
            ):
                removed.append(line)
    return removed


PEER_CHANGE = "applied wg set kubespan peer "


@dataclass
class Members:
    cluster: Cluster
    nodes: list[Vm]
    state: Path  # the discovery service's state directory
    capture: Capture  # running since before the nodes booted

    @property
    def lab(self) -> Lab:
        return self.cluster.lab


@pytest.fixture(scope="module")
def members(
    image: Image, kubespan_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Members]:
    directory = tmp_path_factory.mktemp("members")
    with shared_cluster(image, kubespan_bin, directory) as cluster:
        state = directory / "discovery"
        capture = cluster.lab.capture("lan")
        nodes = cluster.boot(3)
        wait_for_mesh(nodes)
        ping_everyone(cluster, nodes)
        yield Members(cluster, nodes, state, capture)


def test_discovery_restarted_without_its_state_keeps_the_mesh(
    members: Members, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster, nodes, state, capture = members.cluster, members.nodes, members.state, members.capture
    wait_until(lambda: cluster.listed() == 3, 60, "every node listed", interval=1.0)

    cluster.stop_discovery()
    shutil.rmtree(state)
    restarted = time.monotonic()
    cluster.start_discovery("discovery-empty")
    wait_until(lambda: cluster.listed() == 3, 60, "every node back in the listing", 0.5)
    relisted = time.monotonic() - restarted

    # Nothing was removed anywhere, every tunnel is up, and members still reach each other.
    for vm in nodes:
        assert peers_removed(vm) == [], vm.name
        status = node_status(vm)
        assert status is not None and [p["state"] for p in status["peers"]] == ["up", "up"]
        for address in member_addresses(cluster, nodes):
            if address not in _own(cluster, vm):
                vm.check(["ping", "-c", "2", "-W", "3", address])
    capture.stop()
    assert assert_only_wireguard_between(capture, member_addresses(cluster, nodes)) > 0
    with capsys.disabled():
        print(f"\nrelisted_after_empty_restart_s={relisted:.1f}")


def test_a_node_rebooted_while_discovery_is_down_is_ready_from_its_cache(
    members: Members, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster, nodes = members.cluster, members.nodes
    capture = members.lab.capture("lan", "capture-reboot")
    wait_for_mesh(nodes)
    node3 = nodes[2]
    wait_until(
        lambda: node3.exec(["test", "-s", "/var/lib/kubespan/peers.json"]).exit_code == 0,
        60,
        "node3's peer cache",
    )

    cluster.stop_discovery()
    node3.reboot()
    rebooted = time.monotonic()
    node3.wait_unit("kubespan.service", "active", timeout=240)  # Type=notify: READY sent
    ready = time.monotonic() - rebooted
    status = node_status(node3)
    assert status is not None and status["ready"]
    assert "mesh configured from the peer cache" in node3.journal("kubespan")
    wait_for_mesh(nodes)  # whole again, with discovery still down
    ping_everyone(cluster, [node3], among=nodes)

    cluster.start_discovery("discovery-back")
    (node4,) = cluster.boot(1, first_host=14)
    everyone = [*nodes, node4]
    wait_for_mesh(everyone)
    for vm in nodes:
        assert peers_removed(vm) == [], vm.name
    capture.stop()
    assert assert_only_wireguard_between(capture, member_addresses(cluster, everyone)) > 0
    with capsys.disabled():
        print(f"\nready_from_cache_after_reboot_s={ready:.1f}")
