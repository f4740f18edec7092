"""The status document the agent publishes each pass, and how `kubespan status` prints it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubespan.fsutil import atomic_write
from kubespan.model import AffiliateInfo, PeerState
from kubespan.netaddr import Endpoint
from kubespan.plan.desired import PeerReport

STATUS_FILE = "status.json"


def status_document(
    info: AffiliateInfo,
    endpoints: tuple[Endpoint, ...],
    reports: tuple[PeerReport, ...],
    discovery: list[dict[str, Any]],
    ready: bool,
    now: float,
    warnings: tuple[str, ...] = (),
    last_error: str | None = None,
    nat: dict[str, Any] | None = None,
    state_since: dict[str, float] | None = None,
    pid: int | None = None,
    relay: dict[str, Any] | None = None,
    relay_names: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The document `kubespan status --json` prints: its shape is STATUS_SCHEMA's.
    `relay`: what this node relays for others, when it offers to; `relay_names`: the names
    of the relays its record gives round trips to (node id -> name)."""
    names = relay_names or {}
    since = state_since or {}
    return {
        "version": 1,
        "pid": pid,
        "updated_at": now,
        "ready": ready,
        "last_error": last_error,
        "warnings": list(warnings),
        "node": {
            "name": info.hostname,
            "node_id": info.node_id,
            "public_key": info.public_key,
            "ula": str(info.ula),
            "addresses": [str(a) for a in info.addresses],
            "endpoints": [str(e) for e in endpoints],
            # What STUN says of the WireGuard port: {"mapped": [...], "mapping": ...}.
            "nat": nat or {"mapped": [], "mapping": "unknown", "reflectors": []},
            "relay": relay,
            "relays": [
                {"name": names.get(node_id, node_id), "node_id": node_id, "rtt_ms": ms}
                for node_id, ms in info.relay_rtts
            ],
        },
        "peers": [
            {
                "name": r.name,
                "node_id": r.node_id,
                "public_key": r.public_key,
                "state": r.state.value,
                "state_since": since.get(r.public_key),
                "endpoint": str(r.endpoint) if r.endpoint else None,
                "last_handshake": r.last_handshake,
                "rx_bytes": r.rx_bytes,
                "tx_bytes": r.tx_bytes,
                "refused": list(r.refused),
                "why": r.why,
                "relay": r.relay,
                "candidates": [
                    {
                        "endpoint": str(c.endpoint),
                        "kind": c.kind.value,
                        "reason": c.reason,
                        # Seconds since it last answered a path check; None: it has not.
                        "path_check_answered_s": _rounded(r.answered_ago.get(c.endpoint)),
                    }
                    for c in r.candidates
                ],
            }
            for r in sorted(reports, key=lambda r: (r.name, r.public_key))
        ],
        "discovery": discovery,
    }


class LazyStatus:
    """One pass's status, made into the document the first time something asks for it (the
    status socket, metrics, the status file), then kept. An idle pass that nobody asks about
    builds none: with a hundred peers the document and its encoding were a third of an idle
    pass. `build` must read only what the pass has finished with (immutable values), since
    whichever thread asks first builds it."""

    def __init__(self, build: Callable[[], dict[str, Any]]) -> None:
        self._build: Callable[[], dict[str, Any]] | None = build
        self._lock = threading.Lock()
        self._document: dict[str, Any] | None = None
        self._encoded: bytes | None = None
        self._failed: Exception | None = None  # what building raised: raised again, not retried

    @classmethod
    def of(cls, document: dict[str, Any]) -> LazyStatus:
        return cls(lambda: document)

    def document(self) -> dict[str, Any]:
        """The document (shared: read it, never change it)."""
        with self._lock:
            if self._failed is not None:
                raise self._failed
            if self._document is None:
                assert self._build is not None
                try:
                    self._document = self._build()
                except Exception as error:
                    self._failed = error
                    raise
                self._build = None
            return self._document

    def encoded(self) -> bytes:
        document = self.document()
        with self._lock:
            if self._encoded is None:
                self._encoded = encode_status(document)
            return self._encoded


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def encode_status(document: dict[str, Any]) -> bytes:
    # Compact: the C encoder (indent would take the pure-Python one, a third of an idle
    # pass with a hundred peers); `kubespan status --json` indents what it prints.
    return json.dumps(document, separators=(",", ":")).encode()


