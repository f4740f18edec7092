"""Machine config sources on the real image: the last good config survives a bad or missing
platform config; config drive and kernel command line URL sources; turning kubespan off
removes what it created and leaves discovery, turning it on brings the same mesh back."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kslab import Lab, NicSpec, Vm, VmSpec, wait_until
from mesh import node_status, start_cluster, wait_for_mesh

pytestmark = pytest.mark.vm

FW_CFG_SOURCE = "fw_cfg:opt/org.kubespan/machineconfig"


def ready(vm: Vm) -> dict[str, object]:
    status = wait_until(
        lambda: (s := node_status(vm)) is not None and s.get("ready") and s,
        180,
        f"{vm.name} to be ready",
        interval=2.0,
    )
    assert isinstance(status, dict)
    return status


def public_key(vm: Vm) -> str:
    return vm.check(["wg", "show", "kubespan", "public-key"]).strip()


def test_last_good_config_survives_bad_and_missing_platform_config(
    lab: Lab, kubespan_bin: Path, tmp_path: Path
) -> None:
    cluster = start_cluster(lab, kubespan_bin, tmp_path / "discovery")
    good = cluster.config(mtu=1400)
    vm = lab.boot(
        VmSpec("node1", nics=(NicSpec("lan", (cluster.lan.address(11),)),), machineconfig=good)
    )
    ready(vm)
    key = public_key(vm)
    assert vm.check(["cat", "/var/lib/kubespan/machineconfig.yaml"]) == good
    assert f"machine config from {FW_CFG_SOURCE}" in vm.journal("kubespan")

    vm.set_fw_cfg("machineconfig", cluster.config(mtu=9))
    vm.reboot()
    vm.wait_unit("kubespan.service", "active")
    ready(vm)
    journal = vm.journal("kubespan")
    assert (
        f"{FW_CFG_SOURCE}:6: machine.network.kubespan.mtu: must be at least 1280, not 9" in journal
    )
    assert "keeping the last good config /var/lib/kubespan/machineconfig.yaml" in journal
    assert vm.check(["cat", "/sys/class/net/kubespan/mtu"]).strip() == "1400"
    assert public_key(vm) == key
    assert vm.check(["cat", "/var/lib/kubespan/machineconfig.yaml"]) == good

    vm.set_fw_cfg("machineconfig", None)
    vm.reboot()
    vm.wait_unit("kubespan.service", "active")
    ready(vm)
    assert "no config source has a machine config; using the last good config" in vm.journal(
        "kubespan"
    )
    assert public_key(vm) == key


def kubespan_leftovers(vm: Vm) -> list[str]:
    """Kernel objects of ours still present on `vm`."""
    found = []
    if vm.exec(["ip", "link", "show", "kubespan"]).exit_code == 0:
        found.append("link kubespan")
    if vm.exec(["nft", "list", "table", "inet", "kubespan"]).exit_code == 0:
        found.append("nftables table inet kubespan")
    for family in ("-4", "-6"):
        if "lookup 180" in vm.check(["ip", family, "rule", "show"]):
            found.append(f"ip {family} rule lookup 180")
        if vm.check(["ip", family, "route", "show", "table", "180"]).strip():
            found.append(f"ip {family} routes in table 180")
    return found


def test_disable_then_enable_again(lab: Lab, kubespan_bin: Path, tmp_path: Path) -> None:
    cluster = start_cluster(lab, kubespan_bin, tmp_path / "discovery")
    host = str(cluster.lan.gateway.ip)
    site = tmp_path / "site"
    site.mkdir()
    (site / "node2.yaml").write_text(cluster.config())
    lab.spawn("configs", [sys.executable, "-m", "http.server", "--bind", host, "8080"], cwd=site)
    lab.wait_tcp(host, 8080)
    url = f"http://{host}:8080/node2.yaml"
    node1, node2 = lab.boot_all(
        [
            VmSpec(
                "node1",
                nics=(NicSpec("lan", (cluster.lan.address(11),)),),
                config_drive=(("machineconfig.yaml", cluster.config()),),
            ),
            VmSpec(
                "node2",
                nics=(NicSpec("lan", (cluster.lan.address(12),)),),
                kernel_args=(f"kubespan.config={url}",),
            ),
        ]
    )
    wait_for_mesh([node1, node2])
    assert "machine config from config drive KUBESPAN:machineconfig.yaml" in node1.journal(
        "kubespan"
    )
    assert f"machine config from {url}" in node2.journal("kubespan")
    key = public_key(node1)

    off = cluster.config(enabled=False).encode()
    node1.check(["kubespan", "config", "apply", "-"], stdin=off)
    wait_until(lambda: not kubespan_leftovers(node1), 60, "node1 to remove what it created")
    wait_until(
        lambda: (s := node_status(node2)) is not None and s["peers"] == [],
        60,
        "node2 to drop node1 (it left discovery)",
        interval=2.0,
    )
    assert node2.check(["wg", "show", "kubespan", "peers"]).strip() == ""
    assert "kubespan is disabled: removed link kubespan" in node1.journal("kubespan")

    node1.check(["kubespan", "config", "apply", "-"], stdin=cluster.config().encode())
    wait_for_mesh([node1, node2])
    assert public_key(node1) == key
    for vm in (node1, node2):
        other = node2 if vm is node1 else node1
        vm.check(["ping", "-c", "2", "-W", "3", node_status(other)["node"]["ula"]])  # type: ignore[index]
