"""Selective encryption on the real host kernel, in network namespaces made by the test
(topology in dataplanelab): what goes into the tunnel, what does not, and drift repaired."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from dataplanelab import (
    DRIFTS,
    LISTEN_PORT,
    MEMBER_V4,
    MEMBER_V6,
    NON_MEMBER,
    SERVICE,
    SPEC,
    counter,
    drift_command,
    send_udp,
    snapshot,
    wired,
)

from netlab import Netns, wait_until

pytestmark = pytest.mark.netns


@pytest.fixture
def node() -> Iterator[Netns]:
    with wired() as (node, _tunnel, _pod):
        yield node


def test_members_go_to_the_tunnel_and_the_rest_is_untouched(node: Netns) -> None:
    applied = node.dataplane("apply", SPEC)["operations"]
    assert applied[0] == "sysctl -w net.ipv4.conf.kubespan.rp_filter=0"
    assert applied[-1].startswith("nft -f -  # replace table inet kubespan")
    assert node.sh("cat /proc/sys/net/ipv4/conf/kubespan/rp_filter").strip() == "0"

    # Routing decisions: marked traffic to table 180, unmarked to main.
    assert "dev kubespan" in node.ip("route", "get", MEMBER_V4, "mark", "0x40")
    assert "dev eth0" in node.ip("route", "get", MEMBER_V4)

    send_udp(node, MEMBER_V4)
    send_udp(node, MEMBER_V6)
    assert counter(node, "to_tunnel") == 6
    assert counter(node, "member_clear") == 0

    # A non-member is left alone: out of the underlay, with the foreign mark and route intact.
    send_udp(node, NON_MEMBER)
    assert counter(node, "non_member_clear") == 3
    assert counter(node, "foreign_marked") == 3
    assert counter(node, "to_tunnel") == 6


def test_wireguards_own_packets_go_out_on_the_underlay(node: Netns) -> None:
    """UDP from the listen port with mark 0x20, as the kernel WireGuard socket sends it to a
    member's node address, is not re-marked (it would loop into the tunnel)."""
    node.dataplane("apply", SPEC)
    send_udp(node, MEMBER_V4, mark=0x20, source_port=LISTEN_PORT)
    assert counter(node, "wireguard_underlay") == 3
    assert counter(node, "to_tunnel") == 0


@pytest.mark.parametrize("mark", [0x20, 0x539], ids=["wireguard-mark-other-port", "istio"])
def test_a_foreign_mark_does_not_bypass_the_tunnel(node: Netns, mark: int) -> None:
    """0x539 (Istio) has the bit 0x20: a mark alone must not pass as WireGuard's."""
    node.dataplane("apply", SPEC)
    send_udp(node, MEMBER_V4, mark=mark)
    send_udp(node, MEMBER_V6, mark=mark)
    assert counter(node, "to_tunnel") == 6
    assert counter(node, "member_clear") == 0


def test_service_traffic_to_a_member_is_encrypted() -> None:
    """kube-proxy-style DNAT from a Service address to a member: marked after DNAT, so it
    goes into the tunnel, from the node itself (output) and from a pod (forwarded)."""
    with wired() as (node, _tunnel, pod):
        node.dataplane("apply", SPEC)
        send_udp(node, SERVICE, port=53)
        assert counter(node, "to_tunnel") == 3
        send_udp(pod, SERVICE, port=53)
        assert counter(node, "to_tunnel") == 6
        assert counter(node, "member_clear") == 0


def test_forwarded_traffic_carrying_0x20_still_goes_into_the_tunnel() -> None:
    """Only locally generated packets can be WireGuard's: a forwarded packet that another
    program marked 0x20 is encrypted like any other."""
    with wired() as (node, _tunnel, pod):
        node.dataplane("apply", SPEC)
        node.sh(
            "nft 'add table inet meddler'; nft 'add chain inet meddler pre "
            "{ type filter hook prerouting priority mangle; policy accept; }'; nft 'add rule "
            'inet meddler pre iifname "pod0" meta mark set meta mark | 0x20\''
        )
        send_udp(pod, MEMBER_V4, source_port=LISTEN_PORT)
        assert counter(node, "to_tunnel") == 3
        assert counter(node, "member_clear") == 0


