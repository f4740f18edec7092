"""Cloud platform sources: DMI detection, each metadata service's answers, deadlines, bounds,
cloud-init drives, and their place among the config sources. All traffic goes to loopback."""

from __future__ import annotations

import base64
import contextlib
import gzip
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kubespan.config import sources
from kubespan.config.platforms import (
    AZURE_USER_DATA_PATH,
    EC2_SESSION_PATH,
    EC2_USER_DATA_PATH,
    GCE_USER_DATA_PATH,
    OPENSTACK_USER_DATA_PATH,
    USER_DATA_LIMIT,
    Dmi,
    MetadataService,
    Platform,
    decode_user_data,
    detect_platform,
    fetch_user_data,
    metadata_address,
    read_dmi,
)
from kubespan.config.sources import (
    Source,
    SourceLocations,
    mount_read_only,
    platform_sources,
    read_cloud_drive,
    read_file,
    read_from_volume,
    resolve,
    store_path,
)
from kubespan.errors import SourceUnavailable

VALID_OFF = b"machine: {network: {kubespan: {enabled: false}}}\n"
VALID_MTU = b"machine: {network: {kubespan: {enabled: false, mtu: 1400}}}\n"
INVALID = b"machine:\n  network:\n    kubespan:\n      mtu: 10\n"
AZURE_TAG = "7783-7084-3265-9085-8269-3286-77"
GOOGLE = (("Metadata-Flavor", "Google"),)
SESSION = "AQAEAFake-session-token=="


# --- a loopback metadata service -----------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    content_length: bool = True  # without it the body ends when the connection closes


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Script:
    """Replies per (method, path), in turn; the last one repeats. Anything else is a 404."""

    replies: dict[tuple[str, str], list[Reply]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, method: str, path: str, *replies: Reply) -> None:
        with self.lock:
            self.replies[(method, path)] = list(replies)

    def next(self, seen: Seen) -> Reply:
        with self.lock:
            self.seen.append(seen)
            queue = self.replies.get((seen.method, seen.path))
            if not queue:
                return Reply(404)
            return queue.pop(0) if len(queue) > 1 else queue[0]


class MetadataServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), MetadataHandler)
        self.script = Script()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def service(self, wait: float = 5.0) -> MetadataService:
        # Generous for a service that answers (a loaded test machine); the deadline tests
        # use their own short ones.
        return MetadataService(self.url, wait, wait / 2)

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that stops reading an oversized body is what some tests do


class MetadataHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self._answer()

    def do_PUT(self) -> None:
        self._answer()

    def _answer(self) -> None:
        assert isinstance(self.server, MetadataServer)
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
        reply = self.server.script.next(seen)
        self.send_response(reply.status)
        for name, value in reply.headers:
            self.send_header(name, value)
        if reply.content_length:
            self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def metadata() -> Iterator[MetadataServer]:
    server = MetadataServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def closed_after(sock: socket.socket, seconds: float) -> Iterator[None]:
    """Close `sock` after `seconds` even if the code under test ignores its deadline, so a
    broken deadline fails the timing assertion instead of hanging the test run."""
    done = threading.Event()

    def closer() -> None:
        done.wait(seconds)
        sock.close()

    thread = threading.Thread(target=closer, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@pytest.fixture
def silent_url() -> Iterator[str]:
    """Accepts connections (the kernel's backlog) and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    with closed_after(listener, 10):
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A port that is bound but not listening: every connection is refused."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{bound.getsockname()[1]}"


@pytest.fixture
def trickling_url() -> Iterator[str]:
    """Answers one header byte every 50 ms, for 6 s: each read succeeds in time, the whole
    answer never does."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()

    def trickle() -> None:
        with contextlib.suppress(OSError):
            connection, _ = listener.accept()
            with connection:
                connection.sendall(b"HTTP/1.0 200 OK\r\nX-Slow: ")
                for _ in range(120):
                    if stop.wait(0.05):
                        return
                    connection.sendall(b"a")

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()
        thread.join()


def ec2_answers(server: MetadataServer, *user_data: Reply) -> None:
    server.script.answer("PUT", EC2_SESSION_PATH, Reply(200, SESSION.encode()))
    server.script.answer("GET", EC2_USER_DATA_PATH, *user_data)


# --- detection -----------------------------------------------------------------------------


def write_dmi(directory: Path, **values: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in values.items():
        (directory / name).write_text(value + "\n")
    return directory


@pytest.mark.parametrize(
    ("values", "platform"),
    [
        ({"sys_vendor": "Amazon EC2", "product_name": "m7g.large"}, Platform.EC2),
        (
            {"sys_vendor": "Xen", "product_name": "HVM domU", "bios_version": "4.11.amazon"},
            Platform.EC2,
        ),
        ({"bios_vendor": "Amazon EC2", "sys_vendor": ""}, Platform.EC2),
        ({"sys_vendor": "Google", "product_name": "Google Compute Engine"}, Platform.GCE),
        ({"product_name": "Google Compute Engine"}, Platform.GCE),
        # A coreboot Chromebook: Google's vendor string, not GCE.
        ({"sys_vendor": "Google", "product_name": "Lazor"}, None),
        (
            {"sys_vendor": "Microsoft Corporation", "chassis_asset_tag": AZURE_TAG},
            Platform.AZURE,
        ),
        # Hyper-V outside Azure: same vendor, another asset tag.
        ({"sys_vendor": "Microsoft Corporation", "chassis_asset_tag": "None"}, None),
        ({"product_name": "OpenStack Nova"}, Platform.OPENSTACK),
        ({"product_name": "OpenStack Compute"}, Platform.OPENSTACK),
        ({"sys_vendor": "OpenStack Foundation"}, Platform.OPENSTACK),
        ({"chassis_asset_tag": "OpenTelekomCloud"}, Platform.OPENSTACK),
        ({"sys_vendor": "QEMU", "product_name": "Standard PC (Q35 + ICH9, 2009)"}, None),
        ({"sys_vendor": "Dell Inc.", "product_name": "PowerEdge R650"}, None),
        ({}, None),
    ],
)
def test_platform_from_dmi(
    tmp_path: Path, values: dict[str, str], platform: Platform | None
) -> None:
    assert detect_platform(read_dmi(write_dmi(tmp_path / "dmi", **values))) is platform


def test_no_dmi_at_all_is_no_platform(tmp_path: Path) -> None:
    assert read_dmi(tmp_path / "absent") == Dmi()
    assert detect_platform(read_dmi(tmp_path / "absent")) is None


def test_dmi_fields_are_read_bounded(tmp_path: Path) -> None:
    dmi = read_dmi(write_dmi(tmp_path / "dmi", sys_vendor="Amazon EC2" + " " * 10_000 + "x"))
    assert dmi.sys_vendor == "Amazon EC2"


# --- each platform's metadata service ------------------------------------------------------


def test_ec2_imdsv2_session_then_user_data(metadata: MetadataServer) -> None:
    ec2_answers(metadata, Reply(200, VALID_MTU))
    assert fetch_user_data(Platform.EC2, metadata.service()) == VALID_MTU
    put, get = metadata.script.seen
    assert (put.method, put.path) == ("PUT", EC2_SESSION_PATH)
    assert put.headers["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"
    assert (get.method, get.path) == ("GET", EC2_USER_DATA_PATH)
    assert get.headers["x-aws-ec2-metadata-token"] == SESSION


def test_ec2_without_user_data(metadata: MetadataServer) -> None:
    ec2_answers(metadata, Reply(404, b"Not Found"))
    assert fetch_user_data(Platform.EC2, metadata.service()) is None


def test_ec2_refused_token_is_an_error(metadata: MetadataServer) -> None:
    ec2_answers(metadata, Reply(401, b"Unauthorized"))
    with pytest.raises(SourceUnavailable, match=r"refused the session token \(HTTP 401\)"):
        fetch_user_data(Platform.EC2, metadata.service())
    assert [seen.method for seen in metadata.script.seen] == ["PUT", "GET"]  # not retried


def test_ec2_without_a_session_is_an_error(metadata: MetadataServer) -> None:
    metadata.script.answer("PUT", EC2_SESSION_PATH, Reply(403, b"Forbidden"))
    with pytest.raises(SourceUnavailable, match="token request was answered HTTP 403"):
        fetch_user_data(Platform.EC2, metadata.service())


def test_ec2_garbage_token_is_never_sent(metadata: MetadataServer) -> None:
    metadata.script.answer("PUT", EC2_SESSION_PATH, Reply(200, b"abc\r\nX-Evil: 1"))
    with pytest.raises(SourceUnavailable, match="without a usable token"):
        fetch_user_data(Platform.EC2, metadata.service())
    assert [seen.method for seen in metadata.script.seen] == ["PUT"]


def test_gce_user_data(metadata: MetadataServer) -> None:
    metadata.script.answer("GET", GCE_USER_DATA_PATH, Reply(200, VALID_MTU, GOOGLE))
    assert fetch_user_data(Platform.GCE, metadata.service()) == VALID_MTU
    (seen,) = metadata.script.seen
    assert seen.headers["metadata-flavor"] == "Google"


def test_gce_without_user_data(metadata: MetadataServer) -> None:
    metadata.script.answer("GET", GCE_USER_DATA_PATH, Reply(404, b"", GOOGLE))
    assert fetch_user_data(Platform.GCE, metadata.service()) is None


@pytest.mark.parametrize("status", [200, 404])
def test_gce_answer_without_the_flavor_header_is_not_gce(
    metadata: MetadataServer, status: int
) -> None:
    metadata.script.answer("GET", GCE_USER_DATA_PATH, Reply(status, VALID_MTU))
    with pytest.raises(SourceUnavailable, match="not GCE's metadata server"):
        fetch_user_data(Platform.GCE, metadata.service())


def test_azure_user_data_is_base64(metadata: MetadataServer) -> None:
    encoded = base64.b64encode(VALID_MTU)
    metadata.script.answer("GET", AZURE_USER_DATA_PATH, Reply(200, encoded))
    assert fetch_user_data(Platform.AZURE, metadata.service()) == VALID_MTU
    (seen,) = metadata.script.seen
    assert seen.path == "/metadata/instance/compute/userData?api-version=2021-01-01&format=text"
    assert seen.headers["metadata"] == "true"


def test_azure_empty_user_data_is_none(metadata: MetadataServer) -> None:
    metadata.script.answer("GET", AZURE_USER_DATA_PATH, Reply(200, b""))
    assert fetch_user_data(Platform.AZURE, metadata.service()) is None


@pytest.mark.parametrize("body", [b"bWFjaGluZTog%%%", b"bWFjaGluZ", b"machine: {}"])
def test_azure_bad_base64_is_an_error(metadata: MetadataServer, body: bytes) -> None:
    metadata.script.answer("GET", AZURE_USER_DATA_PATH, Reply(200, body))
    with pytest.raises(SourceUnavailable, match="userData is not valid base64"):
        fetch_user_data(Platform.AZURE, metadata.service())


def test_openstack_metadata_user_data(metadata: MetadataServer) -> None:
    metadata.script.answer("GET", OPENSTACK_USER_DATA_PATH, Reply(200, VALID_MTU))
    assert fetch_user_data(Platform.OPENSTACK, metadata.service()) == VALID_MTU
    metadata.script.answer("GET", OPENSTACK_USER_DATA_PATH, Reply(404))
    assert fetch_user_data(Platform.OPENSTACK, metadata.service()) is None


def test_a_busy_service_is_asked_again_within_the_deadline(metadata: MetadataServer) -> None:
    metadata.script.answer(
        "GET", OPENSTACK_USER_DATA_PATH, Reply(503, b"busy"), Reply(200, VALID_MTU)
    )
    assert fetch_user_data(Platform.OPENSTACK, metadata.service()) == VALID_MTU
    assert len(metadata.script.seen) == 2


def test_user_data_that_is_not_utf8_is_an_error(metadata: MetadataServer) -> None:
    ec2_answers(metadata, Reply(200, b"machine: \xff\xfe\n"))
    with pytest.raises(SourceUnavailable, match=r"not UTF-8 text \(byte 0xff at offset 9\)"):
        fetch_user_data(Platform.EC2, metadata.service())


def test_gzipped_user_data_is_decompressed(metadata: MetadataServer) -> None:
    ec2_answers(metadata, Reply(200, gzip.compress(VALID_MTU)))
    assert fetch_user_data(Platform.EC2, metadata.service()) == VALID_MTU


@pytest.mark.parametrize("content_length", [True, False])
def test_oversized_answer_is_an_error(metadata: MetadataServer, content_length: bool) -> None:
    body = b"#" * (USER_DATA_LIMIT + 1)
    ec2_answers(metadata, Reply(200, body, content_length=content_length))
    with pytest.raises(SourceUnavailable, match=f"larger than {USER_DATA_LIMIT} bytes"):
        fetch_user_data(Platform.EC2, metadata.service())


def test_user_data_at_the_limit_is_read_whole(metadata: MetadataServer) -> None:
    body = b"#" * (USER_DATA_LIMIT - 1) + b"\n"
    ec2_answers(metadata, Reply(200, body, content_length=False))
    assert fetch_user_data(Platform.EC2, metadata.service()) == body


def test_a_silent_service_costs_only_its_deadline(silent_url: str) -> None:
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match=r"no usable answer within 1s \(last: timed out\)"):
        fetch_user_data(Platform.GCE, MetadataService(silent_url, 1.0, 0.5))
    assert time.monotonic() - started < 3


def test_a_trickling_service_costs_only_its_deadline(trickling_url: str) -> None:
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="no usable answer within 1s"):
        fetch_user_data(Platform.OPENSTACK, MetadataService(trickling_url, 1.0, 1.0))
    assert time.monotonic() - started < 3


def test_a_refused_connection_is_an_error_within_the_deadline(refused_url: str) -> None:
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="ConnectionRefusedError"):
        fetch_user_data(Platform.AZURE, MetadataService(refused_url, 1.0, 0.5))
    assert time.monotonic() - started < 3


