"""A mesh of more than WIDE_MESH members probes on the wide grid (plan.peerstate.WIDE_GRAIN,
8 s: what keeps an idle agent with a hundred peers that answer under its CPU target) and
still finds a dead path within issue 10's 20 s.

node1 and node2 are real agents; 16 fake members (bench_idle's: registered on discovery from
the host, each played in a VM of its own by one WireGuard interface with its key and port,
node1 its one peer, answering node1's probes through its own tunnel) make node1's mesh 17
peers. Once all are up, node1 itself drops every packet to and from fake001's endpoint
(a table of the test's, both directions). The time from the cut to node1's status saying
fake001 is no longer up (its state_since), both on node1's clock, must be at most 20 s; the
other fakes stay up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench_idle import (
    FAKE_PORT_BASE,
    FAKES_HOST,
    add_fakes,
    agent_report,
    all_up,
    make_fakes_live,
    start_fakes_vm,
    wait_for_peers,
    wait_reported,
)

from kslab import Lab
from mesh import start_cluster, wait_for_mesh

pytestmark = pytest.mark.vm

WIDE_FAKES = 16  # with node2: 17 peers, one more than WIDE_MESH
DEAD_PATH_TARGET_S = 20.0  # issue 10's dead_path_s
CUT = "fake001"
CUT_TABLE = "kstest_cut"


def cut_script(address: str, port: int) -> str:
    """Drop everything between node1 and `address`:`port`, both ways; print node1's clock
    from just before."""
    return (
        "set -e\n"
        "date +%s.%N\n"
        "nft -f - <<'EOF'\n"
        f"table inet {CUT_TABLE} {{\n"
        "  chain out { type filter hook output priority 0; "
        f"ip daddr {address} udp dport {port} drop; }}\n"
        "  chain in { type filter hook input priority 0; "
        f"ip saddr {address} udp sport {port} drop; }}\n"
        "}\n"
        "EOF\n"
    )


def peer(document: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in document["peers"] if p["name"] == name)


def test_a_dead_path_in_a_mesh_of_more_than_16_is_found_within_20_s(
    lab: Lab, kubespan_bin: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "discovery-state"
    state.mkdir()
    cluster = start_cluster(lab, kubespan_bin, state)
    fakes_vm = start_fakes_vm(cluster)
    node1, node2 = cluster.boot(2)
    fakes_vm.wait_agent()
    wait_for_mesh([node1, node2], timeout=480)
    fakes_address = str(cluster.lan.address(FAKES_HOST).ip)
    fakes = add_fakes(cluster, WIDE_FAKES, fakes_address)
    peers = 1 + WIDE_FAKES
    wait_for_peers(node1, peers, timeout=300)
    make_fakes_live(cluster, fakes_vm, node1, fakes)
    wait_reported(node1, f"{peers} peers up", 300, all_up(peers))
    wide = "probes on a 8 s grid (more than 16 members), a dead path found within 19 s"
    assert wide in node1.journal("kubespan"), "node1 never said it probes on the wide grid"

    before = agent_report(node1)
    assert before is not None and peer(before, CUT)["state"] == "up"
    cut_at = float(
        node1.check(["/bin/sh", "-s"], stdin=cut_script(fakes_address, FAKE_PORT_BASE + 1).encode())
    )

    def cut_peer_down(document: dict[str, Any]) -> bool:
        return bool(peer(document, CUT)["state"] != "up")

    after = wait_reported(node1, f"{CUT} no longer up", 3 * DEAD_PATH_TARGET_S, cut_peer_down)
    took = float(peer(after, CUT)["state_since"]) - cut_at
    with capsys.disabled():
        print(f"\nwide_dead_path_s={took:.1f}")
    assert 0 < took <= DEAD_PATH_TARGET_S, (
        f"{CUT} found dead {took:.1f} s after the cut: {peer(after, CUT)}"
    )
    others = [p for p in after["peers"] if p["name"] != CUT]
    assert len(others) == peers - 1
    assert all(p["state"] == "up" for p in others), [
        (p["name"], p["state"]) for p in others if p["state"] != "up"
    ]
