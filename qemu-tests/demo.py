"""`make demo`: a local kubespan cluster on the embedded defaults.

Starts the discovery service, boots N nodes from the image in an isolated network namespace,
waits until every node reports every other node up, prints each node's `kubespan status`,
then shuts everything down.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from kslab import ArtefactMissingError, Lab, LabError, find_image
from mesh import start_cluster, wait_for_mesh

REPO = Path(__file__).resolve().parent.parent


def say(started: float, message: str) -> None:
    print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)


def run(nodes: int, workdir: Path) -> int:
    started = time.monotonic()
    image = find_image(REPO)
    with Lab(workdir / "lab", image) as lab:
        try:
            cluster = start_cluster(lab, REPO / ".venv" / "bin" / "kubespan", workdir / "discovery")
            say(started, f"discovery service at {cluster.discovery_url} (host side of the lab)")
            say(started, f"booting {nodes} nodes under QEMU (software emulation)...")
            vms = cluster.boot(nodes)
            say(started, "all nodes booted; waiting for the mesh...")
            wait_for_mesh(vms)
            say(started, f"full mesh: every node sees {nodes - 1} peers up")
            for vm in vms:
                print(f"\n$ {vm.name}: kubespan status")
                print(vm.check(["kubespan", "status"]).rstrip())
            # A self-diagnosis of one node (exit 1 would mean it found an error: shown too).
            print(f"\n$ {vms[0].name}: kubespan check")
            checked = vms[0].exec(["kubespan", "check"])
            print((checked.stdout + checked.stderr).rstrip())
            print()
            say(started, "shutting down")
            for vm in vms:
                vm.poweroff()
        except (LabError, AssertionError) as error:
            print(f"\ndemo failed: {error}\n", file=sys.stderr)
            print(lab.diagnostics(), file=sys.stderr)
            return 1
    say(started, "done")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the demo needs root (network namespaces and taps)", file=sys.stderr)
        return 1
    try:
        with tempfile.TemporaryDirectory(prefix="kubespan-demo-") as tmp:
            return run(args.nodes, Path(tmp))
    except ArtefactMissingError as error:
        print(error, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
