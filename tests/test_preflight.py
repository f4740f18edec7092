"""Preflight: each missing piece gives its own line and exit status, read from a crafted
host tree; the agent run without privilege says so in one line and is not restarted."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kubespan import preflight
from kubespan.preflight import (
    BUILTIN,
    CAP_NET_ADMIN,
    CAP_NET_RAW,
    EXIT_CANTCREAT,
    EXIT_NOPERM,
    EXIT_UNAVAILABLE,
    LOADED,
    MISSING,
    MODULE,
    HostFacts,
)

ALL_CAPS = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW)
GOOD = HostFacts(ALL_CAPS, LOADED, "6.1.0-test", None, Path("/var/lib/kubespan"), None)
KUBESPAN = Path(sys.executable).parent / "kubespan"


@pytest.mark.parametrize(
    ("facts", "expected", "status"),
    [
        (GOOD, [], 0),
        (HostFacts(0, LOADED, "6.1", None, Path("/s"), None), ["CAP_NET_ADMIN"], EXIT_NOPERM),
        # Without privilege nothing else is judged: it would only be noise.
        (HostFacts(0, MISSING, "6.1", "x", Path("/s"), "x"), ["CAP_NET_ADMIN"], EXIT_NOPERM),
        (HostFacts(None, LOADED, "6.1", None, Path("/s"), None), ["CAP_NET_ADMIN"], EXIT_NOPERM),
        (
            HostFacts(1 << CAP_NET_ADMIN, LOADED, "6.1", None, Path("/s"), None),
            ["CAP_NET_RAW"],
            EXIT_NOPERM,
        ),
        (HostFacts(ALL_CAPS, MISSING, "5.4.0", None, Path("/s"), None), ["no WireGuard"], 69),
        (HostFacts(ALL_CAPS, MODULE, "6.1", None, Path("/s"), None), [], 0),
        (HostFacts(ALL_CAPS, BUILTIN, "6.1", None, Path("/s"), None), [], 0),
        (
            HostFacts(ALL_CAPS, LOADED, "6.1", "libnftables is not available", Path("/s"), None),
            ["nftables is not usable"],
            EXIT_UNAVAILABLE,
        ),
        (
            HostFacts(ALL_CAPS, LOADED, "6.1", None, Path("/s"), "Read-only file system"),
            ["state directory /s cannot be written (Read-only file system)"],
            EXIT_CANTCREAT,
        ),
        (
            HostFacts(ALL_CAPS, MISSING, "6.1", "gone", Path("/s"), "gone"),
            ["no WireGuard", "nftables", "state directory"],
            EXIT_UNAVAILABLE,  # the first, most fundamental
        ),
    ],
)
def test_each_missing_piece_has_its_line_and_status(
    facts: HostFacts, expected: list[str], status: int
) -> None:
    found = preflight.missing(facts)
    assert len(found) == len(expected)
    for item, words in zip(found, expected, strict=True):
        assert words in str(item)
        assert item.todo  # says what to do
    assert preflight.exit_status(found) == status


def host_tree(tmp_path: Path, status: str, builtin: str = "", dep: str = "") -> Path:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/status").write_text(status)
    modules = tmp_path / "lib/modules/6.1.0-test"
    modules.mkdir(parents=True)
    (modules / "modules.builtin").write_text(builtin)
    (modules / "modules.dep").write_text(dep)
    return tmp_path


def test_capabilities_are_read_from_proc(tmp_path: Path) -> None:
    root = host_tree(tmp_path, "Name:\tkubespan\nCapInh:\t0\nCapEff:\t0000000000003000\n")
    caps = preflight.effective_capabilities(root)
    assert preflight.has_capability(caps, CAP_NET_ADMIN)
    assert preflight.has_capability(caps, CAP_NET_RAW)
    assert not preflight.has_capability(caps, 0)
    broken = host_tree(tmp_path / "b", "CapEff:\tzz\n")
    assert preflight.effective_capabilities(broken) is None
    assert preflight.effective_capabilities(tmp_path / "nothing") is None


@pytest.mark.parametrize(
    ("builtin", "dep", "loaded", "expected"),
    [
        ("", "", True, LOADED),
        ("kernel/drivers/net/wireguard/wireguard.ko\n", "", False, BUILTIN),
        (
            "",
            "kernel/drivers/net/wireguard/wireguard.ko.xz: kernel/net/ipv4/udp_tunnel.ko\n",
            False,
            MODULE,
        ),
        ("", "kernel/drivers/net/wireguard-extra.ko:\n", False, MISSING),  # not wireguard
        ("", "kernel/net/ipv4/udp_tunnel.ko: kernel/x/wireguard.ko\n", False, MISSING),
        ("", "", False, MISSING),
    ],
)
def test_wireguard_is_found_loaded_built_in_or_as_a_module(
    tmp_path: Path, builtin: str, dep: str, loaded: bool, expected: str
) -> None:
    root = host_tree(tmp_path, "CapEff:\t0\n", builtin, dep)
    if loaded:
        (root / "sys/module/wireguard").mkdir(parents=True)
    assert preflight.wireguard_presence("6.1.0-test", root) == expected
    assert preflight.wireguard_presence("other-release", root) in (LOADED, MISSING)


def test_an_unwritable_state_directory_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert preflight.state_dir_error(blocker / "state") is not None
    assert preflight.state_dir_error(tmp_path / "state") is None
    assert list((tmp_path / "state").iterdir()) == []  # the probe leaves nothing


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
@pytest.mark.parametrize("cleanup", [False, True])
def test_the_agent_without_privilege_says_so_in_one_line(tmp_path: Path, cleanup: bool) -> None:
    """As nobody (no capabilities): one line, EX_NOPERM, no traceback, nothing touched;
    `--cleanup` does not claim there was nothing of ours when it could not look."""
    tmp_path.chmod(0o777)
    argv = ["--cleanup"] if cleanup else ["--config", "/dev/null"]
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(KUBESPAN),
         "agent", "--state-dir", str(tmp_path / "state"), *argv],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == EXIT_NOPERM, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot start: no CAP_NET_ADMIN" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "nothing of ours" not in result.stderr


def test_the_unit_does_not_restart_on_preflight_refusals() -> None:
    unit = (Path(__file__).parent.parent / "extension/kubespan.service").read_text()
    (line,) = [x for x in unit.splitlines() if x.startswith("RestartPreventExitStatus=")]
    statuses = {int(v) for v in line.partition("=")[2].split()}
    assert {EXIT_NOPERM, EXIT_UNAVAILABLE, EXIT_CANTCREAT, 78} <= statuses
