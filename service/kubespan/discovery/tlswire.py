"""Server-side TLS over memory buffers: ciphertext from the socket in, plaintext out, and back.

Why not `loop.start_tls`: uvloop starts reading an accepted socket right after
`connection_made` even when the protocol paused it, so a ClientHello that arrives before the
start_tls task runs went to the plain protocol and was lost; the client then waited for the
handshake deadline (half of all handshakes on a loaded machine). Doing TLS on the bytes the
connection receives does not depend on when they arrive, on which loop, and keeps handshakes
inside the connection's own limits and deadlines.
"""

from __future__ import annotations

import contextlib
import ssl
from dataclasses import dataclass

# What one read of the TLS object returns at most (a TLS record carries at most 16 KiB).
READ_CHUNK = 65536


@dataclass(frozen=True)
class Received:
    plaintext: bytes  # what the client sent, decrypted (empty while the handshake runs)
    to_send: bytes  # handshake messages, tickets or alerts for the client
    peer_closed: bool  # the client sent close_notify: no more plaintext follows


class TlsSession:
    """One server connection's TLS state. `receive` raises ssl.SSLError for a client that does
    not speak TLS or fails the handshake; the connection is then to be cut."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.established = False
        self.peer_closed = False

    def receive(self, data: bytes) -> Received:
        self._incoming.write(data)
        if not self.established:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                return Received(b"", self._outgoing.read(), False)
            self.established = True
        plaintext: list[bytes] = []
        while not self.peer_closed:
            try:
                chunk = self._tls.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.peer_closed = True
                break
            if not chunk:
                self.peer_closed = True
                break
            plaintext.append(chunk)
        return Received(b"".join(plaintext), self._outgoing.read(), self.peer_closed)

    def send(self, plaintext: bytes) -> bytes:
        """The records carrying `plaintext`, to be written to the socket."""
        view = memoryview(plaintext)
        while view:
            written = self._tls.write(view)
            view = view[written:]
        return self._outgoing.read()

    def close_notify(self) -> bytes:
        """The alert telling the client we are done (nothing when the session never started
        or is already broken)."""
        if self.established:
            with contextlib.suppress(ssl.SSLError, ValueError):
                self._tls.unwrap()
        return self._outgoing.read()
