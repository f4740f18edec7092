"""Following the config file without polling it: real inotify on temporary directories.

Every watcher here polls once an hour at most (unless inotify is made to fail), so a change
seen within seconds was told by inotify."""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kubespan import filewatch
from kubespan.agent.events import ConfigChanged
from kubespan.agent.supervisor import ConfigWatcher
from kubespan.filewatch import FileWatch, trace

HOUR = 3600.0
CONFIG = b"""
machine: {network: {kubespan: {enabled: %s}}}
cluster:
  id: 2ovbY4rZh1pLvfxV7jTN6m3H0M2bq1qnd4RA8r1SwyI=
  secret: QkmNnPyiu8Kq1yRyx3Vg6O7zQk7JgYtJXUVYf0gqW0g=
  discovery: {enabled: true, registries: {service: {endpoint: "http://127.0.0.1:9"}}}
"""
ON, OFF = CONFIG % b"true", CONFIG % b"false"


@contextmanager
def watching(
    path: Path, current: bytes, interval: float = HOUR
) -> Iterator[tuple[ConfigWatcher, queue.Queue[Any]]]:
    events: queue.Queue[Any] = queue.Queue()
    watcher = ConfigWatcher(path, current, events, interval=interval, backstop=HOUR)
    watcher.start()
    try:
        yield watcher, events
    finally:
        watcher.stop()
        watcher._thread.join(timeout=5)
        assert not watcher._thread.is_alive()


def next_change(events: queue.Queue[Any], timeout: float = 5.0) -> bytes:
    event = events.get(timeout=timeout)
    assert isinstance(event, ConfigChanged)
    return event.raw


def no_change(events: queue.Queue[Any], within: float = 1.0) -> None:
    with pytest.raises(queue.Empty):
        events.get(timeout=within)


def wait_watching(watcher: ConfigWatcher) -> None:
    """The watcher has its inotify watches (set up by its thread)."""
    deadline = time.monotonic() + 5
    while not watcher._watch.watching:
        assert time.monotonic() < deadline, "no inotify watch within 5 s"
        time.sleep(0.02)


def test_a_file_written_in_place_is_seen_at_once(tmp_path: Path) -> None:
    config = tmp_path / "machineconfig.yaml"
    config.write_bytes(ON)
    with watching(config, ON) as (watcher, events):
        wait_watching(watcher)
        config.write_bytes(OFF)
        assert next_change(events) == OFF
        config.write_bytes(ON)
        assert next_change(events) == ON


def test_a_file_replaced_by_rename_is_seen(tmp_path: Path) -> None:
    config = tmp_path / "machineconfig.yaml"
    config.write_bytes(ON)
    with watching(config, ON) as (watcher, events):
        wait_watching(watcher)
        staged = tmp_path / ".machineconfig.yaml.new"
        staged.write_bytes(OFF)
        staged.replace(config)
        assert next_change(events) == OFF


