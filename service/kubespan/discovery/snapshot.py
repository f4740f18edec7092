"""Save and restore the service state atomically; a damaged snapshot is set aside, loudly."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from kubespan.discovery.state import Registry
from kubespan.fsutil import atomic_write, ensure_private_dir

log = logging.getLogger(__name__)

SNAPSHOT_FILE = "discovery-state.json"


def save(registry: Registry, state_dir: Path) -> None:
    ensure_private_dir(state_dir)
    data = json.dumps(registry.to_snapshot(), separators=(",", ":")).encode()
    atomic_write(state_dir / SNAPSHOT_FILE, data, mode=0o600)


def load(state_dir: Path, now: float) -> Registry:
    path = state_dir / SNAPSHOT_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Registry()
    try:
        registry = Registry.from_snapshot(json.loads(raw), now)
    except (ValueError, UnicodeDecodeError) as error:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        path.rename(aside)
        log.error(
            "SNAPSHOT IS CORRUPT, starting empty; the damaged file was kept for inspection "
            "file=%s kept=%s error=%s",
            path,
            aside,
            error,
        )
        return Registry()
    log.info(
        "restored snapshot file=%s clusters=%d affiliates=%d revision=%d",
        path,
        len(registry.clusters),
        registry.affiliate_count(),
        registry.revision,
    )
    return registry
