"""What 100 peers that never answer cost over one simulated hour: kernel operations and log
lines (at INFO and above, what the journal keeps by default) of the real reconcile loop, on an
in-memory kernel, with the clocks stepped by the tick.

Prints dead_peers_ops_per_h and dead_peers_log_lines_per_h (targets: at most 1,000 each), and
the same for a baseline of 100 peers that answer, run in the same process; and what a pass
costs in CPU on this host (`*_pass_ms`: the planner, the diff and the status, on the fake
kernel; what an idle agent's pass costs in a VM is bench_idle.py's).
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from kubespan.agent.loop import TICK_SECONDS, Agent, Clocks
from kubespan.config import parse_config
from kubespan.identity import LinkHardware, load_or_create_identity
from kubespan.model import AffiliateInfo, MemberRecord
from kubespan.netaddr import Endpoint
from kubespan.plan.membership import Known, Membership

from fakekernel import FakeKernel, local_address

PEERS = 100
HOUR = 3600.0
CONFIG = b"""
machine: {network: {kubespan: {enabled: true}}}
cluster:
  id: 2ovbY4rZh1pLvfxV7jTN6m3H0M2bq1qnd4RA8r1SwyI=
  secret: QkmNnPyiu8Kq1yRyx3Vg6O7zQk7JgYtJXUVYf0gqW0g=
  discovery: {enabled: true, registries: {service: {endpoint: "http://127.0.0.1:9"}}}
"""


class Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def membership(agent: Agent, count: int = PEERS) -> Membership:
    known = {}
    for index in range(count):
        private = ipaddress.IPv4Address(0x0A000000 + index + 10)
        public = ipaddress.IPv4Address(0xC6120000 + index + 10)
        info = AffiliateInfo(
            node_id=f"peer{index}",
            hostname=f"peer{index}",
            public_key=base64.b64encode(index.to_bytes(32, "big")).decode(),
            ula=agent.prefix[index + 10],
            addresses=(private, public),
        )
        endpoints = (Endpoint(private, 51820), Endpoint(public, 51820))
        known[info.node_id] = Known(MemberRecord(info, endpoints, 1, 1 << 40))
    return Membership(known)


def bench_agent(work: Path, clock: dict[str, float], members: int) -> tuple[Agent, FakeKernel]:
    """The real agent on an in-memory kernel, its clocks read from `clock`, knowing
    `members` members (none of them heard from yet)."""
    kernel = FakeKernel(
        addresses=(local_address("ens3", "192.0.2.1/24"),),
        hardware=(LinkHardware("ens3", "52:54:00:00:00:01", True),),
    )
    agent = Agent(
        parse_config(CONFIG, "bench.yaml"),
        load_or_create_identity(work / "state"),
        kernel,
        work / "run",
        work / "state",
        clocks=Clocks(wall=lambda: 1_700_000_000 + clock["now"], monotonic=lambda: clock["now"]),
        hostname=lambda: "bench",
    )
    agent.membership, agent.members_known = membership(agent, members), True
    return agent, kernel


def simulate(answering: bool, work: Path) -> tuple[int, int, float]:
    clock = {"now": 10_000.0}
    agent, kernel = bench_agent(work, clock, PEERS)
    counter = Counter()
    logging.getLogger("kubespan").addHandler(counter)
    try:
        agent.reconcile()  # the first pass builds the link and the peers: not counted
        operations, lines = len(kernel.applied), counter.count
        end = clock["now"] + HOUR
        passes, cpu = 0, 0.0
        while clock["now"] < end:
            clock["now"] += TICK_SECONDS
            if answering:
                for key in [p.public_key for p in kernel.link.peers] if kernel.link else []:
                    kernel.handshake(key, 1_700_000_000 + clock["now"] - 1)
            began = time.process_time()
            agent.reconcile()
            cpu += time.process_time() - began
            passes += 1
        return len(kernel.applied) - operations, counter.count - lines, cpu / passes * 1000
    finally:
        logging.getLogger("kubespan").removeHandler(counter)


def main() -> None:
    logging.getLogger("kubespan").setLevel(logging.INFO)
    logging.getLogger("kubespan").propagate = False
    with tempfile.TemporaryDirectory() as work:
        alive_ops, alive_lines, alive_ms = simulate(True, Path(work) / "alive")
        dead_ops, dead_lines, dead_ms = simulate(False, Path(work) / "dead")
    print(f"alive_peers_ops_per_h={alive_ops}")
    print(f"alive_peers_log_lines_per_h={alive_lines}")
    print(f"alive_peers_pass_ms={alive_ms:.2f}")
    print(f"dead_peers_ops_per_h={dead_ops}")
    print(f"dead_peers_log_lines_per_h={dead_lines}")
    print(f"dead_peers_pass_ms={dead_ms:.2f}")
    print(f"dead_peers_ops_ratio_to_alive={dead_ops / max(alive_ops, 1):.1f}")
    print(f"dead_peers_pass_ratio_to_alive={dead_ms / alive_ms:.2f}")


if __name__ == "__main__":
    main()
