"""`make bench-mesh`: boot the mesh and NAT scenarios and print their times as `name=value`
lines (seconds), one lab at a time:

    mesh_full_s_3, mesh_full_s_5  all nodes on one flat LAN, from the last agent's start to
                                  every pair up (each side's own report)
    nat_site_s, nat_to_nat_s, rotation_s, dead_path_s, roaming_s   the NAT lab (natlab.py)
    relay_up_s                    a symmetric NAT's pairs with filtering NATs, relayed: from
                                  the agents' start to the relayed pairs up
    relay_nearer_s                the relay in use slowed by 150 ms on one side: to the pair
                                  up through the other (relays ranked by round trip)
    relay_throughput_ratio        TCP through a relay over the same pair's direct tunnel
                                  routed through the relay's VM (the same VMs busy)
    relay_throughput_ratio_two_vms  the same over the direct tunnel as the lab routes it
                                  (two VMs busy, not three, on the host's two cores)
    relay_failover_s              the relay in use killed: to the ping answered again
    ipv6_mesh_s                   the IPv6-only underlay (with --ipv6)

Times are read from the guests' journals, mapped onto the host's clock, so boot time and
polling latency are not counted. A scenario that fails prints `name=fail` and its reason on
stderr; the others still run. Exit status 1 if any failed. Needs root and `make image`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from natlab import (
    BlockedSites,
    Clocks,
    NatLab,
    boot_flat,
    build_nat_lab,
    build_v6_lab,
    flat_mesh_time,
    scenario_blocked_sites,
    scenario_dead_path,
    scenario_ipv6_only,
    scenario_nat_site,
    scenario_nat_to_nat,
    scenario_nearer_relay,
    scenario_relay_failover,
    scenario_relayed,
    scenario_roaming,
    scenario_rotation,
)

from kslab import Lab, LabError, Vm, find_image

REPO = Path(__file__).resolve().parent.parent
KUBESPAN = REPO / ".venv" / "bin" / "kubespan"


class Bench:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def measure(self, name: str, run: Callable[[], float]) -> None:
        try:
            value = run()
        except (AssertionError, LabError) as e:
            self.failed.append(name)
            print(f"{name}=fail", flush=True)
            print(f"{name}: {e}", file=sys.stderr, flush=True)
            return
        shown = f"{value:.2f}" if name.endswith("_ratio") else f"{value:.1f}"
        print(f"{name}={shown}", flush=True)


def flat(bench: Bench, workdir: Path, count: int) -> None:
    with Lab(workdir / f"flat{count}", find_image(REPO)) as lab:
        state = workdir / f"flat{count}-discovery"
        vms = boot_flat(lab, KUBESPAN, state, count)
        clocks = Clocks()
        bench.measure(f"mesh_full_s_{count}", lambda: flat_mesh_time(vms, clocks))
        keep_journals({vm.name: vm for vm in vms}, clocks, workdir / f"flat{count}-journals")


def nat(bench: Bench, workdir: Path) -> None:
    with Lab(workdir / "nat", find_image(REPO)) as lab:
        shared: NatLab = build_nat_lab(lab, KUBESPAN, workdir / "nat-discovery")
        bench.measure("nat_site_s", lambda: scenario_nat_site(shared))
        bench.measure("nat_to_nat_s", lambda: scenario_nat_to_nat(shared))
        bench.measure("rotation_s", lambda: scenario_rotation(shared))
        bench.measure("dead_path_s", lambda: scenario_dead_path(shared))
        bench.measure("relay_up_s", lambda: scenario_relayed(shared))
        bench.measure("relay_nearer_s", lambda: scenario_nearer_relay(shared))
        blocked: list[BlockedSites] = []

        def blocked_sites() -> float:
            blocked.append(scenario_blocked_sites(shared))
            return blocked[-1].throughput_ratio

        bench.measure("relay_throughput_ratio", blocked_sites)
        if blocked:
            two_vms = blocked[-1].throughput_ratio_two_vms
            bench.measure("relay_throughput_ratio_two_vms", lambda: two_vms)
        bench.measure("roaming_s", lambda: scenario_roaming(shared))
        bench.measure("relay_failover_s", lambda: scenario_relay_failover(shared))
        keep_journals(shared.vms, shared.clocks, workdir / "nat-journals")


def keep_journals(vms: Mapping[str, Vm], clocks: Clocks, directory: Path) -> None:
    """Each guest's agent journal, stamped in host time, for reading where time went."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, vm in vms.items():
        lines = [
            f"{entry.at:.3f} {entry.message}" for entry in clocks.journal(vm, "kubespan.service")
        ]
        (directory / f"{name}.log").write_text("\n".join(lines) + "\n")


def ipv6(bench: Bench, workdir: Path) -> None:
    with Lab(workdir / "ipv6", find_image(REPO)) as lab:
        six = build_v6_lab(lab, KUBESPAN, workdir / "ipv6-discovery")
        bench.measure("ipv6_mesh_s", lambda: scenario_ipv6_only(six))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("flat", "nat", "ipv6"), action="append")
    parser.add_argument("--ipv6", action="store_true", help="also the IPv6-only underlay")
    parser.add_argument("--workdir", type=Path, help="keep logs here (default: a temp dir)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench-mesh needs root (network namespaces, taps)", file=sys.stderr)
        return 2
    parts = args.only or ["flat", "nat", *(["ipv6"] if args.ipv6 else [])]
    bench = Bench()
    with tempfile.TemporaryDirectory(prefix="bench-mesh-") as tmp:
        workdir = args.workdir or Path(tmp)
        if "flat" in parts:
            flat(bench, workdir, 3)
            flat(bench, workdir, 5)
        if "nat" in parts:
            nat(bench, workdir)
        if "ipv6" in parts:
            ipv6(bench, workdir)
    if bench.failed:
        print(f"failed: {' '.join(bench.failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
