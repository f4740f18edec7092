"""Where an idle agent spends its time, in a VM: node1's agent restarted with every thread
under cProfile (profile_runner.py) on the bench-idle lab (three nodes, optionally the 98 fake
peers), profiled for a window, then stopped so that the profiles are written; each thread's
total and the top functions of all threads are printed.

Times are each thread's CPU time. Not a benchmark (cProfile slows every call it sees): a tool
for finding what to make cheaper. Run as root:

    .venv/bin/python qemu-tests/profile_idle.py [--fakes | --live] [--window 90] [--sort tottime]

--live: the fakes made live as in bench-idle's last phase (a fourth VM plays them).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench_idle import (
    AGENT_UNIT,
    FAKE_PEERS,
    FAKES_HOST,
    METRICS_LISTEN,
    NODES,
    REPO,
    SETTLE_2_S,
    _interrupt,
    add_fakes,
    all_up,
    make_fakes_live,
    passes,
    start_fakes_vm,
    wait_for_passes,
    wait_for_peers,
    wait_reported,
)

from kslab import Lab, LabError, find_image
from mesh import start_cluster, wait_for_mesh

KUBESPAN = REPO / ".venv" / "bin" / "kubespan"
# In the unit's StateDirectory: ProtectSystem=strict leaves little else writable, and the
# RuntimeDirectory goes when the unit stops, before the file could be read.
PROFILES = "/var/lib/kubespan/profiles"
RUNNER_AT = "/var/lib/kubespan/profile_runner.py"
RUNNER = Path(__file__).with_name("profile_runner.py")
DROP_IN = f"/run/systemd/system/{AGENT_UNIT}.service.d/profile.conf"


def profile(window: float, fakes: str, sort: str, lines: int, workdir: Path) -> None:
    """`fakes`: "" (none), "dead" or "live"."""
    with Lab(workdir / "lab", find_image(REPO)) as lab:
        state = workdir / "discovery-state"
        state.mkdir(parents=True)
        cluster = start_cluster(lab, KUBESPAN, state)
        fakes_vm = start_fakes_vm(cluster) if fakes == "live" else None
        vms = cluster.boot(NODES, metricsListen=METRICS_LISTEN)
        node1 = vms[0]
        wait_for_mesh(vms, timeout=480)
        if fakes_vm is not None:
            fakes_vm.wait_agent()
            members = add_fakes(cluster, FAKE_PEERS, str(cluster.lan.address(FAKES_HOST).ip))
            wait_for_peers(node1, NODES - 1 + FAKE_PEERS, timeout=300)
            make_fakes_live(cluster, fakes_vm, node1, members)
            wait_reported(node1, "all peers up", 300, all_up(NODES - 1 + FAKE_PEERS))
        elif fakes:
            add_fakes(cluster, FAKE_PEERS)
            wait_for_peers(node1, NODES - 1 + FAKE_PEERS, timeout=300)
        exec_start = node1.check(
            ["systemctl", "show", "-p", "ExecStart", "--value", f"{AGENT_UNIT}.service"]
        )
        argv = exec_start.split("argv[]=", 1)[1].split(" ;", 1)[0].split()
        node1.check(["mkdir", "-p", str(Path(DROP_IN).parent)])
        node1.write_file(RUNNER_AT, RUNNER.read_bytes())
        node1.write_file(
            DROP_IN,
            (
                "[Service]\nExecStart=\n"
                f"ExecStart=/usr/bin/python3 {RUNNER_AT} {PROFILES} {' '.join(argv)}\n"
            ).encode(),
        )
        node1.check(["systemctl", "daemon-reload"])
        node1.check(["systemctl", "restart", f"{AGENT_UNIT}.service"], timeout=300)
        started = time.time()
        wait_for_passes(node1, started, SETTLE_2_S)
        node1.check(["systemctl", "kill", "-s", "SIGUSR2", f"{AGENT_UNIT}.service"])
        before = passes(node1)
        window_started = time.monotonic()
        time.sleep(window)
        count = passes(node1) - before
        elapsed = time.monotonic() - window_started
        node1.check(["systemctl", "stop", f"{AGENT_UNIT}.service"], timeout=120)
        print(f"# {count} passes in {elapsed:.0f} s (host time) under cProfile", flush=True)
        print(
            node1.check(
                ["python3", RUNNER_AT, "--report", PROFILES, sort, str(lines)],
                timeout=300,
            ),
            flush=True,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--fakes", action="store_true", help=f"add {FAKE_PEERS} dead fake peers")
    which.add_argument("--live", action="store_true", help=f"add {FAKE_PEERS} live fake peers")
    parser.add_argument("--window", type=float, default=90.0, help="seconds profiled")
    parser.add_argument("--sort", default="tottime", help="a pstats sort key")
    parser.add_argument("--lines", type=int, default=40)
    parser.add_argument("--workdir", type=Path, help="keep the lab here (default: a temp dir)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("profile-idle needs root (network namespaces, taps)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="profile-idle-") as tmp:
        workdir = args.workdir or Path(tmp)
        try:
            fakes = "live" if args.live else "dead" if args.fakes else ""
            profile(args.window, fakes, args.sort, args.lines, workdir)
        except (AssertionError, LabError) as e:
            print(f"profile-idle: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
