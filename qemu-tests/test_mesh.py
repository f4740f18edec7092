"""The walking skeleton, end to end on real kernels and real platforms' ways of booting: four
nodes given one flag mesh over kernel WireGuard through the discovery service, and reach each
other's ULA through the tunnel.

- node1, node2 and node3 take their machine config from a cloud's metadata service (EC2 with
  IMDSv2 session tokens, GCE, Azure; emulated in the lab at 169.254.169.254 by
  kslab/metadata.py, each answering one node in its documented format only), recognised
  from their SMBIOS;
- node4 boots the disk image (`make disk-image`) under UEFI firmware (OVMF): systemd-boot,
  the unified kernel image, the erofs root under dm-verity, the state partition made at
  first boot to fill the disk; its config comes from a NoCloud `cidata` ISO 9660 volume;
- node5 is a plain Debian 12 host (`make plain-image`: Debian's packages, nothing of ours)
  that installs the Debian package (`make deb`) with dpkg and runs from
  /etc/kubespan/machineconfig.yaml; the last test purges the package and finds none of
  kubespan's kernel objects left.

One lab serves the four tests, which keeps the VM suite's time down."""

from __future__ import annotations

import ipaddress
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kslab import Image, Lab, NicSpec, Vm, VmSpec, find_plain_image, static_network, wait_until
from kslab.metadata import METADATA_ADDRESS, PLATFORMS, SMBIOS, read_log
from mesh import Cluster, node_status, shared_cluster, wait_for_mesh, wait_for_passes

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parent.parent
DISK_MIB = 1024
# What kubespan calls each platform in its journal (config/platforms.py).
PLATFORM_NAMES = {"ec2": "EC2", "gce": "GCE", "azure": "Azure"}


@dataclass
class MeshLab:
    lab: Lab
    cluster: Cluster
    clouds: list[Vm]  # node1 EC2, node2 GCE, node3 Azure
    disk: Vm  # node4, the disk image
    host: Vm  # node5, plain Debian with the Debian package
    statuses: dict[str, dict[str, Any]]
    metadata_log: Path
    figures: dict[str, float]

    @property
    def nodes(self) -> list[Vm]:
        return [*self.clouds, self.disk, self.host]


def serve_metadata(cluster: Cluster, directory: Path) -> Path:
    """The metadata services, each for one node (node1 EC2, node2 GCE, node3 Azure), all
    handing out the cluster's machine config as user data; returns their request log."""
    lab, lan = cluster.lab, cluster.lan
    lab.run(["ip", "address", "add", f"{METADATA_ADDRESS}/32", "dev", lan.bridge])
    user_data = directory / "user-data"
    user_data.write_text(cluster.config())
    log = directory / "metadata.jsonl"
    clients = [f"{lan.address(11 + i).ip}={p}" for i, p in enumerate(PLATFORMS)]
    script = Path(__file__).parent / "kslab" / "metadata.py"
    argv = [sys.executable, str(script), METADATA_ADDRESS, str(user_data), str(log), *clients]
    lab.spawn("metadata", argv)
    lab.wait_tcp(METADATA_ADDRESS, 80)
    return log


def cloud_node(cluster: Cluster, index: int, platform: str) -> VmSpec:
    """A node with no machine config in fw_cfg: only its platform's metadata has one."""
    lan = cluster.lan
    nic = NicSpec("lan", (lan.address(11 + index), lan.address6(11 + index)), (lan.gateway.ip,))
    return VmSpec(f"node{index + 1}", nics=(nic,), smbios=SMBIOS[platform])


def disk_node(cluster: Cluster) -> VmSpec:
    lan = cluster.lan
    user_data = "#cloud-config\n" + cluster.config()
    return VmSpec(
        "node4",
        nics=(NicSpec("lan", (lan.address(14), lan.address6(14))),),
        disk_image=True,
        disk_mib=DISK_MIB,
        nocloud=(("user-data", user_data), ("meta-data", "instance-id: node4\n")),
    )


def debian_package() -> Path:
    packages = sorted((REPO / "build" / "deb").glob("kubespan_*_amd64.deb"))
    assert len(packages) == 1, f"expected one package from `make deb`, found {packages}"
    return packages[0]


def host_node(cluster: Cluster, package: Path) -> VmSpec:
    """Plain Debian: no platform data it would read; the package comes on a disk."""
    return VmSpec(
        "node5",
        nics=(NicSpec("lan"),),
        image=find_plain_image(REPO),
        files=((package, "kubespan-deb"),),
    )


