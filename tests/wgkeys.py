"""A fresh WireGuard (X25519) key pair as raw bytes, for tests of the relay and its sides."""

from __future__ import annotations

from nacl.public import PrivateKey


class Keys:
    def __init__(self) -> None:
        key = PrivateKey.generate()
        self.private, self.public = bytes(key), bytes(key.public_key)