def test_a_relays_bind_answers_go_out_on_the_underlay_and_nothing_else_from_its_ports(
    node: Netns,
) -> None:
    """A relay answers binds from its ports with WireGuard's mark: those 126-byte "KSrb"
    messages leave on the underlay; anything else sent from a relay port to a member, even
    with the mark (any program can bind those ports), goes into the tunnel."""
    node.dataplane("apply", {**SPEC, "relay_ports": [29100, 256]})
    answer = b"KSrb" + bytes(122)
    send_udp(node, MEMBER_V4, mark=0x20, source_port=29101, payload=answer)
    assert counter(node, "to_tunnel") == 0
    assert counter(node, "member_clear") == 3
    send_udp(node, MEMBER_V4, mark=0x20, source_port=29102)  # not a bind answer
    send_udp(node, MEMBER_V4, mark=0x20, source_port=29103, payload=b"KSrb" + bytes(130))
    assert counter(node, "to_tunnel") == 6
    assert counter(node, "member_clear") == 3


def test_reapplying_changes_nothing(node: Netns) -> None:
    node.dataplane("apply", SPEC)
    table = node.sh("nft -j list table inet kubespan")
    rules = node.ip("rule", "show")
    assert node.dataplane("apply", SPEC)["operations"] == []
    assert node.sh("nft -j list table inet kubespan") == table
    assert node.ip("rule", "show") == rules


def test_other_programs_nftables_changes_are_not_drift(node: Netns) -> None:
    node.dataplane("apply", SPEC)
    node.sh("nft 'add table ip other'; nft 'add chain ip other c'; nft 'delete table ip other'")
    assert node.dataplane("diff", SPEC)["operations"] == []


def test_a_restarted_agent_replaces_the_table_once(node: Netns) -> None:
    """Nothing is remembered across restarts, so the table cannot be proven ours: replaced
    once, atomically; then it is proven again."""
    node.dataplane("apply", SPEC)
    node.close()  # the next request starts a new helper process: an agent restart
    (first,) = node.dataplane("apply", SPEC)["operations"]
    assert first.startswith("nft -f -  # replace table inet kubespan")
    assert node.dataplane("apply", SPEC)["operations"] == []


def test_teardown_removes_only_ours(node: Netns) -> None:
    foreign_before = node.sh("nft list table inet foreign")
    node.dataplane("apply", SPEC)
    removed = node.dataplane("teardown")["removed"]
    assert "nftables table inet kubespan" in removed
    assert node.sh("nft list tables").split() == [
        "table",
        "inet",
        "foreign",
        "table",
        "ip",
        "service",
        "table",
        "inet",
        "observer",
    ]
    assert "lookup 180" not in node.ip("rule", "show")
    assert "lookup 180" not in node.ip("-6", "rule", "show")
    assert node.ip("route", "show", "table", "180") == ""
    assert node.ip("-6", "route", "show", "table", "180") == ""
    # Without kubespan, member traffic goes the normal way again.
    send_udp(node, MEMBER_V4)
    assert counter(node, "member_clear") == 3
    assert node.sh("nft list table inet foreign") == foreign_before
    assert "31000:\tfrom all fwmark 0x4000/0x4000 lookup 200" in node.ip("rule", "show")
    assert node.dataplane("teardown")["removed"] == []


def test_a_refused_batch_leaves_the_previous_ruleset(node: Netns) -> None:
    node.dataplane("apply", SPEC)
    table = node.sh("nft -j list table inet kubespan")
    result = node.dataplane("apply-broken", SPEC)
    assert "nftables refused the change" in result["error"]
    assert node.sh("nft -j list table inet kubespan") == table


def test_flushed_chain_deleted_rule_and_route_are_repaired(node: Netns) -> None:
    node.dataplane("apply", SPEC)
    node.sh("nft flush chain inet kubespan output")
    node.ip("rule", "del", "priority", "32500")
    node.ip("route", "del", "default", "table", "180", "dev", "kubespan")
    repaired = node.dataplane("apply", SPEC)["operations"]
    assert repaired == [
        "ip -4 route replace default dev kubespan table 180 metric 1024 mtu 1420",
        "ip -4 rule add priority 32500 fwmark 0x40/0x60 lookup 180",
        repaired[-1],
    ]
    assert repaired[-1].startswith("nft -f -")
    assert node.dataplane("apply", SPEC)["operations"] == []