def test_a_half_written_file_is_read_once_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Writes still going on wake nobody: the file is read when it is closed, not before
    (a half-written config would be reported invalid)."""
    config = tmp_path / "machineconfig.yaml"
    config.write_bytes(ON)
    with watching(config, ON) as (watcher, events):
        wait_watching(watcher)
        with config.open("wb") as file:
            file.write(OFF[:40])
            file.flush()
            no_change(events)
            file.write(OFF[40:])
        assert next_change(events) == OFF
        no_change(events, 0.5)
    assert "invalid machine config" not in caplog.text


def test_a_symlinked_config_follows_its_target(tmp_path: Path) -> None:
    """A config linked from elsewhere (a configmap-style directory of versions): a target
    changed in its own directory, and the link pointed at another target, are both seen."""
    (tmp_path / "etc").mkdir()
    versions = tmp_path / "versions"
    versions.mkdir()
    first = versions / "v1.yaml"
    first.write_bytes(ON)
    config = tmp_path / "etc" / "machineconfig.yaml"
    config.symlink_to(first)
    assert trace(config).entries == {
        tmp_path / "etc": {"machineconfig.yaml"},
        versions: {"v1.yaml"},
    }
    with watching(config, ON) as (watcher, events):
        wait_watching(watcher)
        first.write_bytes(OFF)
        assert next_change(events) == OFF
        second = versions / "v2.yaml"
        second.write_bytes(ON)
        link = tmp_path / "etc" / ".link"
        link.symlink_to(second)
        link.replace(config)
        assert next_change(events) == ON


def test_a_directory_made_later_is_polled_until_it_can_be_watched(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    directory = tmp_path / "later"
    config = directory / "machineconfig.yaml"
    with watching(config, ON, interval=0.1) as (watcher, events):
        deadline = time.monotonic() + 5
        while "not watching" not in caplog.text:  # its first look found no directory
            assert time.monotonic() < deadline
            time.sleep(0.02)
        directory.mkdir()
        config.write_bytes(OFF)
        assert next_change(events) == OFF
        wait_watching(watcher)
        assert caplog.text.count("not watching") == 1  # said once, not at every look
        # Once watched, it is inotify that tells: the poll is made an hour long.
        watcher.interval = HOUR
        config.write_bytes(ON)
        assert next_change(events) == ON


def test_a_directory_removed_and_made_again_is_watched_again(tmp_path: Path) -> None:
    directory = tmp_path / "etc"
    directory.mkdir()
    config = directory / "machineconfig.yaml"
    config.write_bytes(ON)
    with watching(config, ON, interval=0.1) as (watcher, events):
        wait_watching(watcher)
        config.unlink()
        directory.rmdir()
        directory.mkdir()
        config.write_bytes(OFF)
        assert next_change(events) == OFF
        wait_watching(watcher)
        watcher.interval = HOUR
        config.write_bytes(ON)
        assert next_change(events) == ON


def test_without_inotify_the_file_is_polled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    def no_watches(*_args: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileWatch, "_open", staticmethod(no_watches))
    config = tmp_path / "machineconfig.yaml"
    config.write_bytes(ON)
    with watching(config, ON, interval=0.1) as (watcher, events):
        config.write_bytes(OFF)
        assert next_change(events) == OFF
        assert not watcher._watch.watching
    assert "not watching" in caplog.text and "No space left on device" in caplog.text


def test_a_reload_checks_at_once(tmp_path: Path) -> None:
    """SIGHUP's trigger reads the file now: a change inotify cannot show (a file system
    without events) is taken without waiting for the backstop."""
    config = tmp_path / "machineconfig.yaml"
    config.write_bytes(ON)
    with watching(config, ON) as (watcher, events):
        wait_watching(watcher)
        watcher._stamp = None  # as if the file had changed unseen
        watcher._current = OFF
        watcher.trigger()
        assert next_change(events) == ON


def test_a_change_before_the_watch_is_set_is_seen(tmp_path: Path) -> None:
    """Made between the watcher's making and its thread's first watch (the agent starts
    other parts meanwhile): seen when the watch is set, not at the backstop."""
    config = tmp_path / "machineconfig.yaml"
    config.write_bytes(ON)
    events: queue.Queue[Any] = queue.Queue()
    watcher = ConfigWatcher(config, ON, events, interval=HOUR, backstop=HOUR)
    config.write_bytes(OFF)
    watcher.start()
    try:
        assert next_change(events) == OFF
    finally:
        watcher.stop()


def test_a_swapped_directory_link_on_the_way_is_seen(tmp_path: Path) -> None:
    """Release directories: the config's directory is a link, swapped by rename."""
    for version, content in (("v1", ON), ("v2", OFF)):
        (tmp_path / version).mkdir()
        (tmp_path / version / "machineconfig.yaml").write_bytes(content)
    (tmp_path / "current").symlink_to("v1")
    config = tmp_path / "current" / "machineconfig.yaml"
    with watching(config, ON) as (watcher, events):
        wait_watching(watcher)
        (tmp_path / ".next").symlink_to("v2")
        (tmp_path / ".next").replace(tmp_path / "current")
        assert next_change(events) == OFF


