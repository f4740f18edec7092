"""The relay's forwarding applied: the nftables table of relay.forward, replaced whole in
one transaction (a batch that fails leaves the previous table as it was). The rules are
stateless, so there are no conntrack flows to clean up when a pair changes or goes."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from kubespan.apply.libnft import Nft
from kubespan.errors import ApplyError
from kubespan.relay.forward import (
    RELAY_FAMILY,
    RELAY_TABLE,
    RelaySpec,
    counter_name,
    teardown_batch,
)

MAX_LISTING_BYTES = 4 << 20


class RelayForwarder:
    """Owns table inet kubespan_relay in this network namespace. `apply` and `teardown` are
    called from one thread; `sent_bytes` may be called from another (its own context)."""

    def __init__(self, nft: Nft | None = None) -> None:
        self._nft = nft or Nft()
        self._applied: str | None = None  # the fingerprint in the kernel; None: not known
        self._reader: Nft | None = None
        self._reading = threading.Lock()

    def close(self) -> None:
        self._nft.close()
        with self._reading:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def sent_bytes(self) -> dict[int, int]:
        """Bytes each side sent through the relay since the table was last replaced, by the
        relay port it sends to; empty when there is no table."""
        with self._reading:
            if self._reader is None:
                self._reader = Nft(counters_json=True)
            try:
                listing = self._reader.run(f"list counters table {RELAY_FAMILY} {RELAY_TABLE}")
            except ApplyError:
                return {}
        return parse_counters(listing)

    def apply(self, spec: RelaySpec) -> bool:
        """Forward exactly `spec`'s pairs; whether the kernel's table had to change."""
        if spec.fingerprint == self._applied:
            return False
        self._applied = None  # unknown until the transaction has gone through
        self._nft.run(spec.batch())
        self._applied = spec.fingerprint
        return True

    def teardown(self) -> None:
        """Remove the table, if there is one."""
        self._applied = None
        self._nft.run(teardown_batch())


IPV4_FORWARDING = Path("/proc/sys/net/ipv4/ip_forward")


def enable_ipv4_forwarding(path: Path = IPV4_FORWARDING) -> bool:
    """Let the kernel forward IPv4 (a relay forwards between its pairs' sides; a Kubernetes
    node forwards for its pods anyway); whether it was off before."""
    if path.read_text().strip() == "1":
        return False
    path.write_text("1\n")
    return True


def parse_counters(listing: str) -> dict[int, int]:
    """Bytes by relay port from `nft -j list counters` output; what is not one of our side
    counters, or not well formed, is skipped (the kernel's table can be changed by others)."""
    if len(listing) > MAX_LISTING_BYTES:
        return {}
    try:
        document: Any = json.loads(listing)
    except ValueError:
        return {}
    items = document.get("nftables") if isinstance(document, dict) else None
    out: dict[int, int] = {}
    for item in items if isinstance(items, list) else []:
        counter = item.get("counter") if isinstance(item, dict) else None
        if not isinstance(counter, dict) or counter.get("table") != RELAY_TABLE:
            continue
        name, sent = counter.get("name"), counter.get("bytes")
        if not isinstance(name, str) or not isinstance(sent, int) or sent < 0:
            continue
        port = name.removeprefix("side_")
        if port.isdigit() and counter_name(int(port)) == name:
            out[int(port)] = sent
    return out
