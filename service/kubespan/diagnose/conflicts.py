"""Another program's kernel objects that collide with kubespan's (pure): ip rules that use
table 180 or priority 32500 or catch kubespan's marked packets before its rule, routes in
table 180, nftables rules that change or compare the mark bits 0x60."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import replace

from kubespan.diagnose.facts import CT_MARK, META_MARK, MarkUse
from kubespan.diagnose.finding import Finding
from kubespan.diagnose.netlinkread import NOP
from kubespan.names import MARK_MASK, MARK_TUNNEL, MARK_WIREGUARD, ROUTE_TABLE, RULE_PRIORITY
from kubespan.plan.routing import RouteSpec, RuleSpec, routing_spec

TABLE_NAMES = {253: "default", 254: "main", 255: "local"}  # as `ip rule` prints them
ALL_BITS = 0xFFFFFFFF


# Names in commands come from the kernel, set by whoever holds CAP_NET_ADMIN (a hostNetwork
# pod, a CNI plugin): a command offered to root for pasting holds only these characters.
PASTEABLE = re.compile(r"[A-Za-z0-9 ._@:/=+-]*")


def pasteable(command: str) -> str:
    """`command` in backquotes when it is safe to paste into a root shell; otherwise what
    to look at, without it (a name with shell syntax could run anything)."""
    if PASTEABLE.fullmatch(command):
        return f"`{command}`"
    return "(the command is not shown: a name in it holds characters a shell would act on)"


def rule_text(rule: RuleSpec) -> str:
    """The rule in `ip rule`'s words: `ip -4 rule del <this>` deletes it."""
    inverted = "not" in rule.other
    mark = f"fwmark {rule.fwmark:#x}/{rule.mask:#x}" if rule.fwmark or rule.mask else ""
    words = ["not"] * inverted + [f"priority {rule.priority}"] + [mark] * bool(mark)
    words += [word for word in rule.other if word != "not"]
    if rule.table:
        words.append(f"lookup {TABLE_NAMES.get(rule.table, rule.table)}")
    return " ".join(words)


def can_match(rule: RuleSpec, mark: int) -> bool:
    """Whether the rule's mark selector can match a packet whose bits 0x60 are `mark` (its
    other bits being anything another program put there). Only selectors that look at bits
    0x60 count: a rule that ignores them steers our packets no more than anyone else's, and
    whether it does depends on its table's routes, which are not ours to judge."""
    if not rule.mask & MARK_MASK:
        return False
    agrees = not (rule.fwmark ^ mark) & rule.mask & MARK_MASK
    if "not" not in rule.other:
        return agrees
    # Inverted: it matches whenever the plain selector would not, which some mark with
    # these bits 0x60 achieves if the selector looks at any other bit.
    return not agrees or bool(rule.mask & ~MARK_MASK & ALL_BITS)


def _ours(rule: RuleSpec) -> bool:
    return rule == RuleSpec(rule.family)


def rule_findings(rules: Iterable[RuleSpec]) -> Iterator[Finding]:
    """Another program's rule that uses table 180 or priority 32500; and one before 32500
    whose mark selector can match the packets we mark 0x40 (they would be routed by it, not
    by table 180: an error) or WireGuard's own, marked 0x20 (they would leave the main
    table's routing: a warning). A `nop` rule steers nothing and is passed over."""
    for rule in rules:
        if _ours(rule):
            continue
        shown = f"{rule_text(rule)} (IPv{rule.family})"
        delete = pasteable(f"ip -{rule.family} rule del {rule_text(rule)}")
        if rule.table == ROUTE_TABLE:
            yield Finding(
                "rule-uses-table-180",
                "error",
                f"another program's rule looks up table {ROUTE_TABLE}, kubespan's: {shown}",
                f"table {ROUTE_TABLE} routes into the tunnel; the agent deletes every rule "
                "that looks it up but its own at each pass, so the two programs keep undoing "
                "each other, and meanwhile the traffic that rule selects goes into the tunnel "
                "or is refused",
                f"give that program another table; to remove the rule now: {delete}",
            )
        elif rule.priority == RULE_PRIORITY:
            yield Finding(
                "rule-priority-taken",
                "error",
                f"another program's rule has priority {RULE_PRIORITY}, kubespan's: {shown}",
                "rules of equal priority are tried in the order they were added, so this one "
                "may be tried before kubespan's rule that sends marked traffic into the tunnel; "
                f"and whoever deletes `priority {RULE_PRIORITY}` may take either",
                f"move that rule to another priority ({delete}, then add it back with another "
                "priority), and change the program or config that adds it",
            )
        elif rule.priority < RULE_PRIORITY and NOP not in rule.other:
            yield from _steering(rule, shown, delete)