def test_a_link_in_the_middle_of_a_chain_retargeted_is_seen(tmp_path: Path) -> None:
    for directory in ("etc", "alt", "v1", "v2"):
        (tmp_path / directory).mkdir()
    (tmp_path / "v1" / "m.yaml").write_bytes(ON)
    (tmp_path / "v2" / "m.yaml").write_bytes(OFF)
    (tmp_path / "alt" / "kubespan").symlink_to(tmp_path / "v1" / "m.yaml")
    config = tmp_path / "etc" / "m.yaml"
    config.symlink_to(tmp_path / "alt" / "kubespan")
    assert set(trace(config).entries) == {tmp_path / d for d in ("etc", "alt", "v1")}
    with watching(config, ON) as (watcher, events):
        wait_watching(watcher)
        staged = tmp_path / "alt" / ".kubespan"
        staged.symlink_to(tmp_path / "v2" / "m.yaml")
        staged.replace(tmp_path / "alt" / "kubespan")
        assert next_change(events) == OFF


def test_a_write_through_another_path_to_the_file_is_seen(tmp_path: Path) -> None:
    """A hard link elsewhere (as a bind mount of the file): the file's own watch tells."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "elsewhere").mkdir()
    config = tmp_path / "etc" / "machineconfig.yaml"
    config.write_bytes(ON)
    other = tmp_path / "elsewhere" / "same.yaml"
    other.hardlink_to(config)
    with watching(config, ON) as (watcher, events):
        wait_watching(watcher)
        with other.open("r+b") as file:
            file.write(OFF)
            file.truncate()
        assert next_change(events) == OFF


def test_a_new_file_is_read_once_it_is_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Created and written slowly (a download): never read half-written."""
    config = tmp_path / "machineconfig.yaml"
    config.write_bytes(ON)
    with watching(config, ON) as (watcher, events):
        wait_watching(watcher)
        config.unlink()
        with config.open("wb") as file:
            file.write(OFF[:30])
            file.flush()
            no_change(events)
            file.write(OFF[30:])
        assert next_change(events) == OFF
    assert "invalid machine config" not in caplog.text


def test_other_files_in_the_directory_wake_nothing(tmp_path: Path) -> None:
    """The agent's state directory holds the config and files it writes every few seconds."""
    config = tmp_path / "machineconfig.yaml"
    config.write_bytes(ON)
    watch = FileWatch(config)
    try:
        assert watch.refresh() == (True, True)
        assert watch.refresh() == (True, False)  # nothing changed: the same watches
        (tmp_path / "peers.json").write_bytes(b"{}")
        staged = tmp_path / ".peers.json.tmp"
        staged.write_bytes(b"{}")
        staged.replace(tmp_path / "peers.json")
        assert not watch.changed()
        config.write_bytes(OFF)
        assert watch.changed()
        assert not watch.changed()  # read: nothing left
    finally:
        watch.close()


def test_a_network_file_system_is_polled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Changes made on another machine send no events here: looked at every interval."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(filewatch, "file_system_type", lambda _path: 0x6969)
    config = tmp_path / "machineconfig.yaml"
    config.write_bytes(ON)
    with watching(config, ON, interval=0.1) as (watcher, events):
        config.write_bytes(OFF)
        assert next_change(events) == OFF
        assert not watcher._watch.watching
    assert "is on nfs" in caplog.text


def test_a_watch_that_keeps_failing_still_looks_at_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_self: FileWatch) -> tuple[bool, bool]:
        raise ValueError("filedescriptor out of range in select()")

    monkeypatch.setattr(FileWatch, "refresh", broken)
    config = tmp_path / "machineconfig.yaml"
    config.write_bytes(ON)
    with watching(config, ON, interval=0.1) as (_watcher, events):
        config.write_bytes(OFF)
        assert next_change(events) == OFF
    assert "watching the machine config failed" in caplog.text