def test_metadata_address_is_an_ip_literal() -> None:
    assert metadata_address("http://169.254.169.254") == ("169.254.169.254", 80)
    assert metadata_address("http://[fd00:ec2::254]:8080/") == ("fd00:ec2::254", 8080)
    for wrong in ("http://metadata.google.internal", "https://169.254.169.254", "http://1.2.3.4/x"):
        with pytest.raises(ValueError, match="metadata URL must be"):
            metadata_address(wrong)


# --- user data, pure -----------------------------------------------------------------------


def test_decode_user_data() -> None:
    assert decode_user_data(VALID_OFF) == VALID_OFF
    assert decode_user_data(b"") is None
    assert decode_user_data(b"\n  \n") is None
    assert decode_user_data(gzip.compress(b"")) is None
    assert decode_user_data(gzip.compress(VALID_OFF)) == VALID_OFF
    with pytest.raises(SourceUnavailable, match="larger than 100 bytes uncompressed"):
        decode_user_data(gzip.compress(b"#" * 101), limit=100)
    with pytest.raises(SourceUnavailable, match="truncated"):
        decode_user_data(gzip.compress(VALID_OFF)[:-12])
    with pytest.raises(SourceUnavailable, match="not valid gzip"):
        decode_user_data(b"\x1f\x8b\x00garbage")


