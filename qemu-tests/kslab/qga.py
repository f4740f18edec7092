"""Client for the QEMU guest agent (qemu-ga) over its virtio-serial unix socket.

The wire protocol is JSON lines. A session starts with `guest-sync-delimited`: the client
sends a 0xFF byte (resets the agent's parser) and a random id; the agent answers with 0xFF
followed by the id, which marks where stale output ends.
"""

import base64
import json
import secrets
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from kslab.errors import LabError

Json = Any  # what json.loads returns; checked where used


class GuestAgentError(LabError):
    """The guest agent is unreachable, timed out or reported an error."""


class ExecResult(NamedTuple):
    exit_code: int  # negative: killed by that signal
    stdout: str
    stderr: str


class GuestAgent:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._sock: socket.socket | None = None
        self._buf = b""

    def connect(self, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
        """Connect and synchronise, retrying until the agent answers (the guest is booting)
        or `timeout` passes. `alive` returning False (QEMU exited) ends the wait at once."""
        deadline = time.monotonic() + timeout
        last_error = "no attempt"
        while time.monotonic() < deadline:
            if not alive():
                raise GuestAgentError(f"{self.socket_path}: VM stopped while waiting for agent")
            self.close()
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(self.socket_path))
                self._sock = sock
                self._sync(min(3.0, max(0.1, deadline - time.monotonic())))
            except (OSError, GuestAgentError) as e:
                last_error = str(e)
                self.close()
                time.sleep(0.5)
            else:
                return
        raise GuestAgentError(
            f"guest agent at {self.socket_path} did not answer within {timeout:.0f} s "
            f"({last_error})"
        )

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf = b""

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def call(
        self, command: str, arguments: Mapping[str, Json] | None = None, timeout: float = 30.0
    ) -> Json:
        """Run one agent command and return its "return" value. On a transport failure the
        connection is dropped (a late reply must not be taken for the next one's)."""
        try:
            self._send({"execute": command, "arguments": dict(arguments or {})})
            deadline = time.monotonic() + timeout
            while True:
                line = self._read_line(deadline).strip(b"\xff \r\n")
                if line:
                    reply = json.loads(line)
                    if "error" in reply or "return" in reply:
                        break
        except (OSError, ValueError, GuestAgentError) as e:
            self.close()
            raise GuestAgentError(f"{command}: {e}") from e
        if "error" in reply:
            raise GuestAgentError(f"{command}: {reply['error'].get('desc', reply['error'])}")
        return reply["return"]

    def send(self, command: str, arguments: Mapping[str, Json] | None = None) -> None:
        """Send a command that gets no reply on success (guest-shutdown)."""
        self._send({"execute": command, "arguments": dict(arguments or {})})

    def exec(
        self,
        argv: Sequence[str],
        stdin: bytes | None = None,
        timeout: float = 120.0,
    ) -> ExecResult:
        """Run `argv` in the guest (PATH lookup), wait for it, return its exit code and
        output. The guest process is not killed on timeout."""
        args: dict[str, Json] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
        if stdin is not None:
            args["input-data"] = base64.b64encode(stdin).decode()
        pid = self.call("guest-exec", args)["pid"]
        deadline = time.monotonic() + timeout
        interval = 0.05
        while True:
            status = self.call("guest-exec-status", {"pid": pid})
            if status["exited"]:
                break
            if time.monotonic() >= deadline:
                raise GuestAgentError(f"{' '.join(argv)}: still running after {timeout:.0f} s")
            time.sleep(interval)
            interval = min(interval * 2, 0.5)
        code = status.get("exitcode")
        return ExecResult(
            exit_code=int(code) if code is not None else -int(status.get("signal", 0)),
            stdout=_decode(status.get("out-data")),
            stderr=_decode(status.get("err-data")),
        )

    def _sync(self, timeout: float) -> None:
        token = secrets.randbelow(2**31)
        sync = {"execute": "guest-sync-delimited", "arguments": {"id": token}}
        self._write(b"\xff" + json.dumps(sync).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            while b"\xff" not in self._buf:
                self._buf = b""
                self._recv(deadline)
            self._buf = self._buf[self._buf.index(b"\xff") + 1 :]
            line = self._read_line(deadline)
            try:
                if json.loads(line).get("return") == token:
                    return
            except (ValueError, AttributeError):
                continue

    def _send(self, message: Mapping[str, Json]) -> None:
        self._write(json.dumps(message).encode() + b"\n")

    def _write(self, data: bytes) -> None:
        if self._sock is None:
            raise GuestAgentError(f"{self.socket_path}: not connected")
        self._sock.sendall(data)

    def _read_line(self, deadline: float) -> bytes:
        while b"\n" not in self._buf:
            self._recv(deadline)
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _recv(self, deadline: float) -> None:
        if self._sock is None:
            raise GuestAgentError(f"{self.socket_path}: not connected")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise GuestAgentError(f"{self.socket_path}: no answer in time")
        self._sock.settimeout(remaining)
        try:
            chunk = self._sock.recv(65536)
        except TimeoutError as e:
            raise GuestAgentError(f"{self.socket_path}: no answer in time") from e
        if not chunk:
            raise GuestAgentError(f"{self.socket_path}: connection closed")
        self._buf += chunk


def _decode(data: str | None) -> str:
    return base64.b64decode(data).decode(errors="replace") if data else ""
