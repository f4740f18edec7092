"""What this node keeps on its state partition between runs: the last known members (so that
a node booting while discovery is down rebuilds its mesh) and the version of its own last
record (so that its versions keep increasing across restarts).

Both are files of mode 0600, written atomically. They are read as hostile input: a member in
the cache goes through the same checks as one from discovery; a damaged cache is set aside
with one clear error and the node starts without it, never with a traceback.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from kubespan import boundedjson
from kubespan.discovery.payload import (
    MAX_RECORD_VERSION,
    decode_record,
    encode_record,
    parse_address,
)
from kubespan.fsutil import atomic_write, ensure_private_dir
from kubespan.netaddr import Endpoint
from kubespan.plan.membership import Departed, Known, Membership

log = logging.getLogger(__name__)

PEERS_FILE = "peers.json"
VERSION_FILE = "record-version.json"
CACHE_FORMAT = 1
MAX_CACHE_BYTES = 32 * 1024 * 1024


def cache_document(membership: Membership, cluster: str) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "cluster": cluster,
        "members": [
            {
                "record": json.loads(encode_record(known.record)),
                "hints": [str(e) for e in known.hints],
            }
            for _, known in sorted(membership.known.items())
        ],
        "departed": {
            node: {
                "public_key": d.public_key,
                "version": d.version,
                "forget_after": d.forget_after,
                "was_member": d.was_member,
            }
            for node, d in sorted(membership.departed.items())
        },
    }


def parse_cache(document: Any, cluster: str) -> Membership:
    """The membership a cache document holds; ValueError naming what is wrong."""
    if not isinstance(document, dict) or document.get("format") != CACHE_FORMAT:
        raise ValueError(f"not a peer cache of format {CACHE_FORMAT}")
    if document.get("cluster") != cluster:
        raise ValueError("written for another cluster")
    members = document.get("members")
    departed = document.get("departed")
    if not isinstance(members, list) or not isinstance(departed, dict):
        raise ValueError("members is not a list or departed is not a mapping")
    known: dict[str, Known] = {}
    for index, item in enumerate(members):
        if not isinstance(item, dict) or not isinstance(item.get("hints"), list):
            raise ValueError(f"members[{index}] is malformed")
        try:
            record = decode_record(json.dumps(item.get("record")).encode())
            hints = tuple(_hint(h) for h in item["hints"][:16])
        except ValueError as error:
            raise ValueError(f"members[{index}]: {error}") from None
        known[record.info.node_id] = Known(record, hints)
    gone: dict[str, Departed] = {}
    for node, item in departed.items():
        if not isinstance(item, dict):
            raise ValueError(f"departed[{node!r}] is malformed")
        key = item.get("public_key")
        if not isinstance(key, str):
            raise ValueError(f"departed[{node!r}] is malformed")
        was_member = item.get("was_member", True)
        if not isinstance(was_member, bool):
            raise ValueError(f"departed[{node!r}] is malformed")
        gone[str(node)] = Departed(
            key, _count(item, "version"), _count(item, "forget_after"), was_member
        )
    return Membership(known, gone)


def _count(document: dict[str, Any], name: str) -> int:
    value = document.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 63:
        raise ValueError(f"{name} is not a non-negative integer")
    return value


def _hint(text: Any) -> Endpoint:
    if not isinstance(text, str) or len(text) > 64 or "%" in text:
        raise ValueError("a hint is not an endpoint")
    endpoint = Endpoint.parse(text)
    parse_address(str(endpoint.address), "hints")
    return endpoint


def save_membership(state_dir: Path, membership: Membership, cluster: str) -> None:
    ensure_private_dir(state_dir)
    data = json.dumps(cache_document(membership, cluster), separators=(",", ":")).encode()
    atomic_write(state_dir / PEERS_FILE, data, mode=0o600)


def load_membership(state_dir: Path, cluster: str) -> Membership | None:
    """The cached membership, or None when there is none (or none usable: said once, and a
    damaged file is kept aside for inspection)."""
    path = state_dir / PEERS_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        log.error("cannot read the peer cache file=%s error=%s", path, error.strerror)
        return None
    try:
        return parse_cache(boundedjson.loads(raw, MAX_CACHE_BYTES), cluster)
    except ValueError as error:
        if "another cluster" in str(error):
            log.info("peer cache is of another cluster; not used file=%s", path)
            return None
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        try:
            path.rename(aside)
        except OSError:
            aside = path
        log.error(
            "peer cache is damaged, starting without it file=%s kept=%s error=%s",
            path,
            aside,
            error,
        )
        return None


class VersionCounter:
    """Versions of this node's records: strictly increasing, also across restarts and clock
    steps back (the last one is persisted before it is used), and near the wall clock in
    milliseconds, so a node whose state was restored from an old backup still moves ahead."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / VERSION_FILE
        self.last = self._load()

    def _load(self) -> int:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as error:
            log.error(
                "cannot read the record version file=%s error=%s; continuing from the clock",
                self.path,
                error.strerror,
            )
            return 0
        try:
            document = boundedjson.loads(raw, 4096)
            if not isinstance(document, dict):
                raise ValueError("not a JSON object")
            return _count(document, "version")
        except ValueError as error:
            log.error(
                "record version file is damaged, continuing from the clock file=%s error=%s",
                self.path,
                error,
            )
            return 0

    def next(self, wall_now: float) -> int:
        version = min(max(self.last + 1, int(wall_now * 1000)), MAX_RECORD_VERSION)
        if version == self.last:
            log.error("record versions are exhausted file=%s; remove it", self.path)
        try:
            ensure_private_dir(self.path.parent)
            atomic_write(self.path, json.dumps({"version": version}).encode(), mode=0o600)
        except OSError as error:
            log.error(
                "cannot persist the record version file=%s error=%s; versions may repeat "
                "after a restart if the clock also steps back",
                self.path,
                error.strerror,
            )
        self.last = version
        return version