def test_files_are_read_bounded(tmp_path: Path) -> None:
    path = tmp_path / "machineconfig.yaml"
    path.write_bytes(b"#" * 101)
    with pytest.raises(SourceUnavailable, match="larger than 100 bytes"):
        read_file(path, limit=100)()
    path.write_bytes(b"#" * 100)
    assert read_file(path, limit=100)() == b"#" * 100


def test_read_file_refuses_what_is_not_a_regular_file_without_blocking(tmp_path: Path) -> None:
    """A FIFO would block the boot for ever; a device would be read as a config."""
    fifo = tmp_path / "user-data"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="not a regular file"):
        read_file(fifo)()
    assert time.monotonic() - started < 2.0
    with pytest.raises(SourceUnavailable, match="not a regular file"):
        read_file(Path("/dev/null"))()


def test_a_symlink_on_a_drive_is_not_followed_but_a_local_one_is(tmp_path: Path) -> None:
    host_file = tmp_path / "host-secret"
    host_file.write_bytes(b"cluster: {}\n")
    link = tmp_path / "machineconfig.yaml"
    link.symlink_to(host_file)
    with pytest.raises(SourceUnavailable, match="symbolic link"):
        read_file(link, follow_symlinks=False)()
    assert read_file(link)() == b"cluster: {}\n"  # the operator's own /etc may use links


