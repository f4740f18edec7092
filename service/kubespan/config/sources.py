"""Where a node's machine config comes from, in order of precedence, and the last good copy.

At start the agent asks each source in turn; the first that has a config decides:

1. a URL on the kernel command line, `kubespan.config=https://...` (fetched with retries for a
   bounded time; the operator's choice for this boot)
2. QEMU fw_cfg entry `opt/org.kubespan/machineconfig` (the platform's user data)
3. the cloud's user data (see `platforms` for detection and format):
   a. EC2 (IMDSv2), GCE or Azure: the metadata service, when DMI names that cloud;
   b. an OpenStack config drive: a file system labelled `config-2` holding
      `openstack/latest/user_data`;
   c. OpenStack's metadata service, when DMI names OpenStack and there is no `config-2` drive
      (the drive, when there is one, is what that cloud says)
4. NoCloud: a file system labelled `cidata` (or `CIDATA`) holding `user-data`
5. a config drive: a file system labelled `KUBESPAN` holding `machineconfig.yaml`
6. the local file `/etc/kubespan/machineconfig.yaml` (baked into an image, or written by hand)

`platform_sources` is the one place that orders them. Every source is bounded in time (a
metadata service has 20 s in all, a mount 10 s) and in size (MAX_CONFIG_BYTES). A source with
nothing (no such drive, file or user data; a machine DMI does not name) is passed over in
silence; `cidata` and `config-2` drives are ISO 9660 or FAT, as cloud-init reads them.

A valid config from that source replaces the last good copy kept on the state partition
(`/var/lib/kubespan/machineconfig.yaml`); an invalid one is reported, problem by problem, and
the node keeps running with the last good copy. A source that should have a config but cannot
deliver it (the URL or a detected cloud's metadata service stays down, user data that is not
UTF-8) is one error line, and the node also keeps the last good copy rather than trying a
source of lower precedence. When no source has a config (a reboot without the platform's
data), the last good copy is used.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import logging
import os
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from kubespan.config import MachineConfig, parse_config
from kubespan.config.platforms import (
    DMI_DIR,
    MetadataService,
    Platform,
    decode_user_data,
    detect_platform,
    fetch_user_data,
    read_dmi,
    user_data_path,
)
from kubespan.config.yamlsource import MAX_CONFIG_BYTES
from kubespan.errors import ConfigError, Problem, SourceUnavailable
from kubespan.fsutil import atomic_write, ensure_private_dir

log = logging.getLogger(__name__)

STORE_FILE = "machineconfig.yaml"
CMDLINE_KEY = "kubespan.config"
FW_CFG_PATH = Path("/sys/firmware/qemu_fw_cfg/by_name/opt/org.kubespan/machineconfig/raw")
CONFIG_DRIVE_LABEL = "KUBESPAN"
CONFIG_DRIVE_FILE = "machineconfig.yaml"
LOCAL_FILE = Path("/etc/kubespan/machineconfig.yaml")
BY_LABEL_DIR = Path("/dev/disk/by-label")
NOCLOUD_LABELS = ("cidata", "CIDATA")
NOCLOUD_FILE = "user-data"
OPENSTACK_DRIVE_LABELS = ("config-2", "CONFIG-2")
OPENSTACK_DRIVE_FILE = "openstack/latest/user_data"
# Only the file systems cloud-init reads these drives as: a drive from the platform is no
# reason to let the kernel parse any file system it knows.
CLOUD_DRIVE_TYPES = "iso9660,vfat"
URL_WAIT_SECONDS = 60.0
MOUNT_SECONDS = 10.0


@dataclass(frozen=True)
class Source:
    """One place a config may come from. `fetch` returns None when the source has nothing."""

    label: str
    fetch: Callable[[], bytes | None]
    # A volume found by its label, which anyone who can attach a disk can make: one that
    # cannot be read is skipped, so that it cannot pin the node to its last good config.
    skippable: bool = False


@dataclass(frozen=True)
class Resolved:
    config: MachineConfig
    raw: bytes
    origin: str


def read_file(
    path: Path, limit: int = MAX_CONFIG_BYTES, follow_symlinks: bool = True
) -> Callable[[], bytes | None]:
    """Read a regular file of at most `limit` bytes. A FIFO or device there would block the
    boot (or read a host device): opened without blocking, and refused unless regular. On a
    drive someone else made, `follow_symlinks=False`: a link could point at any host file."""

    def fetch() -> bytes | None:
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
        if not follow_symlinks:
            flags |= os.O_NOFOLLOW
        try:
            descriptor = os.open(path, flags)
        except FileNotFoundError:
            return None
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise SourceUnavailable(f"{path} is a symbolic link: not followed") from None
            raise SourceUnavailable(f"cannot read {path}: {error.strerror}") from None
        with os.fdopen(descriptor, "rb") as handle:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                raise SourceUnavailable(f"{path} is not a regular file")
            try:
                raw = handle.read(limit + 1)
            except OSError as error:
                raise SourceUnavailable(f"cannot read {path}: {error.strerror}") from None
        if len(raw) > limit:
            raise SourceUnavailable(f"{path} is larger than {limit} bytes")
        return raw

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
    deadline = monotonic() + wait
    getter = get or (lambda address: http_get(address, deadline, monotonic))
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


def http_get(
    url: str,
    deadline: float,
    monotonic: Callable[[], float] = time.monotonic,
    limit: int = MAX_CONFIG_BYTES,
) -> bytes:
    """The body at `url` (http or https, certificates verified), at most `limit` bytes, read
    by `deadline` (monotonic clock): a server that trickles or never ends is given up on, not
    waited for. Redirects are not followed: the command line names the config's own address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SourceUnavailable("the config URL must be http:// or https://")

    def time_left() -> float:
        left = deadline - monotonic()
        if left <= 0:
            raise SourceUnavailable("the answer was not complete in time")
        return min(left, 15.0)

    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection = kind(parts.hostname, parts.port, timeout=time_left())
    except ValueError as error:  # a port that is not a number
        raise SourceUnavailable(str(error)) from None
    try:
        connection.request("GET", path, headers={"Connection": "close"})
        sock = connection.sock
        response = connection.getresponse()
        if response.status != 200:
            moved = " (redirects are not followed)" if 300 <= response.status < 400 else ""
            raise SourceUnavailable(f"HTTP {response.status}{moved}")
        body = bytearray()
        while True:
            if sock is not None:
                sock.settimeout(time_left())
            chunk = response.read1(65536)
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > limit:
                raise SourceUnavailable(f"the answer is larger than {limit} bytes")
            time_left()
    except TimeoutError:
        raise SourceUnavailable("the answer was not complete in time") from None
    except (OSError, http.client.HTTPException) as error:
        raise SourceUnavailable(f"{type(error).__name__}: {error}") from None
    finally:
        connection.close()