def _steering(rule: RuleSpec, shown: str, delete: str) -> Iterator[Finding]:
    table = TABLE_NAMES.get(rule.table, rule.table)
    where = f"table {table}" if rule.table else f"its action ({(*rule.other, '?')[0]})"
    fix = (
        "narrow its fwmark mask to leave bits 0x60 alone (they are kubespan's), or move it "
        f"after priority {RULE_PRIORITY}; to remove it now: {delete}"
    )
    if can_match(rule, MARK_TUNNEL):
        yield Finding(
            "rule-steals-tunnel-traffic",
            "error",
            f"a rule before kubespan's (priority {rule.priority} < {RULE_PRIORITY}) matches "
            f"packets kubespan marks for the tunnel (fwmark {MARK_TUNNEL:#x}/{MARK_MASK:#x}): "
            f"{shown}",
            f"the kernel takes the first rule that matches: traffic to members is routed by "
            f"{where} instead of table {ROUTE_TABLE}, so it may leave unencrypted or not at all",
            fix,
        )
    elif can_match(rule, MARK_WIREGUARD):
        yield Finding(
            "rule-catches-wireguard-packets",
            "warning",
            f"a rule before kubespan's (priority {rule.priority}) matches WireGuard's own "
            f"encrypted packets (fwmark {MARK_WIREGUARD:#x}/{MARK_MASK:#x}): {shown}",
            f"WireGuard's packets should follow the main table to the peers; routed by "
            f"{where} instead they may go out the wrong way or back into the tunnel, and "
            "handshakes fail",
            fix,
        )


def route_findings(routes: Iterable[RouteSpec], link: str) -> Iterator[Finding]:
    """Any route in table 180 but ours (ours at any MTU: the config sets it)."""
    ours = {replace(route, mtu=None) for route in routing_spec(0, link).routes}
    for route in routes:
        if replace(route, mtu=None) in ours:
            continue
        yield Finding(
            "route-in-table-180",
            "error",
            f"a route in table {ROUTE_TABLE}, kubespan's, is not kubespan's: "
            f"`{route.render('add')}`",
            "the agent deletes it at each pass and its program is likely to add it back; "
            "until then traffic to members that it matches goes where it says, not into the "
            "tunnel",
            "give that program another table; to remove the route now: "
            + pasteable(route.render("del")),
        )


# --- nftables marks ----------------------------------------------------------------------


def mark_findings(uses: Iterable[MarkUse]) -> Iterator[Finding]:
    """Another program's nftables rule that changes the packet mark's bits 0x60 (error: it
    can clear 0x40 after kubespan set it, sending member traffic out unencrypted, or set it
    on traffic that is not for members), that compares them (warning: a whole-mark
    comparison such as `meta mark 0x4000` stops matching packets kubespan marked), or that
    changes them in the connection mark (warning: a `meta mark set ct mark` restores them
    onto packets). Reading the connection mark's bits harms nothing of ours."""
    for use in uses:
        bits = use.bits & MARK_MASK
        listing = pasteable(f"nft -a list chain {use.family} {use.table} {use.chain}") + " shows it"
        if use.key == META_MARK and use.sets:
            yield Finding(
                "nft-changes-mark-bits",
                "error",
                f"another program's nftables rule can change packet mark bits {bits:#x}, "
                f"which kubespan uses: {use.where}",
                f"kubespan marks packets to members {MARK_TUNNEL:#x} so they go into the "
                f"tunnel, and knows WireGuard's own by {MARK_WIREGUARD:#x}: a rule that clears "
                f"{MARK_TUNNEL:#x} after kubespan set it sends member traffic out "
                "unencrypted, one that sets it sends other traffic into the tunnel",
                "change that rule to leave bits 0x60 alone: add its own bits "
                "(`meta mark set meta mark | 0x4000`) rather than assign a whole mark, and "
                f"mask what it clears; {listing}",
            )
        elif use.key == META_MARK:
            yield Finding(
                "nft-compares-mark-bits",
                "warning",
                f"another program's nftables rule compares packet mark bits {bits:#x}, which "
                f"kubespan sets: {use.where}",
                f"kubespan sets {MARK_TUNNEL:#x} on packets to members and WireGuard sets "
                f"{MARK_WIREGUARD:#x} on its own: a rule comparing the whole mark (`meta mark "
                "0x4000`) no longer matches those packets",
                "if it is meant to recognise kubespan's packets, nothing; otherwise compare "
                f"only its own bits (`meta mark & 0x4000 == 0x4000`); {listing}",
            )
        elif use.key == CT_MARK and use.sets:
            yield Finding(
                "nft-changes-ct-mark-bits",
                "warning",
                f"another program's nftables rule can change connection mark bits {bits:#x}: "
                f"{use.where}",
                f"a rule that restores the connection mark onto packets (`meta mark set ct "
                f"mark`) then puts bits kubespan uses ({MARK_TUNNEL:#x}: into the tunnel, "
                f"{MARK_WIREGUARD:#x}: WireGuard's own) on packets they do not belong to",
                f"keep that program's connection marks outside bits 0x60; {listing}",
            )