# --- among the sources ---------------------------------------------------------------------


@dataclass
class FakeMounts:
    """Stands in for mount(8): a 'device' is a directory, mounted where it is."""

    mounted: list[tuple[str, str | None]] = field(default_factory=list)

    @contextlib.contextmanager
    def __call__(self, device: Path, types: str | None, runtime_dir: Path) -> Iterator[Path]:
        self.mounted.append((device.name, types))
        yield device.resolve()


@dataclass(frozen=True)
class Machine:
    root: Path
    metadata_url: str

    @property
    def state(self) -> Path:
        return self.root / "state"

    def where(self, wait: float = 5.0) -> SourceLocations:
        return SourceLocations(
            fw_cfg=self.root / "fw_cfg" / "raw",
            dmi_dir=self.root / "dmi",
            by_label_dir=self.root / "by-label",
            local_file=self.root / "etc" / "machineconfig.yaml",
            metadata=MetadataService(self.metadata_url, wait, wait / 2),
        )

    def dmi(self, **values: str) -> None:
        write_dmi(self.root / "dmi", **values)

    def drive(self, label: str, files: dict[str, bytes]) -> None:
        content = self.root / "drives" / label
        for name, data in files.items():
            (content / name).parent.mkdir(parents=True, exist_ok=True)
            (content / name).write_bytes(data)
        (self.root / "by-label").mkdir(exist_ok=True)
        (self.root / "by-label" / label).symlink_to(content)

    def local(self, data: bytes) -> None:
        self.where().local_file.parent.mkdir(parents=True, exist_ok=True)
        self.where().local_file.write_bytes(data)


@pytest.fixture
def machine(tmp_path: Path, metadata: MetadataServer) -> Machine:
    return Machine(tmp_path, metadata.url)


def labels(machine: Machine, cmdline: str = "") -> list[str]:
    sources = platform_sources(machine.root / "run", cmdline, machine.where(), FakeMounts())
    return [source.label for source in sources]


def test_precedence_on_a_detected_cloud(machine: Machine) -> None:
    machine.dmi(sys_vendor="Amazon EC2")
    url = machine.metadata_url
    assert labels(machine, "ro kubespan.config=https://h/c.yaml") == [
        "https://h/c.yaml",
        "fw_cfg:opt/org.kubespan/machineconfig",
        f"EC2 user data {url}/latest/user-data",
        "OpenStack config drive config-2:openstack/latest/user_data",
        "NoCloud drive cidata:user-data",
        "config drive KUBESPAN:machineconfig.yaml",
        str(machine.where().local_file),
    ]
    machine.dmi(sys_vendor="OpenStack Foundation")
    assert labels(machine)[1:3] == [
        "OpenStack config drive config-2:openstack/latest/user_data",
        f"OpenStack user data {url}/openstack/latest/user_data",
    ]


