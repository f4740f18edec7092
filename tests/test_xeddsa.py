"""XEdDSA: signatures made with X25519 keys verify as Ed25519 (libsodium) under the Edwards
form of the public key, and for nothing else."""

from __future__ import annotations

import os

import pytest
from nacl.bindings import crypto_sign_ed25519_pk_to_curve25519
from nacl.public import PrivateKey

from kubespan import xeddsa
from kubespan.identity import clamp_private_key

FIELD_PRIME = 2**255 - 19


def keypair() -> tuple[bytes, bytes]:
    private = clamp_private_key(os.urandom(32))
    return private, bytes(PrivateKey(private).public_key)


def test_signatures_verify_for_their_key_and_message_only() -> None:
    for size in range(0, 200, 7):
        private, public = keypair()
        message = os.urandom(size)
        signature = xeddsa.sign(private, message, os.urandom(64))
        assert xeddsa.verify(public, message, signature)
        assert not xeddsa.verify(public, message + b"x", signature)
        assert not xeddsa.verify(keypair()[1], message, signature)
        tampered = bytes([signature[0] ^ 1]) + signature[1:]
        assert not xeddsa.verify(public, message, tampered)


def test_the_edwards_form_maps_back_to_the_x25519_key() -> None:
    for _ in range(50):
        _, public = keypair()
        assert crypto_sign_ed25519_pk_to_curve25519(xeddsa.edwards_public_key(public)) == public


@pytest.mark.parametrize(
    "encoding",
    [
        (FIELD_PRIME - 1).to_bytes(32, "little"),  # u = -1: no Edwards form
        FIELD_PRIME.to_bytes(32, "little"),  # u = p: not canonical
        (2**255 - 1).to_bytes(32, "little"),  # u > p
    ],
)
def test_keys_without_a_canonical_edwards_form_are_refused(encoding: bytes) -> None:
    with pytest.raises(ValueError):
        xeddsa.edwards_public_key(encoding)
    assert not xeddsa.verify(encoding, b"m", bytes(64))


def test_one_private_key_has_one_public_key_that_verifies() -> None:
    private, public = keypair()
    signature = xeddsa.sign(private, b"m", os.urandom(64))
    top_bit = public[:31] + bytes([public[31] | 0x80])
    assert xeddsa.verify(public, b"m", signature)
    assert not xeddsa.verify(top_bit, b"m", signature)
