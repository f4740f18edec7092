"""The walking skeleton, end to end on real kernels: three nodes given one flag mesh over
kernel WireGuard through the discovery service, and reach each other's ULA through the tunnel."""

from __future__ import annotations

import ipaddress
import re
import time
from pathlib import Path

import pytest

from kslab import Lab
from mesh import start_cluster, wait_for_mesh, wait_for_passes

pytestmark = pytest.mark.vm


def wg_peers(dump: str) -> list[list[str]]:
    """Peer lines of `wg show kubespan dump` (the first line is the device)."""
    return [line.split("\t") for line in dump.strip().splitlines()[1:]]


def test_three_nodes_mesh_and_ping_over_the_tunnel(
    lab: Lab, kubespan_bin: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = start_cluster(lab, kubespan_bin, tmp_path / "discovery")
    started = time.monotonic()
    nodes = cluster.boot(3)
    booted = time.monotonic()
    statuses = wait_for_mesh(nodes)
    meshed = time.monotonic()

    ulas = {name: status["node"]["ula"] for name, status in statuses.items()}
    keys = {name: status["node"]["public_key"] for name, status in statuses.items()}
    prefix = ipaddress.IPv6Network(f"{ulas['node1']}/64", strict=False)
    assert len(set(ulas.values())) == 3
    assert all(ipaddress.IPv6Address(u) in prefix for u in ulas.values())

    for vm in nodes:
        status = statuses[vm.name]
        assert {p["name"] for p in status["peers"]} == set(statuses) - {vm.name}

        # The kernel agrees: two peers, each with a recent handshake and the agreed keys.
        dump = vm.check(["wg", "show", "kubespan", "dump"])
        device = dump.splitlines()[0].split("\t")
        assert device[1] == keys[vm.name]
        assert device[2] == "51820"
        peers = wg_peers(dump)
        assert {p[0] for p in peers} == {keys[n] for n in statuses if n != vm.name}
        now = time.time()
        for peer in peers:
            latest_handshake = int(peer[4])
            assert now - latest_handshake < 275, f"{vm.name}: stale handshake {peer}"
            assert peer[7] == "25"
            assert peer[1] != "(none)", "the preshared key from the KDF is set"

        link = vm.check(["ip", "-6", "-o", "address", "show", "dev", "kubespan"])
        assert f"{ulas[vm.name]}/64" in link
        mtu = vm.check(["cat", "/sys/class/net/kubespan/mtu"]).strip()
        assert mtu == "1420"

        # Every other node's ULA answers through the tunnel.
        for other, ula in ulas.items():
            if other == vm.name:
                continue
            vm.check(["ping", "-c", "2", "-W", "3", ula])
            route = vm.check(["ip", "-6", "route", "get", ula])
            assert re.search(r"\bdev kubespan\b", route), route

        assert "ready: mesh configured" in vm.journal("kubespan")

    # Once meshed, further reconcile passes change nothing in the kernel.
    for vm in nodes:
        applied = vm.journal("kubespan").count(" applied ")
        wait_for_passes(vm, after=statuses[vm.name]["updated_at"], seconds=10)
        assert vm.journal("kubespan").count(" applied ") == applied

    with capsys.disabled():
        print(
            f"\nvm_boot_s={booted - started:.1f} mesh_after_start_s={meshed - started:.1f}"
            f" mesh_after_agents_s={meshed - booted:.1f}"
        )