def install_package(vm: Vm, cluster: Cluster, package: Path) -> None:
    """What an operator does on an existing host: network and hostname are the host's own;
    then install the package, write the config, start the service."""
    lan = cluster.lan
    network = static_network(vm.nics[0].mac, (lan.address(15), lan.address6(15)))
    vm.write_file("/etc/systemd/network/10-lan.network", network.encode())
    vm.check(["networkctl", "reload"])
    vm.check(["hostnamectl", "hostname", vm.name])
    size = package.stat().st_size
    vm.check(["sh", "-c", f"head -c {size} /dev/disk/by-id/virtio-kubespan-deb > /root/k.deb"])
    installed = vm.check(["dpkg", "-i", "/root/k.deb"], timeout=300)
    assert "/etc/kubespan/machineconfig.yaml" in installed, installed  # what to write next
    vm.write_file("/etc/kubespan/machineconfig.yaml", cluster.config().encode(), mode="0600")
    vm.check(["systemctl", "start", "kubespan"], timeout=300)


def ready(vm: Vm) -> bool:
    return (node_status(vm) or {}).get("ready") is True


@pytest.fixture(scope="module")
def mesh(
    image: Image, kubespan_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MeshLab]:
    image.require_disk()
    package = debian_package()
    directory = tmp_path_factory.mktemp("meshlab")
    with shared_cluster(image, kubespan_bin, directory) as cluster:
        lab = cluster.lab
        metadata_log = serve_metadata(cluster, directory)
        started = time.monotonic()
        disk = lab.add_vm(disk_node(cluster))
        disk.start()  # first: the firmware takes longest
        clouds = lab.boot_all(
            [
                *(cloud_node(cluster, i, p) for i, p in enumerate(PLATFORMS)),
                host_node(cluster, package),
            ]
        )
        host = clouds.pop()
        disk.wait_agent(360)
        booted = time.monotonic()
        wait_until(lambda: ready(disk), 300, "node4 (disk image) ready", 1.0)
        disk_ready = time.monotonic()
        install_package(host, cluster, package)
        cluster.nodes.extend([*clouds, disk, host])
        statuses = wait_for_mesh([*clouds, disk, host])
        meshed = time.monotonic()
        figures = {
            "vm_boot_s": booted - started,
            "mesh_after_start_s": meshed - started,
            "mesh_after_agents_s": meshed - booted,
            "disk_image_firmware_to_ready_s": disk_ready - started,
        }
        yield MeshLab(lab, cluster, clouds, disk, host, statuses, metadata_log, figures)


def wg_peers(dump: str) -> list[list[str]]:
    """Peer lines of `wg show kubespan dump` (the first line is the device)."""
    return [line.split("\t") for line in dump.strip().splitlines()[1:]]


def test_each_cloud_node_took_its_config_from_its_platforms_metadata(mesh: MeshLab) -> None:
    requests = read_log(mesh.metadata_log)
    for vm, platform in zip(mesh.clouds, PLATFORMS, strict=True):
        address = mesh.cluster.node_address(vm)
        mine = [r for r in requests if r["client"] == address]
        asked = [(r["method"], r["path"], r["status"]) for r in mine]
        assert all(r["platform"] == platform for r in mine)
        assert any(status == 200 for _, _, status in asked), (vm.name, asked)
        if platform == "ec2":
            assert asked[0] == ("PUT", "/latest/api/token", 200), asked
        journal = vm.journal("kubespan")
        name = PLATFORM_NAMES[platform]
        assert f"platform from DMI: {name}" in journal, journal[-3000:]
        assert f"machine config from {name} user data" in journal, journal[-3000:]
        assert "Traceback" not in journal
    # The other nodes have no DMI of a cloud: they asked no metadata service.
    for vm in (mesh.disk, mesh.host):
        address = mesh.cluster.node_address(vm)
        assert not [r for r in requests if r["client"] == address], vm.name


