"""Network namespaces made by a test, wired with veth pairs, removed afterwards. Traffic
stays inside them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
ANSWER_TIMEOUT = 30.0


def run(argv: list[str], stdin: str | None = None, check: bool = True) -> str:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


class DataplaneHelper:
    """tests/netns_dataplane.py running in a namespace: one Dataplane for its whole life, as
    in the agent. Answers requests; in watch mode, records each reconcile pass."""

    def __init__(self, namespace: str) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in close())
        env = f"PYTHONPATH={REPO / 'tests'}"
        script = str(REPO / "tests" / "netns_dataplane.py")
        self._process = subprocess.Popen(
            ["ip", "netns", "exec", namespace, "env", env, sys.executable, script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._changed = threading.Condition()
        self._answers: dict[int, dict[str, Any]] = {}
        self._ended = False
        self._next_id = 0
        self.passes: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            document = json.loads(line)
            with self._changed:
                if "pass" in document:
                    self.passes.append(document)
                else:
                    self._answers[document["id"]] = document
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def call(self, do: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
        assert self._process.stdin is not None
        self._next_id += 1
        ident = self._next_id
        self._process.stdin.write(json.dumps({"id": ident, "do": do, "spec": spec}) + "\n")
        self._process.stdin.flush()
        with self._changed:
            self._changed.wait_for(lambda: ident in self._answers or self._ended, ANSWER_TIMEOUT)
            answer = self._answers.get(ident)
        if answer is None:
            raise AssertionError(f"no answer to {do}: {self.stderr()}")
        if "failed" in answer:
            raise AssertionError(f"{do} failed: {answer['failed']}")
        return answer

    def wait_for_pass(
        self, matches: Callable[[dict[str, Any]], bool], after: int, timeout: float
    ) -> dict[str, Any]:
        """The first pass after the first `after` ones that `matches`."""

        def found() -> dict[str, Any] | None:
            return next((p for p in self.passes[after:] if matches(p)), None)

        with self._changed:
            self._changed.wait_for(lambda: found() is not None or self._ended, timeout)
            result = found()
        if result is None:
            raise AssertionError(f"no such pass within {timeout} s: {self.passes[after:]}")
        return result

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._stderr.close()


class Netns:
    def __init__(self, name: str) -> None:
        self.name = name
        self._helper: DataplaneHelper | None = None

    def sh(self, command: str, check: bool = True) -> str:
        return run(["ip", "netns", "exec", self.name, "sh", "-ec", command], check=check)

    def ip(self, *args: str) -> str:
        return run(["ip", "-n", self.name, *args])

    def python(self, script: str, *args: str, stdin: str = "") -> str:
        """Run a Python script (a file, or `-c` code as the first arg) in the namespace."""
        env_path = f"PYTHONPATH={REPO / 'tests'}"
        return run(
            ["ip", "netns", "exec", self.name, "env", env_path, sys.executable, script, *args],
            stdin=stdin,
        )

    @property
    def helper(self) -> DataplaneHelper:
        if self._helper is None:
            self._helper = DataplaneHelper(self.name)
        return self._helper

    def dataplane(self, command: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.helper.call(command, spec)

    def close(self) -> None:
        if self._helper is not None:
            self._helper.close()
            self._helper = None


POLL = 0.005


def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    """Poll `condition` until it holds; AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(POLL)  # between polls, not instead of one


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
            ns.close()
            run(["ip", "netns", "del", ns.name], check=False)


def veth(a: Netns, a_name: str, b: Netns, b_name: str) -> None:
    """A veth pair from namespace `a` (end `a_name`) to `b` (end `b_name`), both up, without
    IPv6 link-local addresses: those appear some time after the link comes up, and the tests
    that watch the kernel's notifications want no changes but their own."""
    a.ip("link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", b.name)
    for ns, name in ((a, a_name), (b, b_name)):
        ns.ip("link", "set", name, "addrgenmode", "none")
        ns.ip("link", "set", name, "up")
