"""Telling a power-off from a reboot by systemd's job queue; in doubt, no leave."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from kubespan.agent.shutdown import powering_off, system_powering_off

POWER_OFF = """\
1093 poweroff.target               start waiting
1096 systemd-poweroff.service      start waiting
1100 kubespan.service              stop  running
"""
REBOOT = """\
1093 reboot.target                 start waiting
1096 systemd-reboot.service        start waiting
1100 kubespan.service              stop  running
"""


@pytest.mark.parametrize(
    ("listing", "expected"),
    [
        (POWER_OFF, True),
        ("7 halt.target start waiting\n", True),
        (REBOOT, False),
        ("8 kexec.target start waiting\n", False),
        ("9 kubespan.service stop running\n", False),  # systemctl stop kubespan
        ("", False),
        ("10 poweroff.target stop waiting\n", False),  # not a power-off under way
        ("poweroff.target\n\x00\xff garbage\n", False),
    ],
)
def test_a_power_off_is_told_from_the_job_queue(listing: str, expected: bool) -> None:
    assert powering_off(listing) is expected


def completed(code: int, stdout: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.CompletedProcess(args=[], returncode=code, stdout=stdout, stderr=b"")


def test_systemd_is_asked() -> None:
    calls: list[list[str]] = []

    def run(argv: list[str], **_kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        calls.append(argv)
        return completed(0, POWER_OFF.encode())

    assert system_powering_off(run)
    assert calls == [["systemctl", "list-jobs", "--no-legend", "--plain", "--no-pager"]]


@pytest.mark.parametrize(
    "failure",
    [
        FileNotFoundError(2, "No such file or directory"),
        subprocess.TimeoutExpired(["systemctl"], 5.0),
        completed(1, POWER_OFF.encode()),
    ],
    ids=["no-systemctl", "timeout", "exit-1"],
)
def test_in_doubt_the_node_does_not_leave(
    failure: BaseException | subprocess.CompletedProcess[bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    def run(_argv: list[str], **_kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        if isinstance(failure, BaseException):
            raise failure
        return failure

    assert not system_powering_off(run)
    assert "not leaving" in caplog.text
