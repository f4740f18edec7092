"""Which rules of other programs' nftables tables change or read mark bits: from the JSON
listing (`nft -j -t list ruleset`), pure.

A statement that sets a mark is judged by the bits it can change: `meta mark set meta mark
| 0x4000` changes 0x4000 only, `... & 0xffffff9f` clears 0x60, and a whole value (`meta mark
set 0x539`), a map or any other expression may change every bit. A mark that is read is
judged by the bits it is compared on: `meta mark & 0x60 == 0x40` reads 0x60, `meta mark
0x4000` (and a map or set keyed by the mark) all 32. Only uses touching the bits asked about
are kept, so a listing of thousands of rules yields a handful of values. Legacy iptables
rules (`xt` expressions) do not show their values and are passed over.

The listing is the kernel's, written by libnftables, but judged as untrusted: anything of an
unexpected shape is skipped, names are cut short, and at most MAX_USES uses are kept.
"""

from __future__ import annotations

from typing import Any

from kubespan.diagnose.facts import CT_MARK, META_MARK, MarkUse

ALL_BITS = 0xFFFFFFFF
MAX_USES = 64
MAX_NAME = 64  # nftables allows 256; more than this adds nothing to a finding
ARITHMETIC = ("&", "|", "^")


def mark_key(node: Any) -> str | None:
    """META_MARK or CT_MARK when `node` is that expression (either JSON spelling)."""
    if not isinstance(node, dict) or len(node) != 1:
        return None
    for name, key in (("meta", META_MARK), ("ct", CT_MARK)):
        inner = node.get(name)
        if inner == "mark" or (isinstance(inner, dict) and inner.get("key") == "mark"):
            return key
    return None


def _constant(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= ALL_BITS:
        return value
    return None


def changed_bits(value: Any, key: str) -> int:
    """The bits of mark `key` that setting it to `value` can change."""
    if mark_key(value) == key:
        return 0
    if isinstance(value, dict) and len(value) == 1:
        ((op, operands),) = value.items()
        if op in ARITHMETIC and isinstance(operands, list) and len(operands) == 2:
            constant = _constant(operands[1])
            if constant is not None:
                inner = changed_bits(operands[0], key)
                return inner | (~constant & ALL_BITS if op == "&" else constant)
    return ALL_BITS


def _reads(node: Any, found: list[tuple[str, bool, int]], skip: str | None = None) -> None:
    """Every mark read in `node`, with the bits compared. `skip`: a mark that is the value
    being changed (`meta mark` in `meta mark set meta mark | 1`), not a read."""
    key = mark_key(node)
    if key is not None:
        if key != skip:
            found.append((key, False, ALL_BITS))
        return
    if isinstance(node, list):
        for item in node:
            _reads(item, found)
        return
    if not isinstance(node, dict):
        return
    if len(node) == 1:
        ((op, operands),) = node.items()
        if op in ARITHMETIC and isinstance(operands, list) and len(operands) == 2:
            inner, constant = mark_key(operands[0]), _constant(operands[1])
            if op == "&" and inner is not None and constant is not None:
                if inner != skip:
                    found.append((inner, False, constant))
                return
            _reads(operands[0], found, skip)  # still the value being changed, if it was
            _reads(operands[1], found)
            return
    for child in node.values():
        _reads(child, found)


def statement_uses(statement: Any) -> list[tuple[str, bool, int]]:
    """(key, sets, bits) for each mark one statement sets or reads."""
    found: list[tuple[str, bool, int]] = []
    mangle = statement.get("mangle") if isinstance(statement, dict) else None
    if isinstance(mangle, dict):
        key = mark_key(mangle.get("key"))
        if key is not None:
            found.append((key, True, changed_bits(mangle.get("value"), key)))
            _reads(mangle.get("value"), found, skip=key)
            return found
    _reads(statement, found)
    return found


def _name(value: Any) -> str | None:
    return value[:MAX_NAME] if isinstance(value, str) and value else None


def _hooks(items: list[Any]) -> dict[tuple[str, str, str], str]:
    """'hook, priority N' of each base chain, by (family, table, chain)."""
    hooks = {}
    for item in items:
        chain = item.get("chain") if isinstance(item, dict) else None
        if not isinstance(chain, dict):
            continue
        family, table, name = (_name(chain.get(k)) for k in ("family", "table", "name"))
        hook, priority = _name(chain.get("hook")), chain.get("prio")
        if family and table and name and hook:
            shown = f", priority {priority}" if isinstance(priority, int | str) else ""
            hooks[(family, table, name)] = f"{hook}{shown}"[:MAX_NAME]
    return hooks


def mark_uses(listing: Any, ours: tuple[str, str], bits: int) -> tuple[tuple[MarkUse, ...], bool]:
    """The uses of mark `bits` by rules outside table `ours` (family, name), in listing
    order; and whether more than MAX_USES were found (the rest left out)."""
    items = listing.get("nftables") if isinstance(listing, dict) else None
    if not isinstance(items, list):
        raise ValueError("not an nftables JSON listing")
    hooks = _hooks(items)
    uses: dict[MarkUse, None] = {}
    for item in items:
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict) or not isinstance(rule.get("expr"), list):
            continue
        family, table, chain = (_name(rule.get(k)) for k in ("family", "table", "chain"))
        if not (family and table and chain) or (family, table) == ours:
            continue
        handle = _constant(rule.get("handle"))
        per_key: dict[tuple[str, bool], int] = {}
        for statement in rule["expr"]:
            for key, sets, changed in statement_uses(statement):
                if changed & bits:
                    per_key[(key, sets)] = per_key.get((key, sets), 0) | changed
        for (key, sets), changed in per_key.items():
            hook = hooks.get((family, table, chain))
            uses[MarkUse(family, table, chain, handle, hook, key, sets, changed)] = None
            if len(uses) > MAX_USES:
                return tuple(list(uses)[:MAX_USES]), True
    return tuple(uses), False
