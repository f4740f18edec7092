"""The status document the agent publishes each pass, and how `kubespan status` prints it."""

from __future__ import annotations

import json
import time
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
) -> dict[str, Any]:
    return {
        "version": 1,
        "updated_at": now,
        "ready": ready,
        "node": {
            "name": info.hostname,
            "node_id": info.node_id,
            "public_key": info.public_key,
            "ula": str(info.ula),
            "addresses": [str(a) for a in info.addresses],
            "endpoints": [str(e) for e in endpoints],
        },
        "peers": [
            {
                "name": r.name,
                "node_id": r.node_id,
                "public_key": r.public_key,
                "state": r.state.value,
                "endpoint": str(r.endpoint) if r.endpoint else None,
                "last_handshake": r.last_handshake,
                "rx_bytes": r.rx_bytes,
                "tx_bytes": r.tx_bytes,
            }
            for r in sorted(reports, key=lambda r: (r.name, r.public_key))
        ],
        "discovery": discovery,
    }


def write_status(runtime_dir: Path, document: dict[str, Any]) -> None:
    runtime_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(runtime_dir / STATUS_FILE, json.dumps(document, indent=2).encode(), mode=0o644)


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


def render_status(document: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    node = document["node"]
    lines = [
        f"node {node['name']}  {node['ula']}  key {node['public_key']}",
        f"  endpoints: {', '.join(node['endpoints']) or '(none)'}",
        f"  status updated {_age(document['updated_at'], now)}, "
        f"{'ready' if document.get('ready') else 'starting'}",
    ]
    for source in document.get("discovery", []):
        error = f"  error: {source['last_error']}" if source.get("last_error") else ""
        lines.append(
            f"  discovery {source['url']}: revision {source['revision']}, "
            f"public address {source['public_address']}{error}"
        )
    peers = document["peers"]
    up = sum(1 for p in peers if p["state"] == PeerState.UP.value)
    lines.append(f"peers: {len(peers)} ({up} up)")
    header = ("NAME", "STATE", "ENDPOINT", "HANDSHAKE", "RX", "TX", "PUBLIC KEY")
    rows = [header] + [
        (
            p["name"],
            p["state"],
            p["endpoint"] or "-",
            _age(p["last_handshake"], now),
            _bytes(p["rx_bytes"]),
            _bytes(p["tx_bytes"]),
            p["public_key"],
        )
        for p in peers
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    return "\n".join(lines)
