"""The service's durable state: snapshots (written atomically, off the event loop, streamed)
and the epoch file. A damaged snapshot is set aside, loudly, and the service starts empty.

Snapshot (format 2), one JSON document:

    {"format": 2, "epoch": E, "clean": true|false, "written_at": T,
     "clusters": {CID: {"revision": R, "affiliates": {AID: {"data": B64, "endpoints": [B64],
                  "expires_at": T, "harvested": [[B64, T, REPORTER, T]]}}}},
     "nonces": [[CID, NONCE, FORGET_AT]]}

`clean` is true only in the snapshot written at a clean stop; the first thing a starting
service does is write it again as unclean, so a crash is always recognised. Format 1 (the
first release's hex snapshots) is still read.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubespan import boundedjson
from kubespan.discovery import limits
from kubespan.discovery.protocol import BadRequest, check_id
from kubespan.discovery.state import AffiliateRecord, Harvested, Quotas, Registry
from kubespan.fsutil import atomic_write, atomic_write_chunks, ensure_private_dir

log = logging.getLogger(__name__)

SNAPSHOT_FILE = "discovery-state.json"
EPOCH_FILE = "discovery-epoch"
FORMAT = 2
# Epochs derived from the clock (seconds since late 2023) keep revisions under 2**53 for
# about 17 years; they cover a service without a state directory.
CLOCK_EPOCH_ORIGIN = 1_700_000_000
NonceEntry = tuple[str, str, float]


class StateDirError(Exception):
    """The state directory cannot be used; the message says why, in one line."""


@dataclass(frozen=True)
class View:
    """What a snapshot holds, captured on the event loop (records are immutable, so this is a
    consistent copy made of references) and encoded elsewhere."""

    epoch: int
    clean: bool
    written_at: float
    clusters: tuple[tuple[str, int, tuple[tuple[str, AffiliateRecord], ...]], ...]
    nonces: tuple[NonceEntry, ...]


@dataclass(frozen=True)
class Restored:
    registry: Registry
    clean: bool
    nonces: tuple[NonceEntry, ...]
    epoch: int  # the highest epoch any earlier run may have used
    found: bool = True  # False: there was no snapshot (a first start)


def clock_epoch(now: float) -> int:
    return max(1, int(now) - CLOCK_EPOCH_ORIGIN)


def capture(registry: Registry, nonces: list[NonceEntry], clean: bool, now: float) -> View:
    clusters = tuple(
        (cid, cluster.revision, tuple(cluster.affiliates.items()))
        for cid, cluster in registry.clusters.items()
    )
    return View(registry.epoch, clean, now, clusters, tuple(nonces))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _record_document(record: AffiliateRecord) -> dict[str, Any]:
    return {
        "data": _b64(record.data),
        "endpoints": [_b64(e) for e in record.endpoints],
        "expires_at": record.expires_at,
        "harvested": [
            [_b64(blob), h.expires_at, h.reporter, h.added_at] for blob, h in record.harvested
        ],
    }


def encode(view: View) -> Iterator[bytes]:
    """The snapshot as a stream of small pieces: each is quick to make, so the thread that
    writes it hands the interpreter back to the event loop often."""
    head = {"format": FORMAT, "epoch": view.epoch, "clean": view.clean}
    yield json.dumps(head)[:-1].encode() + b',"written_at":%r,"clusters":{' % view.written_at
    for index, (cid, revision, records) in enumerate(view.clusters):
        parts = [f'{"," if index else ""}{json.dumps(cid)}:{{"revision":{revision},"affiliates":{{']
        for number, (aid, record) in enumerate(records):
            comma = "," if number else ""
            parts.append(f"{comma}{json.dumps(aid)}:{json.dumps(_record_document(record))}")
            if len(parts) >= 64:
                yield "".join(parts).encode()
                parts = []
        parts.append("}}")
        yield "".join(parts).encode()
    yield b'},"nonces":' + json.dumps([list(n) for n in view.nonces]).encode() + b"}"


def save(view: View, state_dir: Path) -> None:
    """Write the snapshot atomically; safe to run in a worker thread."""
    atomic_write_chunks(state_dir / SNAPSHOT_FILE, encode(view), mode=0o600)


def check_state_dir(state_dir: Path) -> None:
    """Create the state directory if needed; StateDirError when it cannot be used."""
    if state_dir.exists() and not state_dir.is_dir():
        raise StateDirError(f"{state_dir} exists and is not a directory")
    try:
        ensure_private_dir(state_dir)
    except OSError as error:
        raise StateDirError(f"{state_dir}: cannot create: {error.strerror}") from None


def read_epoch(state_dir: Path) -> int:
    try:
        text = (state_dir / EPOCH_FILE).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return 0
    except (OSError, UnicodeDecodeError) as error:
        log.error("EPOCH FILE UNREADABLE file=%s error=%s", state_dir / EPOCH_FILE, error)
        return 0
    if not text.isdigit() or len(text) > 12:
        log.error("EPOCH FILE IS CORRUPT file=%s", state_dir / EPOCH_FILE)
        return 0
    return int(text)


def write_epoch(state_dir: Path, epoch: int) -> None:
    atomic_write(state_dir / EPOCH_FILE, f"{epoch}\n".encode(), mode=0o600)


def load(state_dir: Path, now: float, quotas: Quotas | None = None) -> Restored:
    """The state saved in `state_dir` (an empty, unclean one when there is none)."""
    epoch_on_disk = read_epoch(state_dir)
    path = state_dir / SNAPSHOT_FILE
    empty = Restored(Registry(quotas=quotas), False, (), epoch_on_disk)
    try:
        if path.stat().st_size > limits.MAX_SNAPSHOT_BYTES:
            raise ValueError(f"is larger than {limits.MAX_SNAPSHOT_BYTES} bytes")
        raw = path.read_bytes()
    except FileNotFoundError:
        return Restored(empty.registry, False, (), epoch_on_disk, found=False)
    except ValueError as error:
        _set_aside(path, error)
        return empty
    except OSError as error:
        raise StateDirError(f"{path}: cannot read: {error.strerror}") from None
    try:
        document = boundedjson.loads(raw, limits.MAX_SNAPSHOT_BYTES, limits.MAX_SNAPSHOT_DEPTH)
        restored = from_document(document, now, quotas)
    except ValueError as error:
        _set_aside(path, error)
        return empty
    restored = Restored(
        restored.registry, restored.clean, restored.nonces, max(restored.epoch, epoch_on_disk)
    )
    registry = restored.registry
    log.info(
        "restored snapshot file=%s clusters=%d affiliates=%d clean=%s",
        path,
        len(registry.clusters),
        registry.affiliate_count(),
        "yes" if restored.clean else "no",
    )
    return restored


def _set_aside(path: Path, error: Exception) -> None:
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    try:
        path.rename(aside)
    except OSError as rename_error:
        raise StateDirError(
            f"{path} is corrupt ({error}) and cannot be set aside: {rename_error.strerror}"
        ) from None
    log.error(
        "SNAPSHOT IS CORRUPT, starting empty; the damaged file was kept for inspection "
        "file=%s kept=%s error=%s",
        path,
        aside,
        error,
    )


def from_document(document: Any, now: float, quotas: Quotas | None = None) -> Restored:
    """Rebuild from a snapshot document; ValueError when anything is malformed."""
    if not isinstance(document, dict):
        raise ValueError("not a snapshot")
    version = document.get("format", document.get("version"))
    if version not in (1, FORMAT):
        raise ValueError(f"unknown snapshot format {version!r}")
    blob = _hex if version == 1 else _base64
    clusters = _mapping(document.get("clusters"), "clusters")
    epoch = _int(document.get("epoch", 0), "epoch")
    registry = Registry(quotas=quotas)
    for cid, raw_cluster in clusters.items():
        _check_id(cid)
        cluster = _mapping(raw_cluster, f"cluster {cid}")
        revision = _int(cluster.get("revision"), f"{cid}.revision")
        records: dict[str, AffiliateRecord] = {}
        for aid, raw in _mapping(cluster.get("affiliates"), f"{cid}.affiliates").items():
            _check_id(aid)
            record = _record(raw, blob, f"{cid}/{aid}")
            if record.expires_at > now:
                records[aid] = record
        if records:
            registry.restore(cid, revision, records)
    clean = document.get("clean") is True and version == FORMAT
    nonces: list[NonceEntry] = []
    if clean:
        for entry in _list(document.get("nonces", []), "nonces"):
            if not (
                isinstance(entry, list)
                and len(entry) == 3
                and isinstance(entry[0], str)
                and isinstance(entry[1], str)
            ):
                raise ValueError("nonces holds a malformed entry")
            nonces.append((entry[0], entry[1], _time(entry[2])))
    return Restored(registry, clean, tuple(nonces), epoch)


def _record(raw: Any, blob: Any, name: str) -> AffiliateRecord:
    try:
        harvested = tuple(
            (blob(item[0]), Harvested(_time(item[1]), str(item[2]), _time(item[3])))
            for item in raw.get("harvested", [])
        )
        return AffiliateRecord(
            data=blob(raw["data"]),
            endpoints=tuple(blob(e) for e in raw["endpoints"]),
            expires_at=_time(raw["expires_at"]),
            harvested=harvested,
        )
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, binascii.Error):
        raise ValueError(f"affiliate {name} is malformed") from None


def _time(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e11:
        raise ValueError("not a time")
    return float(value)


def _hex(value: Any) -> bytes:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return bytes.fromhex(value)


def _base64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return base64.b64decode(value, validate=True)


def _check_id(value: Any) -> None:
    if not isinstance(value, str):
        raise ValueError("an id is not a string")
    try:
        check_id("id", value)
    except BadRequest:
        raise ValueError(f"id {value[:40]!r} is malformed") from None


def _mapping(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{name} is not a mapping")
    return value


def _list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{name} is not a list")
    return value


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} is not a non-negative integer")
    return value
