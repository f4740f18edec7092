"""The live status: the agent's latest status document, served on a Unix socket only root
can use (`status.sock` in the runtime directory, mode 0600), so `kubespan status` tells a
live agent from the file a dead one left behind.

One connection gets one document and is closed; nothing is read from the client. The
document is kept as bytes, replaced whole by the agent after each pass (`LatestStatus`), so
a reader never sees half of one. The thread never dies: a failed accept or send is logged
and the loop goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kubespan.threads import named_thread
from kubespan.wakeup import Wakeup

log = logging.getLogger(__name__)

STATUS_SOCKET = "status.sock"
SEND_TIMEOUT = 2.0  # a client that does not read is dropped after this long
ACCEPT_RETRY = 1.0  # the wait after a failed accept
MAX_STATUS_BYTES = 16 << 20  # a status of thousands of peers is a few MiB


def placeholder(agent: str) -> bytes:
    """What a live agent with no report serves: "starting" or "disabled"."""
    return json.dumps({"version": 1, "agent": agent, "pid": os.getpid()}).encode()


class LatestStatus:
    """The latest status document, shared between the agent and the server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._document: bytes | Callable[[], bytes] = placeholder("starting")
        self._served: bytes = placeholder("starting")
        self._failed: object = None  # the last document that could not be made

    def set(self, document: bytes | Callable[[], bytes]) -> None:
        """The document, or what makes it when it is asked for (LazyStatus.encoded)."""
        with self._lock:
            self._document = document

    def get(self) -> bytes:
        """The document; made here when it was set as what makes it (in the asking
        thread, which must not die of it: a document that cannot be made is logged, and
        the last one served is served again)."""
        with self._lock:
            document = self._document
        if isinstance(document, bytes):
            return document
        try:
            made = document()
        except Exception:
            with self._lock:
                first = document is not self._failed
                self._failed = document
                served = self._served
            if first:  # once per document, not at every request for it
                log.exception("could not make the status document; serving the last one made")
            return served
        with self._lock:
            self._served = made
        return made


class StatusServer:
    def __init__(self, runtime_dir: Path, latest: LatestStatus) -> None:
        self.path = runtime_dir / STATUS_SOCKET
        self.latest = latest
        self._stopping = threading.Event()
        # Blocks in select() until a client or stop() comes: an idle agent's threads do not
        # wake to look whether they must stop.
        self._wakeup = Wakeup()
        self._sock: socket.socket | None = None
        self._thread = named_thread(self._run, "status server")
        self.served = 0

    def start(self) -> None:
        """Bind now (a failure is the caller's to report), then serve in the thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # left by an agent that was killed
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_mask = os.umask(0o177)  # created 0600: the status names keys and addresses
        try:
            sock.bind(str(self.path))
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old_mask)
        sock.listen(8)
        sock.setblocking(False)
        self._sock = sock
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wakeup.poke()
        self._thread.join(SEND_TIMEOUT + 1.0)
        if self._sock is not None:
            self._sock.close()
        if not self._thread.is_alive():
            self._wakeup.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _run(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                select.select([self._sock, self._wakeup.reader], [], [])
                self._wakeup.drain()
                if self._stopping.is_set():
                    return
                connection, _ = self._sock.accept()
            except BlockingIOError:
                continue  # the client left before we took it
            except (OSError, ValueError) as error:
                if self._stopping.is_set():
                    return
                log.warning("status socket accept failed: %s", error)
                self._stopping.wait(ACCEPT_RETRY)
                continue
            with connection:
                try:
                    connection.settimeout(SEND_TIMEOUT)
                    connection.sendall(self.latest.get())
                    self.served += 1
                except OSError as error:
                    log.debug("status client dropped: %s", error)


class NoLiveStatus(Exception):
    """No live agent answered; the message says why, for the operator."""


def read_live(runtime_dir: Path, timeout: float = 3.0) -> bytes:
    """The live agent's document; NoLiveStatus when none answers on the socket."""
    path = runtime_dir / STATUS_SOCKET
    chunks = []
    size = 0
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            # Bounded in size and in total time: whatever holds the socket cannot make a
            # reader wait, or grow, without end by trickling.
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_STATUS_BYTES:
                    raise NoLiveStatus(f"{path}: more than {MAX_STATUS_BYTES} bytes; not read")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NoLiveStatus(f"{path}: no whole answer within {timeout:g} s")
                sock.settimeout(left)
    except PermissionError:
        raise NoLiveStatus(f"{path} is root's: run kubespan status as root") from None
    except (FileNotFoundError, ConnectionRefusedError):
        raise NoLiveStatus(f"no agent answers on {path}") from None
    except OSError as error:
        raise NoLiveStatus(f"{path}: {error.strerror or error}") from None
    return b"".join(chunks)
