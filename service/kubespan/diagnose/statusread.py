"""What `kubespan check` takes from the live agent's status document (pure): the agent's
state, each discovery service as the agent sees it, and the peers' current endpoints.

The document comes over a root-only socket, yet it is read like anything untrusted: its size
and nesting are bounded, every field is type-checked and cut short, numbers must be finite
and in range, and what does not fit is left out rather than believed.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from typing import Any

from kubespan import boundedjson
from kubespan.diagnose.facts import AgentState, DiscoverySeen, endpoint_order
from kubespan.netaddr import Endpoint

MAX_STATUS_BYTES = 16 * 1024 * 1024  # 1,024 peers with their candidates fit many times
MAX_STATUS_DEPTH = 8  # the document is 5 deep
MAX_SERVICES = 16
MAX_ENDPOINTS = 1024
MAX_URL = 256
MAX_ERROR = 400
MAX_SKEW = 10 * 365 * 86400.0  # further off than this, the figure itself is broken
PLACEHOLDERS: tuple[AgentState, ...] = ("starting", "disabled")


@dataclass(frozen=True)
class AgentReport:
    state: AgentState
    detail: str  # why the state is "unreadable"; "" otherwise
    discovery: tuple[DiscoverySeen, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()


def _text(value: Any, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def _number(value: Any, bound: float) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number) and abs(number) <= bound:
            return number
    return None


def _address(value: Any) -> str | None:
    text = _text(value, 64)
    try:
        return str(ipaddress.ip_address(text)) if text else None
    except ValueError:
        return None


def _service(entry: Any) -> DiscoverySeen | None:
    if not isinstance(entry, dict):
        return None
    url = _text(entry.get("url"), MAX_URL)
    if not url:
        return None
    return DiscoverySeen(
        url=url,
        last_error=_text(entry.get("last_error"), MAX_ERROR) or None,
        public_address=_address(entry.get("public_address")),
        clock_skew=_number(entry.get("clock_skew_s"), MAX_SKEW),
        answered=_number(entry.get("last_answer"), math.inf) is not None,
    )


def _endpoint(peer: Any) -> Endpoint | None:
    text = _text(peer.get("endpoint"), 64) if isinstance(peer, dict) else None
    try:
        endpoint = Endpoint.parse(text) if text else None
    except ValueError:
        return None
    if endpoint is None or endpoint.address.is_unspecified or endpoint.address.is_multicast:
        return None
    return endpoint


def _listed(value: Any, limit: int) -> list[Any]:
    return value[:limit] if isinstance(value, list) else []


def read_report(raw: bytes) -> AgentReport:
    """The agent's report from the bytes it served."""
    try:
        document = boundedjson.loads(raw, MAX_STATUS_BYTES, MAX_STATUS_DEPTH)
    except ValueError as error:
        return AgentReport("unreadable", f"its status {error}")
    if not isinstance(document, dict):
        return AgentReport("unreadable", "its status is not a JSON object")
    agent = document.get("agent")
    for placeholder in PLACEHOLDERS:
        if agent == placeholder:
            return AgentReport(placeholder, "")
    if not isinstance(document.get("node"), dict):
        return AgentReport("unreadable", "its status has no node")
    services = (_service(e) for e in _listed(document.get("discovery"), MAX_SERVICES))
    endpoints = (_endpoint(p) for p in _listed(document.get("peers"), MAX_ENDPOINTS))
    return AgentReport(
        "running",
        "",
        tuple(s for s in services if s is not None),
        tuple(sorted({e for e in endpoints if e is not None}, key=endpoint_order)),
    )
