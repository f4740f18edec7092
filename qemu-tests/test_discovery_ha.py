"""High availability: two independent discovery services, every node registered with both.
One service is killed; a new node still joins through the other and the mesh stays whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubespan.config.render import new_config_document, to_yaml

from kslab import Lab, NicSpec, VmSpec, cluster_identity
from mesh import wait_for_mesh

pytestmark = pytest.mark.vm


def test_a_node_joins_while_one_service_is_down(
    lab: Lab, kubespan_bin: Path, tmp_path: Path
) -> None:
    lan = lab.add_segment("lan")
    host = str(lan.gateway.ip)
    urls = []
    for index, port in enumerate((3000, 3001)):
        name = f"discovery{index + 1}"
        lab.spawn(
            name,
            [
                str(kubespan_bin),
                "discovery",
                "serve",
                "--listen",
                f"{host}:{port}",
                "--state-dir",
                str(tmp_path / name),
            ],
        )
        lab.wait_tcp(host, port)
        urls.append(f"http://{host}:{port}")
    cluster_id, secret = cluster_identity()
    document = new_config_document(urls[0], cluster_id, secret)
    document["cluster"]["discovery"]["registries"]["service"] = {"endpoints": urls}
    config = to_yaml(document)

    def spec(number: int) -> VmSpec:
        host_index = 10 + number
        addresses = (lan.address(host_index), lan.address6(host_index))
        return VmSpec(f"node{number}", nics=(NicSpec("lan", addresses),), machineconfig=config)

    first = lab.boot_all([spec(1), spec(2)])
    wait_for_mesh(first)

    lab.processes["discovery1"].stop(timeout=0)  # SIGTERM then at once SIGKILL: it is gone
    late = lab.boot(spec(3))
    statuses = wait_for_mesh([*first, late])
    for name, status in statuses.items():
        assert len(status["peers"]) == 2, (name, status["peers"])
