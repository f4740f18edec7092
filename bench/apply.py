"""Time planning and applying the selective-encryption ruleset on the real kernel.

Runs in a network namespace it makes (root needed) with a stand-in `kubespan` link (a veth:
this host has no WireGuard module). Prints `name=value` lines:

  apply_ms_N           plan the member set and ruleset for N members, observe the kernel,
                       diff, and apply the change (one atomic nftables transaction), median
  apply_ms_N_ratio_to_10
  full_plan_ms_N       the whole pure planner (WireGuard peers included), for reference
  noop_ms              a reconcile pass over 1,000 unchanged members: plan, observe, diff
  noop_kernel_changes  kernel change events (nft monitor, ip monitor) during 20 such passes
  noop_watch_wakeups   KernelWatcher callbacks during those passes (the monitor's own marker
                       changes are not ours, so anything above 0 would be a wake-up storm)
"""

from __future__ import annotations

import ipaddress
import os
import queue
import subprocess
import sys
import threading
import time
import uuid

from kubespan.apply.dataplane import Dataplane
from kubespan.apply.watch import KernelWatcher
from kubespan.model import Member
from kubespan.names import LINK_NAME
from kubespan.plan.dataplane import diff_dataplane
from kubespan.plan.desired import Plan, member_set, plan
from kubespan.plan.ruleset import RulesetSpec, routing_spec

from workload import median_ms, members, plan_input

INSIDE = "KUBESPAN_BENCH_INSIDE"
SIZES = (10, 100, 1000)
MTU = 1420
LISTEN_PORT = 51820
ULA_PREFIX = ipaddress.IPv6Network("fd00::/64")


def outside() -> int:
    if os.geteuid() != 0:
        print("bench/apply.py needs root (it makes a network namespace)", file=sys.stderr)
        return 1
    name = f"ks-bench-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for argv in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "link", "add", "kubespan", "type", "veth", "peer", "name", "ks-peer"],
            # No IPv6 link-local addresses: they appear late and would count as changes.
            ["ip", "link", "set", "kubespan", "addrgenmode", "none", "arp", "off", "up"],
            ["ip", "link", "set", "ks-peer", "addrgenmode", "none", "up"],
        ):
            subprocess.run(["ip", "-n", name, *argv[1:]], check=True)
        env = dict(os.environ, **{INSIDE: "1"})
        command = ["ip", "netns", "exec", name, sys.executable, __file__]
        return subprocess.run(command, env=env, check=False).returncode
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


class Monitor:
    """Counts kernel change events (nftables, rules, routes) between two `sync()` calls."""

    MARKER = "kubespan_bench_marker"
    ROUTE = ("unreachable", "192.0.2.254/32", "table", "99")

    def __init__(self) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.processes = [
            subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
            for argv in (["nft", "monitor"], ["ip", "monitor", "rule", "route"])
        ]
        for process in self.processes:
            threading.Thread(target=self._read, args=(process,), daemon=True).start()
        self.seen: list[str] = []

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.put(line.rstrip())

    def sync(self) -> int:
        """Make marker changes until both monitors have reported them; the number of other
        changes reported since the previous sync."""
        changes = 0
        while True:
            for argv in (
                ["nft", "add", "table", "inet", self.MARKER],
                ["nft", "delete", "table", "inet", self.MARKER],
                ["ip", "route", "add", *self.ROUTE],
                ["ip", "route", "del", *self.ROUTE],
            ):
                subprocess.run(argv, check=True)
            got_nft = got_ip = False
            deadline = time.monotonic() + 2
            while not (got_nft and got_ip) and time.monotonic() < deadline:
                try:
                    line = self.lines.get(timeout=0.1)
                except queue.Empty:
                    continue
                if self.MARKER in line or "192.0.2.254" in line:
                    got_nft |= line.startswith("delete table")
                    got_ip |= line.startswith("Deleted")
                elif not line.startswith("# new generation"):  # follows every nft change
                    self.seen.append(line)
                    changes += 1
            if got_nft and got_ip:
                return changes

    def close(self) -> None:
        for process in self.processes:
            process.kill()


def full_plan(group: tuple[Member, ...]) -> Plan:
    return plan(plan_input(group, None))


class Bench:
    """The dataplane of the namespace this process runs in, and one reconcile of it."""

    def __init__(self) -> None:
        self.dataplane = Dataplane()
        self.routing = routing_spec(MTU)

    def reconcile(self, result: Plan) -> int:
        """Plan the ruleset from the peers, observe, diff, apply; kernel operations run."""
        v4, v6 = member_set(result.desired.peers, result.reports, ULA_PREFIX, False)
        spec = RulesetSpec(v4, v6, MTU, LISTEN_PORT)
        observed = self.dataplane.observe(LINK_NAME)
        before, after = diff_dataplane(spec, self.routing, LINK_NAME, observed)
        self.dataplane.apply([*before, *after])
        return len(before) + len(after)

    def apply_ms(self, size: int) -> float:
        """Median time of a change of the member set: one member replaced by another."""
        plans = [full_plan(members(size, 0)), full_plan(members(size, 1))]
        self.reconcile(plans[0])
        turn = [0]

        def change() -> None:
            turn[0] ^= 1
            assert self.reconcile(plans[turn[0]]) == 1  # the table, replaced in one transaction

        return median_ms(change, 40 if size < 1000 else 15)

    def noop(self, size: int) -> tuple[float, int, int]:
        steady = full_plan(members(size, 0))
        self.reconcile(steady)
        monitor = Monitor()
        wakeups: list[str] = []
        watcher = KernelWatcher(wakeups.append)
        try:
            monitor.sync()
            watcher.start()
            noop_ms = median_ms(lambda: self.reconcile(steady), 20)
            changes = monitor.sync()
        finally:
            watcher.stop()
            monitor.close()
        for line in monitor.seen:
            print(f"# change seen: {line}", file=sys.stderr)
        for reason in wakeups:
            print(f"# watcher woke: {reason}", file=sys.stderr)
        return noop_ms, changes, len(wakeups)


def inside() -> int:
    bench = Bench()
    baseline = None
    for size in SIZES:
        apply_ms = bench.apply_ms(size)
        baseline = baseline or apply_ms
        print(f"apply_ms_{size}={apply_ms:.2f}")
        print(f"apply_ms_{size}_ratio_to_{SIZES[0]}={apply_ms / baseline:.1f}")
        group = members(size)
        full_ms = median_ms(lambda: full_plan(group), 5)  # noqa: B023
        print(f"full_plan_ms_{size}={full_ms:.2f}", flush=True)
    noop_ms, changes, wakeups = bench.noop(SIZES[-1])
    print(f"noop_ms={noop_ms:.2f}")
    print(f"noop_kernel_changes={changes}")
    print(f"noop_watch_wakeups={wakeups}")
    bench.dataplane.close()
    return 0


if __name__ == "__main__":
    sys.exit(inside() if os.environ.get(INSIDE) else outside())
