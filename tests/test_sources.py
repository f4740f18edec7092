"""Config sources: precedence, last good copy, invalid or missing sources."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kubespan.config.sources import (
    Source,
    cmdline_url,
    fetch_url,
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
