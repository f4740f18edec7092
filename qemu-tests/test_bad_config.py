"""A node that cannot configure says why in its journal, and the service stays down (it is
not restarted in a loop, since retrying a bad config cannot help)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kslab import Lab, NicSpec, VmSpec
from mesh import start_cluster

pytestmark = pytest.mark.vm


def test_invalid_config_is_reported_in_the_journal(
    lab: Lab, kubespan_bin: Path, tmp_path: Path
) -> None:
    cluster = start_cluster(lab, kubespan_bin, tmp_path / "discovery")
    bad = cluster.config(mtu=1000).replace("enabled: true", "enabld: true", 1)
    vm = lab.boot(
        VmSpec("bad1", nics=(NicSpec("lan", (cluster.lan.address(21),)),), machineconfig=bad)
    )
    vm.wait_unit("kubespan.service", "failed")
    journal = vm.journal("kubespan")
    config = "fw_cfg:opt/org.kubespan/machineconfig"
    assert f"{config}:5: machine.network.kubespan.enabld: unknown key" in journal
    assert f"{config}:6: machine.network.kubespan.mtu: must be at least 1280, not 1000" in journal
    assert "no machine config: no source had a valid one" in journal
    assert "Traceback" not in journal
    assert vm.exec(["ip", "link", "show", "kubespan"]).exit_code != 0
    result = vm.exec(["systemctl", "show", "-p", "NRestarts", "--value", "kubespan"])
    assert result.stdout.strip() == "0"
