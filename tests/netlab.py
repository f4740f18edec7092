"""Network namespaces made by a test, wired with veth pairs, removed afterwards. Traffic
stays inside them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


def run(argv: list[str], stdin: str | None = None, check: bool = True) -> str:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


class Netns:
    def __init__(self, name: str) -> None:
        self.name = name

    def sh(self, command: str, check: bool = True) -> str:
        return run(["ip", "netns", "exec", self.name, "sh", "-ec", command], check=check)

    def ip(self, *args: str) -> str:
        return run(["ip", "-n", self.name, *args])

    def python(self, script: str, *args: str, stdin: str = "") -> str:
        env_path = f"PYTHONPATH={REPO / 'tests'}"
        return run(
            ["ip", "netns", "exec", self.name, "env", env_path, sys.executable, script, *args],
            stdin=stdin,
        )

    def dataplane(self, command: str, document: dict[str, Any] | None = None) -> dict[str, Any]:
        out = self.python(
            str(REPO / "tests" / "netns_dataplane.py"), command, stdin=json.dumps(document or {})
        )
        result: dict[str, Any] = json.loads(out)
        return result


@contextmanager
def namespaces(*roles: str) -> Iterator[dict[str, Netns]]:
    """Fresh namespaces, one per role, with loopback up; all deleted on exit."""
    if os.geteuid() != 0:
        pytest.fail("network namespace tests need root", pytrace=False)
    tag = uuid.uuid4().hex[:6]
    made: dict[str, Netns] = {}
    try:
        for role in roles:
            name = f"ks-{role}-{tag}"
            run(["ip", "netns", "add", name])
            made[role] = Netns(name)
            made[role].ip("link", "set", "lo", "up")
        yield made
    finally:
        for ns in made.values():
            run(["ip", "netns", "del", ns.name], check=False)


def veth(a: Netns, a_name: str, b: Netns, b_name: str) -> None:
    """A veth pair from namespace `a` (end `a_name`) to `b` (end `b_name`), both up."""
    a.ip("link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", b.name)
    a.ip("link", "set", a_name, "up")
    b.ip("link", "set", b_name, "up")
