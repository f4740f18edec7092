"""The discovery client's HTTP/1.1 transport: one kept-alive connection to one service, and a
hard deadline on every exchange.

A hostile service (or anyone on an http:// path to it) can answer slowly on purpose: one byte
every few seconds keeps any per-read timeout happy forever. So each exchange gets a watchdog
that shuts the socket down when the deadline passes, whatever phase the exchange is in; the
blocked read then fails at once. Heads are bounded by http.client (100 fields, 64 KiB lines),
bodies by the caller's cap; nothing is decompressed, no cookie is kept, no redirect followed.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

from kubespan.errors import DiscoveryError

_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str
    headers: Mapping[str, str] = field(repr=False)
    body: bytes = field(repr=False)


class Transport:
    def __init__(
        self,
        base_url: str,
        verify: bool | str = True,
        source_address: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DiscoveryError(f"{base_url}: not an http:// or https:// URL")
        self.base_url = base_url.rstrip("/")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._verify = verify
        self._source = (source_address, 0) if source_address else None
        self._headers = dict(headers or {})
        self._connection: http.client.HTTPConnection | None = None
        # The address the last request was sent to (the service's, as this node reaches it).
        self.peer_address: str | None = None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        if self._connection is not None:
            self._connection.timeout = timeout
            if self._connection.sock is not None:
                self._connection.sock.settimeout(timeout)
            return self._connection
        if self._https:
            context = ssl.create_default_context(
                cafile=self._verify if isinstance(self._verify, str) else None
            )
            if self._verify is False:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._connection = http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, source_address=self._source,
                context=context,
            )  # fmt: skip
        else:
            self._connection = http.client.HTTPConnection(
                self._host, self._port, timeout=timeout, source_address=self._source
            )
        return self._connection

    def exchange(
        self,
        method: str,
        target: str,
        body: bytes,
        headers: Mapping[str, str],
        deadline: float,
        max_body: int,
    ) -> Answer:
        """Send one request and read its whole answer within `deadline` seconds."""
        connection = self._connect(deadline)
        expired = threading.Event()
        # http.client hands the socket over to the response (and forgets it) when the answer
        # closes the connection: keep our own reference for the watchdog.
        held: list[socket.socket] = []

        def abort() -> None:
            expired.set()
            for sock in (*held, connection.sock):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

        watchdog = threading.Timer(deadline, abort)
        watchdog.daemon = True
        watchdog.start()
        try:
            connection.request(
                method,
                self._prefix + target,
                body=body or None,
                headers={**self._headers, **headers, "accept-encoding": "identity"},
            )
            if connection.sock is not None:
                held.append(connection.sock)
                with contextlib.suppress(OSError):
                    self.peer_address = str(connection.sock.getpeername()[0])
            if expired.is_set():
                # Connecting took all the time (addresses tried one by one): the watchdog
                # found no socket to cut, so stop here rather than wait on a slow answer.
                raise OSError("deadline")
            response = connection.getresponse()
            if response.getheader("content-encoding", "identity").lower() != "identity":
                raise DiscoveryError(f"{self.base_url}: answered with an encoded body; refused")
            payload = _read_capped(response, max_body, self.base_url)
            if expired.is_set():  # the watchdog cut the answer short: it is not complete
                raise OSError("deadline")
            answer = Answer(
                response.status,
                response.reason,
                {k.lower(): v for k, v in response.getheaders()},
                payload,
            )
            if response.will_close:
                self.close()
            return answer
        except DiscoveryError:
            self.close()
            raise
        # AttributeError: an SSL socket shut down by the watchdog mid-read loses its state.
        except (OSError, http.client.HTTPException, ValueError, AttributeError) as error:
            self.close()
            if expired.is_set():
                raise DiscoveryError(
                    f"{self.base_url}: no complete answer within {deadline:g}s"
                ) from None
            raise DiscoveryError(f"{self.base_url}: {type(error).__name__}: {error}") from None
        finally:
            watchdog.cancel()


def _read_capped(response: http.client.HTTPResponse, cap: int, where: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = response.read(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > cap:
            raise DiscoveryError(f"{where}: answer is larger than {cap} bytes; refused")
        chunks.append(chunk)
