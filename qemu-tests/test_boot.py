"""Smoke test of the image: one VM boots with a machine config from the platform, and the
OS pieces kubespan relies on are in place. (That /var survives a reboot is shown where a
reboot is needed anyway: test_config_sources.py keeps the last good config across one,
test_membership.py the peer cache.)"""

import sys
from pathlib import Path

import pytest
import yaml

from kslab import Lab, NicSpec, Vm, VmSpec, cluster_identity

pytestmark = pytest.mark.vm


def machine_config(discovery_endpoint: str) -> str:
    cluster_id, secret = cluster_identity()
    return yaml.safe_dump(
        {
            "machine": {"network": {"kubespan": {"enabled": False}}},
            "cluster": {
                "id": cluster_id,
                "secret": secret,
                "discovery": {
                    "enabled": True,
                    "registries": {"service": {"endpoint": discovery_endpoint}},
                },
            },
        }
    )


def mount(vm: Vm, target: str) -> list[str]:
    """SOURCE FSTYPE OPTIONS of the file system mounted at `target`."""
    return vm.check(["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", target]).split()


def test_boot(lab: Lab, tmp_path: Path) -> None:
    lan = lab.add_segment("lan")
    address, address6 = lan.address(11), lan.address6(11)

    # A host-side server inside the lab namespace, reached by the guest over the bridge.
    site = tmp_path / "site"
    site.mkdir()
    (site / "hello.txt").write_text("hello from the host side\n")
    server = str(lan.gateway.ip)
    lab.spawn("http", [sys.executable, "-m", "http.server", "--bind", server, "3000"], cwd=site)
    lab.wait_tcp(server, 3000)

    vm = lab.boot(
        VmSpec(
            "node1",
            nics=(NicSpec("lan", (address, address6)),),
            machineconfig=machine_config(f"http://{server}:3000"),
        )
    )
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

    # https discovery needs a CA store the agent's TLS client verifies against.
    stats = "import ssl; print(ssl.create_default_context().cert_store_stats()['x509_ca'])"
    assert int(vm.check(["python3", "-c", stats])) > 50

    # Kernel WireGuard and nftables work.
    vm.check(["modprobe", "wireguard"])
    vm.check(["ip", "link", "add", "wgtest", "type", "wireguard"])
    vm.check(["ip", "link", "del", "wgtest"])
    vm.check(["nft", "list", "ruleset"])

    # Hostname and static addresses came from fw_cfg; the host side is reachable.
    assert vm.check(["hostname"]).strip() == "node1"
    addresses = vm.check(["ip", "-brief", "address"])
    assert str(address) in addresses
    assert str(address6) in addresses
    fetch = f"import urllib.request as u; print(u.urlopen('http://{server}:3000/hello.txt').read())"
    assert "hello from the host side" in vm.check(["python3", "-c", fetch])

    # The live status says why the agent idles; systemd watches the loop; once the agent is
    # stopped, nothing answers and status says so (exit 3).
    idle = vm.exec(["kubespan", "status"])
    assert idle.exit_code == 1 and "kubespan is disabled" in idle.stdout, idle
    assert vm.check(["systemctl", "show", "-P", "WatchdogUSec", "kubespan"]).strip() == "1min"
    vm.check(["systemctl", "stop", "kubespan"])
    stopped = vm.exec(["kubespan", "status"])
    assert stopped.exit_code == 3 and "no agent answers" in stopped.stderr, stopped

    assert vm.check(["stat", "-c", "%a", "/var/lib/kubespan"]).strip() == "700"
