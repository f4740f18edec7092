"""The discovery service deployed as its hardened systemd unit (kubespan-discovery.service,
shipped in the extension) on the real image: it starts as a dynamic user, keeps its state
across a restart and a kill -9, stops cleanly, and answers members from another machine."""

from __future__ import annotations

import json
import re
import textwrap
import time
from pathlib import Path

import pytest

from kslab import Lab, NicSpec, Vm, VmSpec, cluster_identity, wait_until
from mesh import machine_config

pytestmark = pytest.mark.vm

UNIT = "kubespan-discovery.service"
STATE = "/var/lib/private/kubespan-discovery"


def client(vm: Vm, url: str, script: str) -> str:
    """Run `script` with the extension's kubespan package (a client) inside the guest."""
    prelude = textwrap.dedent(
        f"""
        import sys, os, json
        sys.path.insert(0, "/usr/lib/kubespan/site-packages")
        from kubespan.crypto import ClusterKeys
        from kubespan.discovery.client import DiscoveryClient
        keys = ClusterKeys.derive("lab-cluster", bytes(32))
        client = DiscoveryClient({url!r}, keys)
        """
    )
    return vm.check(["python3", "-c", prelude + textwrap.dedent(script)])


def members(vm: Vm, url: str) -> list[str]:
    out = client(vm, url, "print(json.dumps([a.id for a in client.listing().affiliates]))")
    listed: list[str] = json.loads(out)
    return listed


def main_pid(vm: Vm) -> int:
    return int(vm.check(["systemctl", "show", "-p", "MainPID", "--value", UNIT]).strip())


def test_the_unit_runs_hardened_and_keeps_state(lab: Lab, tmp_path: Path) -> None:
    lan = lab.add_segment("lan")
    address = lan.address(11)
    cluster_id, secret = cluster_identity()
    vm = lab.boot(
        VmSpec(
            "disco",
            nics=(NicSpec("lan", (address,)),),
            # A node config with kubespan off: the image's agent idles, the service runs.
            machineconfig=machine_config("http://192.0.2.1:3000", cluster_id, secret, False),
        )
    )
    host = str(address.ip)
    url = f"http://{host}:3000"
    # /etc is read-only in this image: configure the unit with a runtime drop-in, as an
    # operator would with /etc/kubespan/discovery.env.
    vm.check(["mkdir", "-p", "/run/systemd/system/kubespan-discovery.service.d"])
    vm.write_file(
        "/run/systemd/system/kubespan-discovery.service.d/lab.conf",
        (
            "[Service]\n"
            'Environment="KUBESPAN_DISCOVERY_ARGS=--listen 0.0.0.0:3000 '
            f"--public-url {url} --metrics-listen 127.0.0.1:9091 "
            '--snapshot-interval 1"\n'
        ).encode(),
    )
    vm.check(["systemctl", "daemon-reload"])
    vm.check(["systemctl", "start", UNIT])
    vm.wait_unit(UNIT, "active")

    # A dynamic, unprivileged user; descriptors raised; nothing writable but the state.
    pid = main_pid(vm)
    status = vm.check(["cat", f"/proc/{pid}/status"])
    uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    assert uid >= 61184, f"not a dynamic user: uid {uid}"
    limits = vm.check(["cat", f"/proc/{pid}/limits"])
    assert re.search(r"Max open files\s+65536\s+65536", limits), limits
    assert "CapEff:\t0000000000000000" in status
    # In the service's own view of the file system /var is read-only (ProtectSystem=strict),
    # even for root, but for its state directory; outside that view /var is writable.
    enter = ["nsenter", "-t", str(pid), "-m", "--"]
    probe = "/var/lib/probe"
    assert vm.exec(["touch", probe]).exit_code == 0
    assert vm.exec([*enter, "touch", probe + "2"]).exit_code != 0
    assert vm.exec([*enter, "touch", f"{STATE}/probe"]).exit_code == 0
    vm.check(["rm", f"{STATE}/probe"])

    client(vm, url, "client.put('alpha', b'sealed-a', [], 3600); print('ok')")
    assert members(vm, url) == ["alpha"]
    health = vm.check(["python3", "-c", _GET.format(url="http://127.0.0.1:9091/healthz")])
    assert json.loads(health) == {"status": "ok"}

    # A clean restart: SIGTERM, snapshot, exit 0; the same members afterwards.
    vm.check(["systemctl", "restart", UNIT])
    vm.wait_unit(UNIT, "active")
    assert members(vm, url) == ["alpha"]
    mode = vm.check(["stat", "-c", "%a %u", f"{STATE}/discovery-state.json"]).split()
    assert mode[0] == "600"

    # kill -9: systemd restarts it and the last snapshot (at most a second old) is back.
    client(vm, url, "client.put('beta', b'sealed-b', [], 3600); print('ok')")
    time.sleep(2.5)  # the snapshot interval is 1 s; the test asserts on what it wrote
    before = main_pid(vm)
    vm.check(["systemctl", "kill", "-s", "KILL", UNIT])
    wait_until(
        lambda: vm.unit_state(UNIT) == "active" and main_pid(vm) not in (0, before),
        120,
        "the unit to be restarted after kill -9",
    )
    wait_until(lambda: _answers(vm, url), 60, "the restarted service to answer")
    assert members(vm, url) == ["alpha", "beta"]

    vm.check(["systemctl", "stop", UNIT])
    result = vm.check(["systemctl", "show", "-p", "Result,ExecMainStatus", UNIT])
    assert "Result=success" in result and "ExecMainStatus=0" in result
    journal = vm.journal(UNIT)
    assert "Traceback" not in journal
    assert journal.count("stopped cleanly") == 2
    assert "unclean start" in journal


_GET = "import urllib.request; print(urllib.request.urlopen({url!r}, timeout=10).read().decode())"


def _answers(vm: Vm, url: str) -> bool:
    return vm.exec(["python3", "-c", _GET.format(url=url + "/openapi.json")]).exit_code == 0