Mount = Callable[[Path, str | None, Path], AbstractContextManager[Path]]
"""(device, file system types or None for any, runtime dir) -> the mounted directory."""


@contextlib.contextmanager
def mount_read_only(device: Path, types: str | None, runtime_dir: Path) -> Iterator[Path]:
    """`device` mounted read-only (and nosuid, nodev, noexec) in a private directory for as
    long as the context lasts; SourceUnavailable when it will not mount within MOUNT_SECONDS."""
    runtime_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(
        dir=runtime_dir, prefix="config-drive-", ignore_cleanup_errors=True
    ) as mountpoint:
        # nosymfollow: no symbolic link on a drive someone else made leads off it.
        command = ["mount", "-o", "ro,nosuid,nodev,noexec,nosymfollow"]
        if types is not None:
            command += ["-t", types]
        command += [str(device), mountpoint]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, check=False, timeout=MOUNT_SECONDS
            )
        except subprocess.TimeoutExpired:
            _unmount(mountpoint)  # in case it got as far as mounting
            raise SourceUnavailable(
                f"mounting {device} took longer than {MOUNT_SECONDS:g}s"
            ) from None
        if result.returncode != 0:
            raise SourceUnavailable(f"cannot mount {device}: {result.stderr.strip()}")
        try:
            yield Path(mountpoint)
        finally:
            _unmount(mountpoint)


def _unmount(mountpoint: str) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        result = subprocess.run(
            ["umount", mountpoint], capture_output=True, check=False, timeout=MOUNT_SECONDS
        )
        if result.returncode == 0:
            return
    # Busy or stuck: detach it lazily rather than leave it mounted under the runtime directory.
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(
            ["umount", "--lazy", mountpoint],
            capture_output=True,
            check=False,
            timeout=MOUNT_SECONDS,
        )


def read_from_volume(
    device: Path,
    file: str,
    runtime_dir: Path,
    types: str | None = None,
    mount: Mount = mount_read_only,
) -> bytes | None:
    """`file` on the file system on `device`, mounted read-only for the read; None when there
    is no such device or file."""
    if not device.exists():
        return None
    with mount(device, types, runtime_dir) as mounted:
        return read_file(mounted / file, follow_symlinks=False)()


def labelled_device(by_label_dir: Path, labels: Sequence[str]) -> Path | None:
    """The first of the devices with one of `labels` that this machine has."""
    return next((by_label_dir / label for label in labels if (by_label_dir / label).exists()), None)


