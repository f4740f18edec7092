"""A kubespan cluster in a lab: discovery on the host side, N nodes booted from the image,
and waits on the mesh that read each node's own `kubespan status`. Used by the VM tests and
by `make demo`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubespan.config.render import new_config_document, to_yaml

from kslab import Lab, NicSpec, Segment, Vm, VmSpec, cluster_identity, wait_until

DISCOVERY_PORT = 3000


def machine_config(
    discovery_url: str, cluster_id: str, secret: str, enabled: bool = True, **kubespan: Any
) -> str:
    document = new_config_document(discovery_url, cluster_id, secret)
    document["machine"]["network"]["kubespan"] = {"enabled": enabled, **kubespan}
    return to_yaml(document)


@dataclass
class Cluster:
    lab: Lab
    lan: Segment
    discovery_url: str
    cluster_id: str
    secret: str
    nodes: list[Vm] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def config(self, **kubespan: Any) -> str:
        return machine_config(self.discovery_url, self.cluster_id, self.secret, **kubespan)

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


def start_cluster(lab: Lab, kubespan_bin: Path, state_dir: Path) -> Cluster:
    """One LAN segment, the discovery service on its host side, a fresh cluster identity."""
    lan = lab.add_segment("lan")
    host = str(lan.gateway.ip)
    lab.spawn(
        "discovery",
        [
            str(kubespan_bin),
            "discovery",
            "serve",
            "--listen",
            f"{host}:{DISCOVERY_PORT}",
            "--state-dir",
            str(state_dir),
        ],
    )
    lab.wait_tcp(host, DISCOVERY_PORT)
    cluster_id, secret = cluster_identity()
    return Cluster(lab, lan, f"http://{host}:{DISCOVERY_PORT}", cluster_id, secret)


def node_status(vm: Vm) -> dict[str, Any] | None:
    """The node's `kubespan status --json`, or None while the agent has not published one."""
    result = vm.exec(["kubespan", "status", "--json"], timeout=60)
    if result.exit_code != 0:
        return None
    document: dict[str, Any] = json.loads(result.stdout)
    return document


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