def test_an_unknown_machine_asks_no_metadata_service(
    machine: Machine, metadata: MetadataServer
) -> None:
    machine.dmi(sys_vendor="QEMU")
    ec2_answers(metadata, Reply(200, VALID_MTU))
    machine.local(VALID_OFF)
    assert not any("user data http" in label for label in labels(machine))
    sources = platform_sources(machine.root / "run", "", machine.where(), FakeMounts())
    resolved = resolve(sources, machine.state)
    assert resolved.origin == str(machine.where().local_file)
    assert metadata.script.seen == []


def test_cloud_user_data_is_kept_as_the_last_good_config(
    machine: Machine, metadata: MetadataServer, caplog: pytest.LogCaptureFixture
) -> None:
    machine.dmi(sys_vendor="Amazon EC2")
    machine.local(VALID_OFF)
    ec2_answers(metadata, Reply(200, VALID_MTU))

    def run() -> tuple[str, int | None]:
        sources = platform_sources(machine.root / "run", "", machine.where(), FakeMounts())
        resolved = resolve(sources, machine.state)
        return resolved.origin, resolved.config.kubespan.mtu

    assert run() == (f"EC2 user data {metadata.url}/latest/user-data", 1400)
    assert store_path(machine.state).read_bytes() == VALID_MTU

    # Invalid user data: reported, and the last good config, not the local file, runs.
    ec2_answers(metadata, Reply(200, INVALID))
    assert run() == (str(store_path(machine.state)), 1400)
    assert "must be at least 1280, not 10" in caplog.text
    assert store_path(machine.state).read_bytes() == VALID_MTU

    # No user data at all: the next source (here the local file) decides.
    ec2_answers(metadata, Reply(404))
    assert run() == (str(machine.where().local_file), 1420)


def test_a_cloud_that_does_not_answer_is_one_error_and_the_last_good_config(
    tmp_path: Path, refused_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    machine = Machine(tmp_path, refused_url)
    machine.dmi(product_name="Google Compute Engine")
    machine.local(VALID_OFF)
    resolve([Source("an earlier boot", lambda: VALID_MTU)], machine.state)
    caplog.clear()
    started = time.monotonic()
    sources = platform_sources(tmp_path / "run", "", machine.where(wait=1.0), FakeMounts())
    resolved = resolve(sources, machine.state)
    assert time.monotonic() - started < 3
    assert (resolved.origin, resolved.config.kubespan.mtu) == (str(store_path(machine.state)), 1400)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].startswith(
        f"config source failed source=GCE user data {refused_url}/computeMetadata/"
    )
    assert "no usable answer within 1s (last: ConnectionRefusedError" in errors[0]


def test_openstack_config_drive_before_its_metadata_service(
    machine: Machine, metadata: MetadataServer
) -> None:
    machine.dmi(product_name="OpenStack Nova")
    machine.drive("config-2", {"openstack/latest/user_data": VALID_MTU})
    metadata.script.answer("GET", OPENSTACK_USER_DATA_PATH, Reply(200, VALID_OFF))
    mounts = FakeMounts()
    resolved = resolve(
        platform_sources(machine.root / "run", "", machine.where(), mounts), machine.state
    )
    assert resolved.origin == "OpenStack config drive config-2:openstack/latest/user_data"
    assert resolved.config.kubespan.mtu == 1400
    assert mounts.mounted == [("config-2", "iso9660,vfat")]
    assert metadata.script.seen == []


def test_openstack_drive_without_user_data_is_all_that_cloud_says(
    machine: Machine, metadata: MetadataServer
) -> None:
    machine.dmi(product_name="OpenStack Nova")
    machine.drive("config-2", {"openstack/latest/meta_data.json": b"{}"})
    metadata.script.answer("GET", OPENSTACK_USER_DATA_PATH, Reply(200, VALID_MTU))
    machine.local(VALID_OFF)
    resolved = resolve(
        platform_sources(machine.root / "run", "", machine.where(), FakeMounts()), machine.state
    )
    assert resolved.origin == str(machine.where().local_file)
    assert metadata.script.seen == []


