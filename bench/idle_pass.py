"""What an idle agent's pass costs on this host, by how many members answer: the real
reconcile loop on an in-memory kernel (tests/fakekernel.py), the clocks stepped from one
pass to the next as the agent's loop schedules them (its wake-ups, at most a tick apart),
the answering members' counters moved before each pass as their probes' answers would.

Prints idle_pass_ms for 2 members that answer (the baseline: what a pass costs besides its
peers), 100 members of which 2 answer (the shape of qemu-tests/bench_idle.py: dead fakes),
and 100 that all answer (a live mesh: every peer probed and planned at every grain), each
the best of three runs of an hour's passes after two hours of settling, and their ratios to
the baseline. The in-VM figure (CPU percent of a real agent) is bench_idle.py's; this one is
for telling, in seconds, whether a change to the planner made a pass cheaper.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from dead_peers import bench_agent  # bench/: the script's own directory

SETTLE_S = 2 * 3600.0
MEASURED_S = 3600.0
RUNS = 3


def pass_ms(members: int, answering: int, work: Path) -> float:
    """CPU milliseconds of one idle pass, averaged over MEASURED_S of passes."""
    clock = {"now": 10_000.0}
    agent, kernel = bench_agent(work, clock, members)
    agent.reconcile()
    assert kernel.link is not None
    live = [p.public_key for p in kernel.link.peers][:answering]
    measured_from = clock["now"] + SETTLE_S
    end = measured_from + MEASURED_S
    cpu, passes = 0.0, 0
    while clock["now"] < end:
        clock["now"] = agent.next_pass_at()
        for key in live:
            kernel.handshake(key, 1_700_000_000 + clock["now"] - 1)
        began = time.process_time()
        agent.reconcile()
        if clock["now"] >= measured_from:
            cpu += time.process_time() - began
            passes += 1
    return cpu / passes * 1000


def main() -> None:
    logging.getLogger("kubespan").setLevel(logging.WARNING)
    logging.getLogger("kubespan").propagate = False
    shapes = {"2_members": (2, 2), "100_members_2_answer": (100, 2), "100_members": (100, 100)}
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as work:
        for name, (members, answering) in shapes.items():
            figures[name] = min(
                pass_ms(members, answering, Path(work) / f"{name}-{run}") for run in range(RUNS)
            )
    baseline = figures["2_members"]
    for name, ms in figures.items():
        print(f"idle_pass_ms_{name}={ms:.3f}")
    for name, ms in figures.items():
        if name != "2_members":
            print(f"idle_pass_ratio_{name}_to_2_members={ms / baseline:.2f}")


if __name__ == "__main__":
    main()
