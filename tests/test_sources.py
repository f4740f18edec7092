"""Config sources: precedence, last good copy, invalid or missing sources."""

from __future__ import annotations

import http.server
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubespan.config.sources import (
    Source,
    cmdline_url,
    fetch_url,
    http_get,
    platform_sources,
    resolve,
    store_path,
)
from kubespan.errors import ConfigError, SourceUnavailable

VALID_OFF = b"machine: {network: {kubespan: {enabled: false}}}\n"
VALID_MTU = b"machine: {network: {kubespan: {enabled: false, mtu: 1400}}}\n"
INVALID = b"machine:\n  network:\n    kubespan:\n      mtu: 10\n"


def source(label: str, content: bytes | None) -> Source:
    return Source(label, lambda: content)


def failing(label: str) -> Source:
    def fetch() -> bytes | None:
        raise SourceUnavailable("down")

    return Source(label, fetch)


def test_first_source_with_a_config_wins_and_is_kept(tmp_path: Path) -> None:
    resolved = resolve(
        [source("url", None), source("fw_cfg", VALID_MTU), source("local", VALID_OFF)], tmp_path
    )
    assert resolved.origin == "fw_cfg"
    assert resolved.config.kubespan.mtu == 1400
    assert store_path(tmp_path).read_bytes() == VALID_MTU
    assert store_path(tmp_path).stat().st_mode & 0o777 == 0o600


def test_invalid_source_keeps_the_last_good_config(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    resolve([source("fw_cfg", VALID_MTU)], tmp_path)
    resolved = resolve([source("fw_cfg", INVALID), source("local", VALID_OFF)], tmp_path)
    assert resolved.origin == str(store_path(tmp_path))
    assert resolved.config.kubespan.mtu == 1400
    assert store_path(tmp_path).read_bytes() == VALID_MTU
    assert "fw_cfg:4: machine.network.kubespan.mtu: must be at least 1280, not 10" in caplog.text
    assert "keeping the last good config" in caplog.text


def test_no_source_uses_the_last_good_config(tmp_path: Path) -> None:
    resolve([source("fw_cfg", VALID_MTU)], tmp_path)
    resolved = resolve([source("fw_cfg", None)], tmp_path)
    assert resolved.config.kubespan.mtu == 1400


def test_unreachable_source_uses_the_last_good_config(tmp_path: Path) -> None:
    resolve([source("fw_cfg", VALID_MTU)], tmp_path)
    resolved = resolve([failing("url"), source("fw_cfg", VALID_OFF)], tmp_path)
    assert resolved.config.kubespan.mtu == 1400


def test_an_unreadable_drive_is_skipped_not_a_reason_to_stop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone who can attach a disk can label it cidata: one that will not mount must not
    pin the node to its last good config (or, with none, stop it)."""
    resolve([source("fw_cfg", VALID_MTU)], tmp_path)
    junk = Source("NoCloud drive cidata:user-data", failing("x").fetch, skippable=True)
    resolved = resolve([junk, source("local", VALID_OFF)], tmp_path)
    assert resolved.origin == "local"
    assert "config source skipped source=NoCloud drive cidata:user-data" in caplog.text
    # A source that is the platform's own (a URL, a metadata service) still stops the walk.
    resolved = resolve([failing("url"), source("local", VALID_MTU)], tmp_path)
    assert resolved.origin == str(store_path(tmp_path))


def test_the_drives_are_the_skippable_sources(tmp_path: Path) -> None:
    labels = {s.label: s.skippable for s in platform_sources(tmp_path, cmdline="")}
    skippable = sorted(label.split()[0] for label, skip in labels.items() if skip)
    assert skippable == ["NoCloud", "OpenStack", "config"], labels


def test_nothing_at_all_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve([source("fw_cfg", None)], tmp_path)
    assert "no machine config" in str(caught.value)
    with pytest.raises(ConfigError):
        resolve([source("fw_cfg", INVALID)], tmp_path)


def test_cmdline_url() -> None:
    assert cmdline_url("ro quiet kubespan.config=https://h/c.yaml x=1") == "https://h/c.yaml"
    assert cmdline_url("ro quiet") is None
    assert cmdline_url("kubespan.config") is None


def test_fetch_url_retries_until_the_deadline() -> None:
    clock = [0.0]
    attempts: list[float] = []

    def get(url: str) -> bytes:
        attempts.append(clock[0])
        if len(attempts) < 4:
            raise SourceUnavailable("connection refused")
        return b"config"

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    assert fetch_url("http://x", wait=60, get=get, sleep=sleep, monotonic=lambda: clock[0]) == (
        b"config"
    )
    assert attempts == [0.0, 0.5, 1.5, 3.5]


def test_fetch_url_gives_up(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    clock = [0.0]

    def get(url: str) -> bytes:
        raise SourceUnavailable("connection refused")

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    with pytest.raises(SourceUnavailable) as caught:
        fetch_url("http://x", wait=10, get=get, sleep=sleep, monotonic=lambda: clock[0])
    assert "gave up after 10s" in str(caught.value)
    assert clock[0] <= 10


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/huge":
            self.send_response(200)
            self.end_headers()
            for _ in range(40):  # 2.5 MiB, no Content-Length: only counting can stop it
                self.wfile.write(b"#" * 65536)
        elif self.path == "/trickle":
            self.send_response(200)
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"#")
                self.wfile.flush()
                time.sleep(0.1)
        else:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(VALID_OFF)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_get_reads_a_config(server: str) -> None:
    assert http_get(f"{server}/c.yaml", time.monotonic() + 10) == VALID_OFF


def test_http_get_stops_at_the_size_bound(server: str) -> None:
    with pytest.raises(SourceUnavailable, match="larger than 1048576 bytes"):
        http_get(f"{server}/huge", time.monotonic() + 10)


def test_http_get_gives_up_on_a_trickling_server(server: str) -> None:
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="not complete in time"):
        http_get(f"{server}/trickle", started + 1.0)
    assert time.monotonic() - started < 5  # the server would take 10 s