def test_openstack_metadata_service_without_a_drive(
    machine: Machine, metadata: MetadataServer
) -> None:
    machine.dmi(chassis_asset_tag="OpenStack Nova")
    metadata.script.answer("GET", OPENSTACK_USER_DATA_PATH, Reply(200, VALID_MTU))
    resolved = resolve(
        platform_sources(machine.root / "run", "", machine.where(), FakeMounts()), machine.state
    )
    assert (
        resolved.origin == f"OpenStack user data {machine.metadata_url}/openstack/latest/user_data"
    )


def test_nocloud_drive_before_the_kubespan_drive_and_the_local_file(machine: Machine) -> None:
    machine.drive("CIDATA", {"user-data": gzip.compress(VALID_MTU), "meta-data": b""})
    machine.drive("KUBESPAN", {"machineconfig.yaml": VALID_OFF})
    machine.local(VALID_OFF)
    mounts = FakeMounts()
    resolved = resolve(
        platform_sources(machine.root / "run", "", machine.where(), mounts), machine.state
    )
    assert resolved.origin == "NoCloud drive cidata:user-data"
    assert resolved.config.kubespan.mtu == 1400
    assert mounts.mounted == [("CIDATA", "iso9660,vfat")]


def test_a_config_drive_user_data_that_is_not_utf8_is_one_line_and_skipped(
    machine: Machine, caplog: pytest.LogCaptureFixture
) -> None:
    """A drive found by its label may be anyone's: what cannot be read from it is reported
    and the sources after it are asked."""
    machine.drive("cidata", {"user-data": b"\xc3\x28"})
    machine.local(VALID_OFF)
    resolved = resolve(
        platform_sources(machine.root / "run", "", machine.where(), FakeMounts()),
        machine.state,
    )
    assert resolved.origin == str(machine.where().local_file)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        "config source skipped source=NoCloud drive cidata:user-data error=user data is not "
        "UTF-8 text (byte 0xc3 at offset 0); it must be the kubespan machine config YAML"
    ]


# --- the mount helper, with stand-ins for mount(8) and umount(8) on PATH ----------------------


def fake_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mount_script: str) -> Path:
    tools = tmp_path / "bin"
    tools.mkdir()
    log = tmp_path / "calls"
    for name, body in (("mount", mount_script), ("umount", "")):
        script = tools / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n{body}\n')
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    return log


def test_a_cloud_drive_is_mounted_read_only_as_iso9660_or_fat_and_unmounted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = fake_tools(tmp_path, monkeypatch, "exit 0")
    device = tmp_path / "by-label" / "cidata"
    device.parent.mkdir()
    device.write_bytes(b"")
    # Nothing is really mounted, so the user-data file is missing: no config, no error.
    assert (
        read_cloud_drive(device.parent, ("cidata",), "user-data", tmp_path / "run", mount_read_only)
        is None
    )
    mount, umount = calls.read_text().splitlines()
    mountpoint = mount.split()[-1]
    assert mount == (
        f"mount -o ro,nosuid,nodev,noexec,nosymfollow -t iso9660,vfat {device} {mountpoint}"
    )
    assert umount == f"umount {mountpoint}"
    assert Path(mountpoint).parent == tmp_path / "run"
    assert not Path(mountpoint).exists()


def test_a_drive_that_will_not_mount_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_tools(tmp_path, monkeypatch, 'echo "mount: wrong fs type, bad superblock" >&2; exit 32')
    device = tmp_path / "config-2"
    device.write_bytes(b"")
    with pytest.raises(SourceUnavailable, match=f"cannot mount {device}: mount: wrong fs type"):
        read_from_volume(device, "openstack/latest/user_data", tmp_path / "run")


def test_a_mount_that_hangs_ends_at_its_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_tools(tmp_path, monkeypatch, "exec sleep 30")
    monkeypatch.setattr(sources, "MOUNT_SECONDS", 0.5)
    device = tmp_path / "KUBESPAN"
    device.write_bytes(b"")
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match=r"took longer than 0\.5s"):
        read_from_volume(device, "machineconfig.yaml", tmp_path / "run")
    assert time.monotonic() - started < 5
