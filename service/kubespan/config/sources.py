"""Where a node's machine config comes from, in order of precedence, and the last good copy.

At start the agent asks each source in turn; the first that has a config decides:

1. a URL on the kernel command line, `kubespan.config=https://...` (fetched with retries for a
   bounded time; the operator's choice for this boot)
2. QEMU fw_cfg entry `opt/org.kubespan/machineconfig` (the platform's user data)
3. a config drive: a file system labelled `KUBESPAN` holding `machineconfig.yaml`
4. the local file `/etc/kubespan/machineconfig.yaml` (baked into an image, or written by hand)

A valid config from that source replaces the last good copy kept on the state partition
(`/var/lib/kubespan/machineconfig.yaml`); an invalid one is reported, problem by problem, and
the node keeps running with the last good copy; when no source has a config (a reboot without
the platform's data), the last good copy is used.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kubespan.config import MachineConfig, parse_config
from kubespan.errors import ConfigError, Problem
from kubespan.fsutil import atomic_write, ensure_private_dir

log = logging.getLogger(__name__)

STORE_FILE = "machineconfig.yaml"
CMDLINE_KEY = "kubespan.config"
FW_CFG_PATH = Path("/sys/firmware/qemu_fw_cfg/by_name/opt/org.kubespan/machineconfig/raw")
CONFIG_DRIVE_LABEL = "KUBESPAN"
CONFIG_DRIVE_FILE = "machineconfig.yaml"
LOCAL_FILE = Path("/etc/kubespan/machineconfig.yaml")
URL_WAIT_SECONDS = 60.0


class SourceUnavailable(Exception):
    """A source that should have a config could not deliver it (e.g. the URL stayed down)."""


@dataclass(frozen=True)
class Source:
    """One place a config may come from. `fetch` returns None when the source has nothing."""

    label: str
    fetch: Callable[[], bytes | None]


@dataclass(frozen=True)
class Resolved:
    config: MachineConfig
    raw: bytes
    origin: str


def read_file(path: Path) -> Callable[[], bytes | None]:
    def fetch() -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise SourceUnavailable(f"cannot read {path}: {error.strerror}") from None

    return fetch


def cmdline_url(cmdline: str) -> str | None:
    for word in cmdline.split():
        key, sep, value = word.partition("=")
        if key == CMDLINE_KEY and sep:
            return value
    return None


def fetch_url(
    url: str,
    wait: float = URL_WAIT_SECONDS,
    get: Callable[[str], bytes] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> bytes:
    """GET `url`, retrying with backoff until it answers or `wait` seconds have passed."""
    getter = get or _http_get
    deadline = monotonic() + wait
    delay = 0.5
    while True:
        try:
            return getter(url)
        except SourceUnavailable as error:
            if monotonic() + delay > deadline:
                raise SourceUnavailable(f"{url}: gave up after {wait:g}s: {error}") from None
            log.warning(
                "config URL not reachable yet url=%s retry_in=%.1fs error=%s", url, delay, error
            )
            sleep(delay)
            delay = min(delay * 2, 10.0)


def _http_get(url: str) -> bytes:
    import requests

    try:
        response = requests.get(url, timeout=(5, 15))
    except requests.RequestException as error:
        raise SourceUnavailable(f"{type(error).__name__}: {error}") from None
    if response.status_code != 200:
        raise SourceUnavailable(f"HTTP {response.status_code}")
    return response.content


def read_config_drive(device: Path, runtime_dir: Path) -> bytes | None:
    """Mount the config drive read-only in a private directory and read the config file."""
    if not device.exists():
        return None
    runtime_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=runtime_dir, prefix="config-drive-") as mountpoint:
        mount = ["mount", "-o", "ro,nosuid,nodev,noexec", str(device), mountpoint]
        result = subprocess.run(mount, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SourceUnavailable(f"cannot mount {device}: {result.stderr.strip()}")
        try:
            return read_file(Path(mountpoint) / CONFIG_DRIVE_FILE)()
        finally:
            subprocess.run(["umount", mountpoint], capture_output=True, check=False)


def platform_sources(runtime_dir: Path, cmdline: str | None = None) -> list[Source]:
    """The sources of this OS image, in order of precedence."""
    if cmdline is None:
        with contextlib.suppress(OSError):
            cmdline = Path("/proc/cmdline").read_text()
    sources = []
    url = cmdline_url(cmdline or "")
    if url:
        sources.append(Source(url, lambda: fetch_url(url)))
    sources.append(Source("fw_cfg:opt/org.kubespan/machineconfig", read_file(FW_CFG_PATH)))
    drive = Path("/dev/disk/by-label") / CONFIG_DRIVE_LABEL
    sources.append(
        Source(
            f"config drive {CONFIG_DRIVE_LABEL}:{CONFIG_DRIVE_FILE}",
            lambda: read_config_drive(drive, runtime_dir),
        )
    )
    sources.append(Source(str(LOCAL_FILE), read_file(LOCAL_FILE)))
    return sources


def store_path(state_dir: Path) -> Path:
    return state_dir / STORE_FILE


def resolve(sources: list[Source], state_dir: Path) -> Resolved:
    """The config this boot runs with; ConfigError when there is none at all."""
    store = store_path(state_dir)
    for source in sources:
        try:
            raw = source.fetch()
        except SourceUnavailable as error:
            log.error("config source failed source=%s error=%s", source.label, error)
            break
        if raw is None:
            continue
        try:
            config = parse_config(raw, source.label)
        except ConfigError as error:
            for problem in error.problems:
                log.error("invalid machine config: %s", problem)
            log.error(
                "the config from %s is invalid; keeping the last good config %s",
                source.label,
                store,
            )
            break
        _keep(store, raw, source.label)
        return Resolved(config, raw, source.label)
    else:
        log.info("no config source has a machine config; using the last good config %s", store)
    try:
        raw = store.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            [
                Problem(
                    str(store),
                    None,
                    "",
                    "no machine config: no source had a valid one and there is no last good copy",
                )
            ]
        ) from None
    return Resolved(parse_config(raw, str(store)), raw, str(store))


def _keep(store: Path, raw: bytes, origin: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if store.read_bytes() == raw:
            return
    ensure_private_dir(store.parent)
    atomic_write(store, raw, mode=0o600)
    log.info("machine config from %s kept as the last good config %s", origin, store)
