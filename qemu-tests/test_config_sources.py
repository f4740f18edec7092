"""Machine config sources on the real image: a bad config is explained in the journal and not
retried; the last good config survives a bad or missing platform config; config drive and
kernel command line URL sources; turning kubespan off removes what it created and leaves
discovery, turning it on brings the same mesh back. The image's own parts (read-only root,
/var on the state disk, the extension merged, kernel WireGuard) are checked on `solo`.

One lab and one discovery service serve the three tests, and their four VMs boot at once:
`bad1` (an invalid config), `solo` (a cluster of its own), `node1` and `node2` (a cluster of
two)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kslab import Image, Lab, NicSpec, Vm, VmSpec, cluster_identity, wait_until
from mesh import Cluster, machine_config, node_status, shared_cluster, wait_for_mesh

pytestmark = pytest.mark.vm

FW_CFG_SOURCE = "fw_cfg:opt/org.kubespan/machineconfig"


@dataclass
class SourcesLab:
    cluster: Cluster  # node1 and node2's
    bad: Vm
    solo: Vm
    solo_config: str  # a config of another cluster, on the same discovery service
    node1: Vm
    node2: Vm
    url: str  # where node2's kernel command line points

    @property
    def lab(self) -> Lab:
        return self.cluster.lab


@pytest.fixture(scope="module")
def sources(
    image: Image, kubespan_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SourcesLab]:
    directory = tmp_path_factory.mktemp("sources")
    with shared_cluster(image, kubespan_bin, directory) as cluster:
        lab, lan = cluster.lab, cluster.lan
        host = str(lan.gateway.ip)
        site = directory / "site"
        site.mkdir()
        (site / "node2.yaml").write_text(cluster.config())
        lab.spawn(
            "configs", [sys.executable, "-m", "http.server", "--bind", host, "8080"], cwd=site
        )
        lab.wait_tcp(host, 8080)
        url = f"http://{host}:8080/node2.yaml"
        bad = cluster.config(mtu=1000).replace("enabled: true", "enabld: true", 1)
        solo_config = machine_config(cluster.discovery_url, *cluster_identity(), mtu=1400)
        vms = lab.boot_all(
            [
                VmSpec("bad1", nics=(NicSpec("lan", (lan.address(21),)),), machineconfig=bad),
                VmSpec(
                    "solo", nics=(NicSpec("lan", (lan.address(31),)),), machineconfig=solo_config
                ),
                VmSpec(
                    "node1",
                    nics=(NicSpec("lan", (lan.address(11),)),),
                    config_drive=(("machineconfig.yaml", cluster.config()),),
                ),
                VmSpec(
                    "node2",
                    nics=(NicSpec("lan", (lan.address(12),)),),
                    kernel_args=(f"kubespan.config={url}",),
                ),
            ]
        )
        yield SourcesLab(cluster, vms[0], vms[1], solo_config, vms[2], vms[3], url)


def test_invalid_config_is_reported_in_the_journal(sources: SourcesLab) -> None:
    """A node that cannot configure says why in its journal, and the service stays down
    (it is not restarted in a loop, since retrying a bad config cannot help)."""
    vm = sources.bad
    vm.wait_unit("kubespan.service", "failed")
    journal = vm.journal("kubespan")
    assert f"{FW_CFG_SOURCE}:5: machine.network.kubespan.enabld: unknown key" in journal
    assert (
        f"{FW_CFG_SOURCE}:6: machine.network.kubespan.mtu: must be at least 1280, not 1000"
        in journal
    )
    assert "no machine config: no source had a valid one" in journal
    assert "Traceback" not in journal
    assert vm.exec(["ip", "link", "show", "kubespan"]).exit_code != 0
    result = vm.exec(["systemctl", "show", "-p", "NRestarts", "--value", "kubespan"])
    assert result.stdout.strip() == "0"


def mount(vm: Vm, target: str) -> list[str]:
    """SOURCE FSTYPE OPTIONS of the file system mounted at `target`."""
    return vm.check(["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", target]).split()


def test_the_image_boots_read_only_with_its_extension_and_the_os_parts_kubespan_needs(
    sources: SourcesLab,
) -> None:
    vm = sources.solo
    vm.wait_unit("kubespan.service", "active")
    # Read-only erofs root; /var is the state disk, ext4 and writable.
    source, fstype, options = mount(vm, "/")
    assert (fstype, options.split(",")[0]) == ("erofs", "ro"), (source, fstype, options)
    source, fstype, options = mount(vm, "/var")
    assert (source, fstype, options.split(",")[0]) == ("/dev/vdb", "ext4", "rw")
    assert vm.exec(["touch", "/usr/lib/kubespan-write-test"]).exit_code != 0

    # The extension is merged and carries the service and the command.
    assert "kubespan" in vm.check(["systemd-sysext", "status"])
    assert vm.exec(["test", "-x", "/usr/bin/kubespan"]).exit_code == 0
    assert "agent" in vm.check(["kubespan", "--help"])
    # The machine config from fw_cfg is kept as the last good copy, readable by root only.
    config = vm.check(["stat", "-c", "%a", "/var/lib/kubespan/machineconfig.yaml"])
    assert config.strip() == "600"
    assert vm.check(["stat", "-c", "%a", "/var/lib/kubespan"]).strip() == "700"
    # systemd watches the reconcile loop.
    assert vm.check(["systemctl", "show", "-P", "WatchdogUSec", "kubespan"]).strip() == "1min"

    # https discovery needs a CA store the agent's TLS client verifies against.
    stats = "import ssl; print(ssl.create_default_context().cert_store_stats()['x509_ca'])"
    assert int(vm.check(["python3", "-c", stats])) > 50

    # Kernel WireGuard and nftables work.
    vm.check(["modprobe", "wireguard"])
    vm.check(["ip", "link", "add", "wgtest", "type", "wireguard"])
    vm.check(["ip", "link", "del", "wgtest"])
    vm.check(["nft", "list", "ruleset"])

    # Hostname and static address came from fw_cfg; the host side is reachable.
    assert vm.check(["hostname"]).strip() == "solo"
    assert str(sources.cluster.lan.address(31).ip) in vm.check(["ip", "-brief", "address"])
    fetch = f"import urllib.request as u; print(len(u.urlopen('{sources.url}').read()))"
    assert int(vm.check(["python3", "-c", fetch])) > 0


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


def test_last_good_config_survives_bad_and_missing_platform_config(sources: SourcesLab) -> None:
    vm, good = sources.solo, sources.solo_config
    ready(vm)
    key = public_key(vm)
    assert vm.check(["cat", "/var/lib/kubespan/machineconfig.yaml"]) == good
    assert f"machine config from {FW_CFG_SOURCE}" in vm.journal("kubespan")

    vm.set_fw_cfg("machineconfig", good.replace("mtu: 1400", "mtu: 9"))
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


def test_disable_then_enable_again(sources: SourcesLab) -> None:
    cluster, node1, node2, url = sources.cluster, sources.node1, sources.node2, sources.url
    wait_for_mesh([node1, node2])
    assert "machine config from config drive KUBESPAN:machineconfig.yaml" in node1.journal(
        "kubespan"
    )
    assert f"machine config from {url}" in node2.journal("kubespan")
    key = public_key(node1)

    off = cluster.config(enabled=False).encode()
    node1.check(["kubespan", "config", "apply", "-"], stdin=off)
    # Told by inotify at once: without it, the look the agent takes anyway is a minute away.
    wait_until(
        lambda: "machine config changed" in node1.journal("kubespan"),
        15,
        "node1's agent to see its config changed",
        interval=1.0,
    )
    wait_until(lambda: not kubespan_leftovers(node1), 60, "node1 to remove what it created")
    wait_until(
        lambda: (s := node_status(node2)) is not None and s["peers"] == [],
        60,
        "node2 to drop node1 (it left discovery)",
        interval=2.0,
    )
    assert node2.check(["wg", "show", "kubespan", "peers"]).strip() == ""
    assert "kubespan is disabled: removed link kubespan" in node1.journal("kubespan")

    # The live status says why the agent idles.
    idle = node1.exec(["kubespan", "status"])
    assert idle.exit_code == 1 and "kubespan is disabled" in idle.stdout, idle

    node1.check(["kubespan", "config", "apply", "-"], stdin=cluster.config().encode())
    wait_for_mesh([node1, node2])
    assert public_key(node1) == key
    for vm in (node1, node2):
        other = node2 if vm is node1 else node1
        vm.check(["ping", "-c", "2", "-W", "3", node_status(other)["node"]["ula"]])  # type: ignore[index]

    # Once the agent is stopped, nothing answers and status says so (exit 3).
    node1.check(["systemctl", "stop", "kubespan"])
    stopped = node1.exec(["kubespan", "status"])
    assert stopped.exit_code == 3 and "no agent answers" in stopped.stderr, stopped
