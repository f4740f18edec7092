"""The discovery service's container image (deploy/discovery/container/build.sh): built from
Debian packages without a container engine, its configuration checked with skopeo, and its
root file system run as the image's user (chroot on loopback: no engine runs here)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kubespan.crypto import ClusterKeys
from kubespan.discovery.client import DiscoveryClient
from kubespan.errors import DiscoveryError

pytestmark = pytest.mark.vm  # the image tier: slow, builds from Debian's registry

REPO = Path(__file__).resolve().parent.parent
TOOLS = ("mmdebstrap", "umoci", "skopeo")


@pytest.mark.skipif(os.geteuid() != 0, reason="building an image root needs root")
def test_the_image_builds_and_serves(tmp_path: Path) -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"missing host tools: {', '.join(missing)} (apt-get install them)")
    archive = tmp_path / "discovery.tar"
    subprocess.run(
        [str(REPO / "deploy/discovery/container/build.sh"), str(archive)],
        check=True,
        timeout=900,
        env={**os.environ, "PYTHON": str(REPO / ".venv/bin/python")},
    )
    config = json.loads(
        subprocess.run(
            ["skopeo", "inspect", "--config", f"oci-archive:{archive}:latest"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )["config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["/usr/bin/kubespan", "discovery", "serve"]
    assert "/var/lib/kubespan-discovery" in config["Volumes"]

    layout = tmp_path / "layout"
    layout.mkdir()
    subprocess.run(["tar", "-C", str(layout), "-xf", str(archive)], check=True)
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:latest", str(bundle)], check=True)
    rootfs = bundle / "rootfs"
    state = rootfs / "var/lib/kubespan-discovery"
    assert state.stat().st_uid == 65532

    port = 39000 + os.getpid() % 1000
    log = tmp_path / "service.log"
    with log.open("wb") as out:
        service = subprocess.Popen(
            [
                "chroot",
                "--userspec=65532:65532",
                str(rootfs),
                *config["Entrypoint"],
                "--listen",
                f"127.0.0.1:{port}",
                "--state-dir",
                "/var/lib/kubespan-discovery",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        client = DiscoveryClient(f"http://127.0.0.1:{port}", ClusterKeys.derive("c", bytes(32)))
        deadline = time.monotonic() + 30
        while True:
            try:
                client.put("a", b"sealed", [], 600)
                break
            except DiscoveryError:
                assert service.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        assert [a.id for a in client.listing().affiliates] == ["a"]
    finally:
        service.send_signal(signal.SIGTERM)
        status = service.wait(timeout=30)
    assert status == 0, log.read_text()
    assert (state / "discovery-state.json").stat().st_uid == 65532
    assert "stopped cleanly" in log.read_text()