def read_cloud_drive(
    by_label_dir: Path, labels: Sequence[str], file: str, runtime_dir: Path, mount: Mount
) -> bytes | None:
    """The user data on a drive cloud-init would read (ISO 9660 or FAT, labelled one of
    `labels`), decoded as user data from a metadata service is; None without one."""
    device = labelled_device(by_label_dir, labels)
    if device is None:
        return None
    raw = read_from_volume(device, file, runtime_dir, CLOUD_DRIVE_TYPES, mount)
    return None if raw is None else decode_user_data(raw)


@dataclass(frozen=True)
class SourceLocations:
    """Where this machine keeps what the sources read; tests point them at stand-ins."""

    fw_cfg: Path = FW_CFG_PATH
    dmi_dir: Path = DMI_DIR
    by_label_dir: Path = BY_LABEL_DIR
    local_file: Path = LOCAL_FILE
    metadata: MetadataService = field(default_factory=MetadataService)


THIS_MACHINE = SourceLocations()


def platform_sources(
    runtime_dir: Path,
    cmdline: str | None = None,
    where: SourceLocations = THIS_MACHINE,
    mount: Mount = mount_read_only,
) -> list[Source]:
    """The sources of this OS image, in order of precedence (see the module docstring)."""
    if cmdline is None:
        with contextlib.suppress(OSError):
            cmdline = Path("/proc/cmdline").read_text()
    sources = []
    url = cmdline_url(cmdline or "")
    if url:
        sources.append(Source(url, lambda: fetch_url(url)))
    sources.append(Source("fw_cfg:opt/org.kubespan/machineconfig", read_file(where.fw_cfg)))
    platform = detect_platform(read_dmi(where.dmi_dir))
    if platform is not None:
        log.info("platform from DMI: %s", platform.value)
    sources.extend(_cloud_sources(platform, runtime_dir, where, mount))
    sources.append(
        Source(
            f"NoCloud drive {NOCLOUD_LABELS[0]}:{NOCLOUD_FILE}",
            lambda: read_cloud_drive(
                where.by_label_dir, NOCLOUD_LABELS, NOCLOUD_FILE, runtime_dir, mount
            ),
            skippable=True,
        )
    )
    drive = where.by_label_dir / CONFIG_DRIVE_LABEL
    sources.append(
        Source(
            f"config drive {CONFIG_DRIVE_LABEL}:{CONFIG_DRIVE_FILE}",
            lambda: read_from_volume(drive, CONFIG_DRIVE_FILE, runtime_dir, mount=mount),
            skippable=True,
        )
    )
    sources.append(Source(str(where.local_file), read_file(where.local_file)))
    return sources


def _cloud_sources(
    platform: Platform | None, runtime_dir: Path, where: SourceLocations, mount: Mount
) -> list[Source]:
    """The cloud's user data: its metadata service when DMI names EC2, GCE or Azure; an
    OpenStack config drive on any machine; OpenStack's metadata service when DMI names
    OpenStack and there is no such drive. A machine DMI does not name is never probed over
    the network (see `platforms`)."""
    sources = []
    if platform is not None and platform is not Platform.OPENSTACK:
        sources.append(_metadata_source(platform, where.metadata))
    sources.append(
        Source(
            f"OpenStack config drive {OPENSTACK_DRIVE_LABELS[0]}:{OPENSTACK_DRIVE_FILE}",
            lambda: read_cloud_drive(
                where.by_label_dir,
                OPENSTACK_DRIVE_LABELS,
                OPENSTACK_DRIVE_FILE,
                runtime_dir,
                mount,
            ),
            skippable=True,
        )
    )
    if platform is Platform.OPENSTACK:
        # A drive, when there is one, is all this cloud has to say: a cloud without a
        # metadata service must not cost a 20 s wait and the sources after this one.
        sources.append(
            _metadata_source(
                Platform.OPENSTACK,
                where.metadata,
                unless=lambda: (
                    labelled_device(where.by_label_dir, OPENSTACK_DRIVE_LABELS) is not None
                ),
            )
        )
    return sources


def _metadata_source(
    platform: Platform, service: MetadataService, unless: Callable[[], bool] = lambda: False
) -> Source:
    def fetch() -> bytes | None:
        return None if unless() else fetch_user_data(platform, service)

    return Source(f"{platform.value} user data {service.base_url}{user_data_path(platform)}", fetch)


def store_path(state_dir: Path) -> Path:
    return state_dir / STORE_FILE


def resolve(sources: list[Source], state_dir: Path) -> Resolved:
    """The config this boot runs with; ConfigError when there is none at all."""
    store = store_path(state_dir)
    for source in sources:
        try:
            raw = source.fetch()
        except SourceUnavailable as error:
            if source.skippable:
                log.warning("config source skipped source=%s error=%s", source.label, error)
                continue
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