def test_the_disk_image_boots_under_uefi_with_a_verified_root_and_a_state_partition(
    mesh: MeshLab, capsys: pytest.CaptureFixture[str]
) -> None:
    vm = mesh.disk
    # Booted by UEFI firmware, through systemd-boot and the unified kernel image.
    assert vm.exec(["test", "-d", "/sys/firmware/efi"]).exit_code == 0
    cmdline = vm.check(["cat", "/proc/cmdline"])
    assert "roothash=" in cmdline and "root=/dev/mapper/root" in cmdline, cmdline

    # The root is the verity device, verified, read-only erofs.
    verity = vm.check(["veritysetup", "status", "root"])
    assert re.search(r"type:\s+VERITY", verity) and re.search(r"status:\s+verified", verity)
    mounted = vm.check(["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "/"]).split()
    assert (mounted[0], mounted[1], mounted[2].split(",")[0]) == (
        "/dev/mapper/root",
        "erofs",
        "ro",
    )

    # The kernel enforces it: one byte changed on the root partition, in the last block the
    # hash tree covers, makes that block unreadable through /dev/mapper/root (an I/O error and
    # dm-verity's complaint); with the byte put back it reads again.
    data = re.search(r"data device:\s+(\S+)", verity)
    size = re.search(r"\bsize:\s+(\d+) sectors", verity)
    assert data and size, verity
    block = int(size.group(1)) // 8 - 1
    tamper = f"""set -eu
at="bs=4096 count=1 status=none"
dd if={data.group(1)} of=/run/block.orig $at skip={block} iflag=direct
flip="import sys; b = bytearray(sys.stdin.buffer.read()); b[0] ^= 0xFF; sys.stdout.buffer.write(b)"
python3 -c "$flip" </run/block.orig >/run/block.bad
dd if=/run/block.bad of={data.group(1)} $at seek={block} oflag=direct conv=notrunc,fsync
if dd if=/dev/mapper/root of=/dev/null $at skip={block} iflag=direct; then echo tampered-read
else echo tampered-refused; fi
dd if=/run/block.orig of={data.group(1)} $at seek={block} oflag=direct conv=notrunc,fsync
dd if=/dev/mapper/root of=/dev/null $at skip={block} iflag=direct && echo restored-read
"""
    outcome = vm.exec(["sh", "-c", tamper])
    assert outcome.stdout.split() == ["tampered-refused", "restored-read"], outcome
    kernel = vm.check(["dmesg"])
    assert re.search(r"device-mapper: verity.*data block \d+ is corrupted", kernel), kernel[-2000:]

    # The state partition was made at first boot and reaches the end of the disk (the
    # backup GPT takes the last 33 sectors; partitions are aligned to 1 MiB).
    def sectors(path: str) -> int:
        return int(vm.check(["cat", path]).strip())

    disk_sectors = sectors("/sys/class/block/vda/size")
    assert disk_sectors == DISK_MIB * 2048
    state = vm.check(["readlink", "-f", "/dev/disk/by-partlabel/kubespan-state"]).strip()
    name = state.removeprefix("/dev/")
    start = sectors(f"/sys/class/block/{name}/start")
    end = start + sectors(f"/sys/class/block/{name}/size")
    assert disk_sectors - end <= 2048 + 33, (disk_sectors, end)
    assert vm.check(["findmnt", "-n", "-o", "SOURCE", "/var"]).strip() == state
    var_bytes = int(vm.check(["df", "--output=size", "-B1", "/var"]).split()[-1])
    assert var_bytes > 0.85 * (end - start) * 512, (var_bytes, end - start)

    # The config came from the NoCloud volume and was kept as the last good copy.
    journal = vm.journal("kubespan")
    assert "machine config from NoCloud drive cidata" in journal, journal[-3000:]
    assert "Traceback" not in journal
    with capsys.disabled():
        figure = mesh.figures["disk_image_firmware_to_ready_s"]
        print(f"\ndisk_image_firmware_to_ready_s={figure:.1f}")


def test_five_nodes_mesh_and_ping_over_the_tunnel(
    mesh: MeshLab, capsys: pytest.CaptureFixture[str]
) -> None:
    statuses, nodes = mesh.statuses, mesh.nodes
    ulas = {name: status["node"]["ula"] for name, status in statuses.items()}
    keys = {name: status["node"]["public_key"] for name, status in statuses.items()}
    prefix = ipaddress.IPv6Network(f"{ulas['node1']}/64", strict=False)
    assert len(set(ulas.values())) == len(nodes)
    assert all(ipaddress.IPv6Address(u) in prefix for u in ulas.values())

    for vm in nodes:
        status = statuses[vm.name]
        assert {p["name"] for p in status["peers"]} == set(statuses) - {vm.name}

        # The kernel agrees: a peer for each other node, each with a recent handshake and
        # the agreed keys.
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
        print("\n" + " ".join(f"{k}={v:.1f}" for k, v in mesh.figures.items()))


def test_the_package_runs_on_plain_debian_and_its_purge_leaves_nothing_of_ours(
    mesh: MeshLab,
) -> None:
    """Last in this module: it takes node5 out of the mesh."""
    vm = mesh.host
    assert vm.exec(["test", "-e", "/usr/lib/extensions/kubespan.raw"]).exit_code != 0
    assert "install ok installed" in vm.check(["dpkg-query", "-W", "-f=${Status}", "kubespan"])
    assert vm.check(["systemctl", "is-enabled", "kubespan"]).strip() == "enabled"
    journal = vm.journal("kubespan")
    assert "machine config from /etc/kubespan/machineconfig.yaml" in journal, journal[-3000:]
    assert "Traceback" not in journal

    vm.check(["dpkg", "--purge", "kubespan"], timeout=300)
    assert vm.exec(["ip", "link", "show", "kubespan"]).exit_code != 0
    assert vm.exec(["nft", "list", "table", "inet", "kubespan"]).exit_code != 0
    for family in ("-4", "-6"):
        assert "lookup 180" not in vm.check(["ip", family, "rule", "show"])
        assert vm.check(["ip", family, "route", "show", "table", "180"]).strip() == ""
    assert vm.exec(["test", "-e", "/var/lib/kubespan"]).exit_code != 0
    assert vm.exec(["systemctl", "cat", "kubespan"]).exit_code != 0
