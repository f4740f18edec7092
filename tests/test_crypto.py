"""Key derivation and sealing: separate keys, authenticated blobs, tampering detected."""

from __future__ import annotations

import os

import pytest

from kubespan.crypto import ClusterKeys, hkdf_sha256
from kubespan.errors import CryptoError

SECRET = bytes(range(32))


def test_hkdf_matches_rfc_5869_test_case_1() -> None:
    ikm = bytes.fromhex("0b" * 22)
    salt = bytes.fromhex("000102030405060708090a0b0c")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    okm = hkdf_sha256(ikm, salt, info, 42)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_every_purpose_has_its_own_key() -> None:
    keys = ClusterKeys.derive("cluster", SECRET)
    values = [
        keys.data_key,
        keys.endpoint_key,
        keys.endpoint_siv_key,
        keys.signing_seed,
        keys.affiliate_id_key,
        keys.wireguard_psk,
    ]
    assert len(set(values)) == len(values)
    assert SECRET not in values
    assert all(len(v) == 32 for v in values)


def test_keys_depend_on_cluster_id_and_secret() -> None:
    base = ClusterKeys.derive("cluster", SECRET)
    assert ClusterKeys.derive("cluster2", SECRET).data_key != base.data_key
    assert ClusterKeys.derive("cluster", bytes(32)).data_key != base.data_key
    assert ClusterKeys.derive("cluster", SECRET) == base


def test_no_key_in_repr() -> None:
    keys = ClusterKeys.derive("cluster", SECRET)
    assert keys.data_key.hex() not in repr(keys)
    assert str(keys.data_key) not in repr(keys)


def test_data_round_trip_and_random_nonce() -> None:
    keys = ClusterKeys.derive("cluster", SECRET)
    first = keys.seal_data("aff", b"hello", os.urandom(24))
    second = keys.seal_data("aff", b"hello", os.urandom(24))
    assert first != second
    assert keys.open_data("aff", first) == b"hello"
    assert b"hello" not in first


def flip(blob: bytes, index: int) -> bytes:
    return blob[:index] + bytes([blob[index] ^ 1]) + blob[index + 1 :]


@pytest.mark.parametrize("index", [1, 10, 30, -1])
def test_flipped_bit_is_detected(index: int) -> None:
    keys = ClusterKeys.derive("cluster", SECRET)
    blob = keys.seal_data("aff", b"some affiliate data", os.urandom(24))
    with pytest.raises(CryptoError):
        keys.open_data("aff", flip(blob, index))


def test_blob_moved_to_another_affiliate_or_cluster_is_detected() -> None:
    keys = ClusterKeys.derive("cluster", SECRET)
    other_cluster = ClusterKeys.derive("cluster-b", SECRET)
    blob = keys.seal_data("aff-a", b"data", os.urandom(24))
    with pytest.raises(CryptoError):
        keys.open_data("aff-b", blob)
    with pytest.raises(CryptoError):
        other_cluster.open_data("aff-a", blob)
    endpoint = keys.seal_endpoint("aff-a", b"\xc0\x00\x02\x01\xca\x6c")
    with pytest.raises(CryptoError):
        keys.open_endpoint("aff-b", endpoint)


def test_endpoints_seal_deterministically_per_affiliate() -> None:
    keys = ClusterKeys.derive("cluster", SECRET)
    plain = b"\xc0\x00\x02\x01\xca\x6c"
    assert keys.seal_endpoint("a", plain) == keys.seal_endpoint("a", plain)
    assert keys.seal_endpoint("a", plain) != keys.seal_endpoint("b", plain)
    assert keys.seal_endpoint("a", plain) != keys.seal_endpoint("a", plain[:-1] + b"\x6d")
    assert keys.open_endpoint("a", keys.seal_endpoint("a", plain)) == plain


def test_truncated_or_unknown_version_blob_is_refused() -> None:
    keys = ClusterKeys.derive("cluster", SECRET)
    blob = keys.seal_data("aff", b"data", os.urandom(24))
    for bad in (b"", blob[:20], b"\x02" + blob[1:]):
        with pytest.raises(CryptoError):
            keys.open_data("aff", bad)


def test_cluster_address_is_the_public_signing_key() -> None:
    keys = ClusterKeys.derive("cluster", SECRET)
    assert len(keys.cluster_address) == 43
    assert keys.cluster_address != ClusterKeys.derive("other", SECRET).cluster_address
    assert keys.affiliate_id("node") == keys.affiliate_id("node")
    assert keys.affiliate_id("node") != keys.affiliate_id("node2")
