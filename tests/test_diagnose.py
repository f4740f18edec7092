"""`kubespan check`'s judgement (pure): each diagnosis fires on crafted conflicting facts,
says what, why and what to do, and stays quiet on a healthy node."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kubespan import cli, preflight
from kubespan.diagnose import Facts, Finding, diagnose, observe
from kubespan.diagnose.facts import CT_MARK, META_MARK, DiscoverySeen, MarkUse, PathMtu
from kubespan.diagnose.report import HEALTHY, findings_json, render_findings
from kubespan.netaddr import Endpoint
from kubespan.plan.routing import RouteSpec, RuleSpec, routing_spec

PEER_V4 = Endpoint.parse("198.51.100.9:51820")
PEER_V6 = Endpoint.parse("[2001:db8:77::9]:51820")
SERVICE = "https://discovery.example"
OTHER_SERVICE = "https://discovery-b.example"

HEALTHY_FACTS = Facts(
    agent="running",
    agent_detail="",
    link="kubespan",
    link_kind="wireguard",
    tunnel_mtu=1420,
    rules=(
        RuleSpec(4, 0, 0, 0, 255),
        RuleSpec(4, 0x4000, 0x4000, 31000, 200),  # another program's, on its own bit
        RuleSpec(4),
        RuleSpec(4, 0, 0, 32766, 254),
        RuleSpec(6),
        RuleSpec(4, 0xCA6C, 0xFFFFFFFF, 32764, 51820, ("not",)),  # wg-quick's, after ours
    ),
    routes=routing_spec(1420).routes,
    mark_uses=(MarkUse("inet", "other", "c", 3, None, CT_MARK, False, 0x60),),
    # Strict on the underlay and as the default for new devices harms nothing of ours.
    rp_filter=(("all", 0), ("default", 1), ("kubespan", 0), ("eth0", 1)),
    paths=(PathMtu(PEER_V4, 1500, "eth0"), PathMtu(PEER_V6, 1500, "eth0")),
    discovery=(DiscoverySeen(SERVICE, None, None, 3.0, True),),
)


def with_rules(*extra: RuleSpec) -> dict[str, Any]:
    return {"rules": (*HEALTHY_FACTS.rules, *extra)}


def mark(key: str, sets: bool, bits: int) -> dict[str, Any]:
    use = MarkUse("ip", "meddler", "out", 7, "output, priority 10", key, sets, bits)
    return {"mark_uses": (use,)}


def rp(**values: int) -> dict[str, Any]:
    merged = {**dict(HEALTHY_FACTS.rp_filter), **values}
    return {"rp_filter": tuple(merged.items())}


def paths(*found: PathMtu) -> dict[str, Any]:
    return {"paths": found}


def services(*found: DiscoverySeen) -> dict[str, Any]:
    return {"discovery": found}


def skew(seconds: float) -> dict[str, Any]:
    return services(DiscoverySeen(SERVICE, None, None, seconds, True))


FOREIGN_ROUTE = RouteSpec(
    4,
    ipaddress.ip_network("10.99.0.0/16"),
    0,
    link="eth0",
    gateway=ipaddress.ip_address("192.0.2.1"),
)

# name: (changes to the healthy facts, [(code, severity, words in what, words in todo)])
CASES: dict[str, tuple[dict[str, Any], list[tuple[str, str, list[str], list[str]]]]] = {
    "foreign rule at our priority": (
        with_rules(RuleSpec(4, 0, 0, 32500, 100)),
        [("rule-priority-taken", "error", ["priority 32500 lookup 100 (IPv4)"],
          ["ip -4 rule del priority 32500 lookup 100"])],
    ),
    "foreign rule looking up table 180": (
        with_rules(RuleSpec(6, 0, 0, 200, 180, ("from 2001:db8::/32",))),
        [("rule-uses-table-180", "error", ["priority 200 from 2001:db8::/32 lookup 180"],
          ["ip -6 rule del priority 200 from 2001:db8::/32 lookup 180"])],
    ),
    "our rule with one selector more": (
        with_rules(RuleSpec(4, other=("iif eth0",))),
        [("rule-uses-table-180", "error", ["fwmark 0x40/0x60 iif eth0 lookup 180"], [])],
    ),
    "earlier rule on bit 0x40": (
        with_rules(RuleSpec(4, 0x40, 0x40, 1000, 254)),
        [("rule-steals-tunnel-traffic", "error", ["priority 1000 fwmark 0x40/0x40 lookup main"],
          ["0x60"])],
    ),
    "earlier rule on the whole mark 0x40": (
        with_rules(RuleSpec(4, 0x40, 0xFFFFFFFF, 1000, 100)),
        [("rule-steals-tunnel-traffic", "error", ["fwmark 0x40/0xffffffff"], [])],
    ),
    "earlier inverted rule that tunnel packets do not match": (
        with_rules(RuleSpec(4, 0x4000, 0x4060, 1001, 300, ("not",))),
        [("rule-steals-tunnel-traffic", "error", ["not priority 1001 fwmark 0x4000/0x4060"],
          ["ip -4 rule del not priority 1001"])],
    ),
    "earlier blackhole rule on our mark": (
        with_rules(RuleSpec(4, 0x40, 0x60, 100, 0, ("blackhole",))),
        [("rule-steals-tunnel-traffic", "error", ["fwmark 0x40/0x60 blackhole"], [])],
    ),
    "earlier rule on WireGuard's mark": (
        with_rules(RuleSpec(4, 0x20, 0x60, 1000, 100)),
        [("rule-catches-wireguard-packets", "warning", ["fwmark 0x20/0x60"], [])],
    ),
    "earlier inverted rule on our mark catches WireGuard's": (
        with_rules(RuleSpec(6, 0x40, 0x60, 1000, 100, ("not",))),
        [("rule-catches-wireguard-packets", "warning", ["(IPv6)"], [])],
    ),
    "a route of another program in table 180": (
        {"routes": (*HEALTHY_FACTS.routes, FOREIGN_ROUTE)},
        [("route-in-table-180", "error", ["10.99.0.0/16 via 192.0.2.1 dev eth0 table 180"],
          ["ip -4 route del 10.99.0.0/16"])],
    ),
    "a rule clearing our mark bits": (
        mark(META_MARK, True, 0x60),
        [("nft-changes-mark-bits", "error",
          ["bits 0x60", "table ip meddler, chain out (hook output, priority 10), rule (handle 7)"],
          ["nft -a list chain ip meddler out"])],
    ),
    "a rule assigning a whole mark": (
        mark(META_MARK, True, 0xFFFFFFFF),
        [("nft-changes-mark-bits", "error", ["bits 0x60"], [])],
    ),
    "a rule comparing the whole mark": (
        mark(META_MARK, False, 0xFFFFFFFF),
        [("nft-compares-mark-bits", "warning", ["compares packet mark bits 0x60"], [])],
    ),
    "a rule setting connection mark bit 0x20": (
        mark(CT_MARK, True, 0x20),
        [("nft-changes-ct-mark-bits", "warning", ["connection mark bits 0x20"], [])],
    ),
    "strict rp_filter on the link": (
        rp(kubespan=1),
        [("rp-filter-strict", "error", ["net.ipv4.conf.kubespan.rp_filter=1"],
          ["net.ipv4.conf.kubespan.rp_filter = 0", "/etc/sysctl.d"])],
    ),
    "strict rp_filter for all": (
        rp(all=1),
        [("rp-filter-strict", "error", ["net.ipv4.conf.all.rp_filter=1", "larger applies"],
          ["net.ipv4.conf.all.rp_filter=0", "(now: eth0=1)"])],
    ),
    "loose rp_filter for all (drops too: the link has no IPv4 address)": (
        rp(all=2),
        [("rp-filter-loose", "error", ["is loose on kubespan", "net.ipv4.conf.all.rp_filter=2"],
          ["net.ipv4.conf.all.rp_filter=0"])],
    ),
    "loose rp_filter on the link": (
        rp(kubespan=2),
        [("rp-filter-loose", "error", ["net.ipv4.conf.kubespan.rp_filter=2"],
          ["net.ipv4.conf.kubespan.rp_filter = 0"])],
    ),
    "strict rp_filter for all before the link exists": (
        {"link_kind": None, **rp(all=1)},
        [("rp-filter-strict", "error", ["will be strict on kubespan"], [])],
    ),
    "another program's link under our name": (
        {"link_kind": "veth"},
        [("link-not-wireguard", "error", ["is a veth link"], ["ip link del kubespan"])],
    ),
    "an IPv4 path narrower than the tunnel": (
        paths(PathMtu(PEER_V4, 1400, "eth0")),
        [("mtu-too-large", "error",
          ["198.51.100.9:51820", "the MTU of eth0 is 1400", "60 bytes", "1480 > 1400"],
          ["mtu to 1340 or less"])],
    ),
    "an IPv6 route MTU narrower than the tunnel": (
        paths(PathMtu(PEER_V6, 1480, "eth0", from_route=True)),
        [("mtu-too-large", "error", ["[2001:db8:77::9]:51820", "the route's MTU is 1480",
          "80 bytes"], ["mtu to 1400 or less"])],
    ),
    "a path too narrow for any tunnel": (
        paths(PathMtu(PEER_V4, 1300, "eth0")),
        [("mtu-too-large", "error", ["1300"], ["raise the MTU of the path (to 1340 or more)"])],
    ),
    "no route to a peer": (
        paths(PathMtu(PEER_V4, None, None, error="Network is unreachable")),
        [("no-route-to-peer", "warning", ["198.51.100.9:51820: Network is unreachable"], [])],
    ),
    "a clock behind the service's beyond the bound": (
        skew(130),
        [("clock-skew", "error", ["130 s behind", SERVICE], ["timedatectl"])],
    ),
    "a clock ahead of the service's beyond the bound": (
        skew(-500.4),
        [("clock-skew", "error", ["500 s ahead of"], [])],
    ),
    "a clock past half the bound": (
        skew(61),
        [("clock-skew", "warning", ["61 s behind"], [])],
    ),
    "one of two services failing": (
        services(
            DiscoverySeen(SERVICE, "watch: HTTP 503", None, None, True),
            DiscoverySeen(OTHER_SERVICE, None, None, 0.0, True),
        ),
        [("discovery-failing", "warning", [f"{SERVICE} is failing: watch: HTTP 503"],
          [f"curl -sS {SERVICE}/openapi.json"])],
    ),
    "every service failing": (
        services(DiscoverySeen(SERVICE, "register: refused", None, None, False)),
        [("discovery-failing", "error", ["(it has never answered): register: refused"], [])],
    ),
    "the address discovery sees": (
        services(DiscoverySeen(SERVICE, None, "203.0.113.77", 0.0, True)),
        [("discovery-sees-address", "info", ["sees this node at 203.0.113.77"], [])],
    ),
    "no agent": (
        {"agent": "not running", "agent_detail": "no agent answers on /run/kubespan/status.sock"},
        [("agent-not-running", "error", ["no agent answers"], ["systemctl start kubespan"])],
    ),
    "an agent whose status cannot be read": (
        {"agent": "unreadable", "agent_detail": "its status is not JSON"},
        [("agent-status-unreadable", "warning", ["its status is not JSON"], [])],
    ),
    "a starting agent": ({"agent": "starting"}, [("agent-starting", "info", [], [])]),
    "a disabled agent": ({"agent": "disabled"}, [("agent-disabled", "info", [], [])]),
    "something that could not be read": (
        {"unobserved": (("ip rules", "Operation not permitted"),)},
        [("not-checked", "warning", ["ip rules could not be checked: Operation not"], [])],
    ),
}  # fmt: skip


def test_a_healthy_node_has_no_findings() -> None:
    assert diagnose(HEALTHY_FACTS) == ()
    assert render_findings(()) == HEALTHY


@pytest.mark.parametrize("name", list(CASES))
def test_each_diagnosis_fires_on_its_conflict(name: str) -> None:
    changes, expected = CASES[name]
    found = diagnose(replace(HEALTHY_FACTS, **changes))
    assert [(f.code, f.severity) for f in found] == [(c, s) for c, s, _, _ in expected]
    assert all(finding.what and finding.why and finding.todo for finding in found)
    for finding, (_, _, what, todo) in zip(found, expected, strict=True):
        for words in what:
            assert words in finding.what, finding.what
        for words in todo:
            assert words in finding.todo, finding.todo


@pytest.mark.parametrize(
    "changes",
    [
        with_rules(RuleSpec(4, 0x40, 0x60, 1000, 0, ("nop",))),  # steers nothing
        with_rules(RuleSpec(4, 0x40, 0x60, 32600, 100)),  # after ours
        with_rules(RuleSpec(4, 0, 0x60, 1000, 100)),  # only unmarked packets
        {"routes": routing_spec(1380).routes},  # ours, at another MTU
        mark(CT_MARK, False, 0x60),  # reading the connection mark harms nothing
        {"link_kind": None, **rp(kubespan=1)},  # no link: its value is the agent's to set
        paths(PathMtu(PEER_V4, 1480, "eth0"), PathMtu(PEER_V6, 1500, "eth0")),  # just fits
        {"tunnel_mtu": None, **paths(PathMtu(PEER_V4, 1400, "eth0"))},  # nothing to judge
        skew(60),
        skew(-59.9),
    ],
    ids=",".join,
)
def test_near_misses_stay_quiet(changes: dict[str, Any]) -> None:
    assert diagnose(replace(HEALTHY_FACTS, **changes)) == ()


def test_the_bound_on_clock_skew_is_a_parameter() -> None:
    (found,) = diagnose(replace(HEALTHY_FACTS, **skew(6)), max_skew=10)
    assert found.severity == "warning" and "more than 10 s" in found.why


def test_errors_come_first_then_warnings_then_information() -> None:
    facts = replace(
        HEALTHY_FACTS,
        **services(
            DiscoverySeen(SERVICE, None, "203.0.113.77", 61.0, True),
            DiscoverySeen(OTHER_SERVICE, "watch: refused", None, None, True),
        ),
        **rp(kubespan=1),
        **mark(META_MARK, False, 0x60),
    )
    found = diagnose(facts)
    assert [f.severity for f in found] == ["error", "warning", "warning", "warning", "info"]
    assert [f.code for f in found[1:4]] == [
        "nft-compares-mark-bits",
        "clock-skew",
        "discovery-failing",
    ]
    assert diagnose(facts) == found  # the same facts, the same findings in the same order


def test_the_json_is_a_stable_list() -> None:
    found = diagnose(replace(HEALTHY_FACTS, **rp(kubespan=1)))
    document = json.loads(findings_json(found))
    assert [list(item) for item in document] == [["code", "severity", "what", "why", "todo"]]
    assert document[0]["code"] == "rp-filter-strict"
    assert json.loads(findings_json(())) == []


def test_names_from_the_kernel_and_services_are_printed_escaped() -> None:
    hostile = "https://evil.example/\x1b[2J\x07"
    found = diagnose(
        replace(HEALTHY_FACTS, **services(DiscoverySeen(hostile, "x", None, None, True)))
    )
    text = render_findings(found)
    assert "\x1b" not in text and "\x07" not in text and "\\x1b[2J" in text
    assert text.endswith("1 error found")


def test_the_summary_counts_problems_not_information() -> None:
    info = Finding("discovery-sees-address", "info", "w", "y", "t")
    warning = Finding("clock-skew", "warning", "w", "y", "t")
    error = Finding("mtu-too-large", "error", "w", "y", "t")
    assert render_findings([info]).endswith(HEALTHY)
    assert render_findings([warning]).endswith("1 warning found")
    assert render_findings([error, error, warning, warning]).endswith(
        "2 errors and 2 warnings found"
    )
    block = render_findings([error]).split("\n")
    assert block[:4] == ["ERROR mtu-too-large", "  what: w", "  why:  y", "  todo: t"]


def test_check_without_the_privilege_to_look(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(preflight, "effective_capabilities", lambda: 0)
    assert cli.main(["check"]) == preflight.EXIT_NOPERM
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "CAP_NET_ADMIN" in captured.err


@pytest.mark.parametrize(
    ("changes", "status", "last_line"),
    [({}, 0, HEALTHY), (skew(70), 0, "1 warning found"), (rp(all=1), 1, "1 error found")],
    ids=["healthy", "a warning", "an error"],
)
def test_check_exits_1_on_errors_only(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    changes: dict[str, Any],
    status: int,
    last_line: str,
) -> None:
    monkeypatch.setattr(preflight, "effective_capabilities", lambda: 1 << preflight.CAP_NET_ADMIN)
    seen: list[Path] = []

    def observed(runtime_dir: Path) -> Facts:
        seen.append(runtime_dir)
        return replace(HEALTHY_FACTS, **changes)

    monkeypatch.setattr(observe, "observe", observed)
    assert cli.main(["check", "--runtime-dir", "/run/elsewhere"]) == status
    assert capsys.readouterr().out.rstrip().split("\n")[-1] == last_line
    assert cli.main(["check", "--json"]) == status
    assert len(json.loads(capsys.readouterr().out)) == (last_line != HEALTHY)
    assert seen == [Path("/run/elsewhere"), cli.DEFAULT_RUNTIME_DIR]


def test_a_command_with_shell_syntax_in_a_name_is_not_offered_for_pasting() -> None:
    """Interface names are set by whoever holds CAP_NET_ADMIN: `$(reboot)` is a valid one."""
    from kubespan.diagnose.conflicts import rule_findings
    from kubespan.plan.routing import RuleSpec

    plain = RuleSpec(4, 0x1, 0xFFFFFFFF, 32500, 100, ("iif", "eth0"))
    hostile = RuleSpec(4, 0x1, 0xFFFFFFFF, 32500, 100, ("iif", "$(reboot)"))
    (kept,) = rule_findings([plain])
    (refused,) = rule_findings([hostile])
    assert "`ip -4 rule del priority 32500 fwmark 0x1/0xffffffff iif eth0 lookup 100`" in kept.todo
    assert "$(reboot)" not in refused.todo and "not shown" in refused.todo