def write_status_file(runtime_dir: Path, encoded: bytes) -> None:
    """Write the status file (the fallback when no agent answers)."""
    # In /run: never synced (it is gone at boot anyway).
    try:
        atomic_write(runtime_dir / STATUS_FILE, encoded, mode=0o644, durable=False)
    except FileNotFoundError:  # the directory, made at the first write (or removed since)
        runtime_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(runtime_dir / STATUS_FILE, encoded, mode=0o644, durable=False)


def printable(value: Any, limit: int = 200) -> str:
    """Text from peers or services made safe for a terminal: control characters (escape
    sequences could clear the screen or draw fake lines) are shown escaped, never sent."""
    text = str(value)[:limit]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _age(then: float | None, now: float) -> str:
    if not then:
        return "never"
    seconds = max(0, int(now - then))
    if seconds < 120:
        return f"{seconds}s ago"
    return f"{seconds // 60}m ago"


def _bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"


def _nat_line(nat: dict[str, Any]) -> str:
    mapped = ", ".join(printable(e) for e in nat.get("mapped", [])) or "(not learned)"
    return (
        f"  NAT mapping of the WireGuard port: {mapped}, {printable(nat.get('mapping', 'unknown'))}"
    )


def render_status(document: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    node = document["node"]
    lines = [
        f"node {printable(node['name'])}  {printable(node['ula'])}  "
        f"key {printable(node['public_key'])}",
        f"  endpoints: {', '.join(printable(e) for e in node['endpoints']) or '(none)'}",
        _nat_line(node.get("nat") or {}),
        f"  status updated {_age(document['updated_at'], now)}, "
        f"{'ready' if document.get('ready') else 'starting'}",
    ]
    relay = node.get("relay")
    if isinstance(relay, dict):
        lines.append(
            f"  relays for members on ports {printable(relay.get('ports'))}: "
            f"{len(relay.get('pairs', []))} pairs"
        )
        for pair in relay.get("pairs", []):
            sent = pair.get("bytes")
            lines.append(
                f"    {printable(pair.get('first'))} <-> {printable(pair.get('second'))}  "
                f"{_bytes(sent if isinstance(sent, int) else 0)}"
            )
    timed = [r for r in node.get("relays", []) if isinstance(r, dict)]
    if timed:
        lines.append(
            "  round trips to relays: "
            + ", ".join(
                f"{printable(r.get('name'), 64)} {printable(r.get('rtt_ms'))} ms" for r in timed
            )
        )
    if document.get("last_error"):
        lines.append(f"  last error: {printable(document['last_error'], 400)}")
    for source in document.get("discovery", []):
        error = f"  error: {printable(source['last_error'])}" if source.get("last_error") else ""
        lines.append(
            f"  discovery {printable(source['url'])}: revision {source['revision']}, "
            f"public address {printable(source['public_address'])}{error}"
        )
    for warning in document.get("warnings", []):
        lines.append(f"  warning: {printable(warning, 400)}")
    peers = document["peers"]
    up = sum(1 for p in peers if p["state"] == PeerState.UP.value)
    lines.append(f"peers: {len(peers)} ({up} up)")
    header = ("NAME", "STATE", "ENDPOINT", "HANDSHAKE", "RX", "TX", "PUBLIC KEY")
    rows = [header] + [
        (
            printable(p["name"], 64),
            printable(p["state"]) + (f" via {printable(p['relay'], 64)}" if p.get("relay") else ""),
            printable(p["endpoint"] or "-"),
            _age(p["last_handshake"], now),
            _bytes(p["rx_bytes"]),
            _bytes(p["tx_bytes"]),
            printable(p["public_key"]),
        )
        for p in peers
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    for peer in peers:
        if peer.get("why"):
            lines.append(f"  {printable(peer['name'], 64)}: {printable(peer['why'])}")
        for index, candidate in enumerate(peer.get("candidates", []), 1):
            answered = candidate.get("path_check_answered_s")
            checked = (
                f" (answered a path check {answered:.1f} s ago)"
                if isinstance(answered, int | float)
                else ""
            )
            lines.append(
                f"    {index}. {printable(candidate['endpoint'])} "
                f"{printable(candidate['kind'])}: {printable(candidate['reason'])}{checked}"
            )
        for refusal in peer.get("refused", []):
            lines.append(f"  refused: {printable(refusal, 400)}")
    return "\n".join(lines)