EXPECTED_REPAIR = {
    "element swapped": ["nft -f -  # replace table inet kubespan"],
    "rule replaced by accept": ["nft -f -  # replace table inet kubespan"],
    "chain policy drop": ["nft -f -  # replace table inet kubespan"],
    "table deleted": ["nft -f -  # replace table inet kubespan"],
    "foreign route in table 180": [
        "ip -4 route del 203.0.113.0/24 via 192.0.2.1 dev eth0 table 180 metric 0"
    ],
    "foreign rule for table 180": [
        "ip -4 rule add priority 32500 fwmark 0x40/0x60 lookup 180",
        "ip -4 rule del priority 32500 fwmark 0x40/0x60 lookup 180",
        "ip -4 rule del priority 32500 lookup 180",
    ],
}


@pytest.mark.parametrize("drift", sorted(DRIFTS))
def test_drift_is_detected_and_repaired_by_one_apply(node: Netns, drift: str) -> None:
    node.dataplane("apply", SPEC)
    baseline = snapshot(node)
    node.sh(drift_command(node, drift))
    assert snapshot(node) != baseline

    planned = node.dataplane("diff", SPEC)["operations"]
    assert [op[: len(want)] for op, want in zip(planned, EXPECTED_REPAIR[drift], strict=True)] == (
        EXPECTED_REPAIR[drift]
    )
    assert node.dataplane("apply", SPEC)["operations"] == planned
    assert snapshot(node) == baseline
    assert node.dataplane("diff", SPEC)["operations"] == []
    # And the repaired state does what it is for.
    send_udp(node, "203.0.113.6")
    assert counter(node, "to_tunnel") == 3
    assert counter(node, "member_clear") == 0


def test_decrypted_traffic_from_members_is_not_dropped() -> None:
    """Packets arriving on the link (as WireGuard delivers them, from a member's address, on
    an interface without an IPv4 address) reach the node: rp_filter must not drop them."""
    with wired() as (node, tunnel, _pod):
        node.dataplane("apply", SPEC)
        mac = node.sh("cat /sys/class/net/kubespan/address").strip()
        tunnel.ip("address", "add", f"{MEMBER_V4}/32", "dev", "t0")
        tunnel.ip("route", "add", "192.0.2.10/32", "dev", "t0")
        tunnel.ip("neigh", "add", "192.0.2.10", "lladdr", mac, "dev", "t0")
        send_udp(tunnel, "192.0.2.10")
        assert counter(node, "from_tunnel") == 3


def test_neighbour_discovery_with_a_member_stays_on_the_link() -> None:
    """A member on the node's own IPv6 link resolves the node: the node's neighbour
    advertisement to the member's address is link control, not data, and is not pulled into
    the tunnel (an IPv6-only underlay stalled that way: no neighbour, no WireGuard packets)."""
    with wired() as (node, _tunnel, _pod):
        world = Netns(node.name.replace("-node-", "-world-"))
        spec = {**SPEC, "members": [*SPEC["members"], "2001:db8::1/128"]}
        node.dataplane("apply", spec)
        node.sh("ip -6 neigh flush dev eth0")
        world.sh("ip -6 neigh flush dev w0")
        send_udp(world, "2001:db8::10")  # the world (a member) must resolve the node first
        wait_until(lambda: "lladdr" in world.sh("ip -6 neigh show 2001:db8::10 dev w0"), 5.0)


def test_cleanup_leaves_a_link_of_our_name_that_is_not_wireguard(node: Netns) -> None:
    """The lab's `kubespan` link is a veth (no WireGuard in this kernel): another program's
    as far as the agent can tell, so `--cleanup` and `enabled: false` must not delete it."""
    node.dataplane("apply", SPEC)
    script = (
        "import json\n"
        "from kubespan.apply.kernel import Kernel\n"
        "with Kernel() as kernel:\n"
        "    print(json.dumps(kernel.teardown()))\n"
    )
    removed = json.loads(node.python("-c", script))
    assert "nftables table inet kubespan" in removed
    assert not any(item.startswith("link") for item in removed), removed
    assert "kubespan" in node.ip("-brief", "link", "show", "kubespan")
