"""Across NAT (issue 10) and through relays (issue 12), on the image: NAT routers in
namespaces (masquerade, replies admitted by conntrack only; one symmetric), six nodes booted
once and shared by NAT scenarios 1 to 6 and relay scenarios 1 to 3, and an IPv6-only lab
for NAT scenario 7. Each scenario prints its time as `name=value`.

Scenario 7 comes first so that its lab is gone before the shared NAT lab boots (two labs
of VMs at once would share two cores). Scenarios that change the NAT lab come after those
that read it: the relay failover, which kills a relay, is last. The scenarios themselves
live in natlab.py (also run by `make bench-mesh`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from natlab import (
    NatLab,
    build_nat_lab,
    build_v6_lab,
    check_only_wireguard,
    check_relay_capture,
    failover_timeline,
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
    scenario_shared_nat,
)

from kslab import Image, Lab

pytestmark = pytest.mark.vm

FAILOVER_FAILS_AFTER_S = 30.0


def report(capsys: pytest.CaptureFixture[str], **values: float) -> None:
    """Seconds to a tenth; ratios and rates to a hundredth (a target of 0.8 must not be
    rounded up)."""
    with capsys.disabled():
        print(
            "\n"
            + " ".join(
                f"{name}={value:.2f}"
                if name.endswith(("_ratio", "_per_s"))
                else f"{name}={value:.1f}"
                for name, value in values.items()
            )
        )


def test_ipv6_only_underlay_meshes_and_reaches_ula_and_underlay(
    lab: Lab, kubespan_bin: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    six = build_v6_lab(lab, kubespan_bin, tmp_path / "discovery")
    took = scenario_ipv6_only(six)
    report(capsys, ipv6_mesh_s=took, ipv6_lab_wall_s=time.monotonic() - started)


@pytest.fixture(scope="module")
def nat(
    image: Image, kubespan_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NatLab]:
    """The NAT lab, booted once for scenarios 1 to 6."""
    directory = tmp_path_factory.mktemp("natlab")
    with Lab(directory / "lab", image) as lab:
        started = time.monotonic()
        shared = build_nat_lab(lab, kubespan_bin, directory / "discovery")
        print(f"\nnat_lab_boot_s={time.monotonic() - started:.1f}")
        yield shared


def test_site_behind_nat_meshes_with_public_nodes(
    nat: NatLab, capsys: pytest.CaptureFixture[str]
) -> None:
    report(capsys, nat_site_s=scenario_nat_site(nat))


def test_two_nodes_behind_one_nat_each_reachable_at_its_own_port(
    nat: NatLab, capsys: pytest.CaptureFixture[str]
) -> None:
    report(capsys, nat_shared_s=scenario_shared_nat(nat))


def test_two_nated_sites_get_a_direct_tunnel_and_only_wireguard_crosses(
    nat: NatLab, capsys: pytest.CaptureFixture[str]
) -> None:
    took = scenario_nat_to_nat(nat)
    packets = check_only_wireguard(nat)
    assert packets > 0
    report(capsys, nat_to_nat_s=took)


def test_unreachable_first_candidate_rotates_to_the_next(
    nat: NatLab, capsys: pytest.CaptureFixture[str]
) -> None:
    report(capsys, rotation_s=scenario_rotation(nat))


def test_a_path_broken_while_up_is_detected_and_repaired(
    nat: NatLab, capsys: pytest.CaptureFixture[str]
) -> None:
    report(capsys, dead_path_s=scenario_dead_path(nat))


def test_a_symmetric_nat_facing_filtering_nats_is_relayed(
    nat: NatLab, capsys: pytest.CaptureFixture[str]
) -> None:
    report(capsys, relay_up_s=scenario_relayed(nat))


def test_a_pair_moves_to_a_relay_much_nearer_than_its_own(
    nat: NatLab, capsys: pytest.CaptureFixture[str]
) -> None:
    report(capsys, relay_nearer_s=scenario_nearer_relay(nat))


def test_sites_whose_udp_is_blocked_are_relayed_then_direct_again(
    nat: NatLab, capsys: pytest.CaptureFixture[str]
) -> None:
    blocked = scenario_blocked_sites(nat)
    assert blocked.direct_again_s <= 120, blocked
    report(
        capsys,
        blocked_relayed_s=blocked.relayed_s,
        unblocked_direct_s=blocked.direct_again_s,
        relay_throughput_ratio=blocked.throughput_ratio,
        relay_throughput_ratio_two_vms=blocked.throughput_ratio_two_vms,
        relay_direct_mb_per_s=blocked.direct_rate / 1e6,
        relay_routed_mb_per_s=blocked.routed_rate / 1e6,
        relay_relayed_mb_per_s=blocked.relayed_rate / 1e6,
    )


def test_a_node_whose_address_changes_recovers_without_restart(
    nat: NatLab, capsys: pytest.CaptureFixture[str]
) -> None:
    report(capsys, roaming_s=scenario_roaming(nat))


def test_a_relay_that_dies_is_replaced_and_nothing_went_in_the_clear(
    nat: NatLab, capsys: pytest.CaptureFixture[str]
) -> None:
    took = scenario_relay_failover(nat)
    relayed = check_relay_capture(nat)
    assert relayed > 0, "the capture saw no relayed WireGuard message"
    # The bound is 20 s (12 to 15 s measured); this fails a pair left without a
    # relay for FAILED_FOR (a minute), with room for TCG's noise.
    assert took <= FAILOVER_FAILS_AFTER_S, (
        f"the pair was up again after {took:.1f} s; seconds from the kill:\n"
        + failover_timeline(nat, nat.relay_killed_at or 0.0)
    )
    report(capsys, relay_failover_s=took)
