"""Sealed records: what a node says about itself, checked field by field when it comes back;
sizes that tell the service nothing; one member's bad record harms nothing but itself."""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import replace
from typing import Any

import pytest

from kubespan.crypto import ClusterKeys
from kubespan.discovery.members import open_affiliate, seal_record
from kubespan.discovery.payload import (
    ENDPOINT_BYTES,
    MAX_ADDRESSES,
    MAX_ENDPOINTS,
    MAX_POD_CIDRS,
    SEALED_SIZES,
    decode_endpoint,
    decode_record,
    encode_endpoint,
    encode_record,
    sign_record,
)
from kubespan.discovery.protocol import WireAffiliate
from kubespan.identity import generate_identity
from kubespan.model import AffiliateInfo, MemberRecord
from kubespan.netaddr import Endpoint

from nodes import resign

KEYS = ClusterKeys.derive("cluster", bytes(range(32)))
NODE = generate_identity(os.urandom)
OTHER = generate_identity(os.urandom)


def record(
    hostname: str = "node1",
    addresses: tuple[str, ...] = ("192.0.2.1",),
    endpoints: tuple[str, ...] = ("192.0.2.1:51820",),
    pod_cidrs: tuple[str, ...] = (),
    version: int = 7,
    leave: bool = False,
) -> MemberRecord:
    info = AffiliateInfo(
        node_id=NODE.node_id,
        hostname=hostname,
        public_key=NODE.public_key_b64,
        ula=ipaddress.IPv6Address("fd00::1"),
        addresses=tuple(ipaddress.ip_address(a) for a in addresses),
        pod_cidrs=tuple(ipaddress.ip_network(n) for n in pod_cidrs),
    )
    unsigned = MemberRecord(
        info, tuple(Endpoint.parse(e) for e in endpoints), version, 1_800_000_000, leave
    )
    return sign_record(unsigned, NODE.private_key, os.urandom(64))


def test_a_record_round_trips() -> None:
    original = record(
        addresses=("192.0.2.1", "2001:db8::1"),
        endpoints=("192.0.2.1:51820", "[2001:db8::1]:51820"),
        pod_cidrs=("10.244.1.0/24",),
        leave=True,
    )
    assert decode_record(encode_record(original)) == original


def test_sealed_sizes_do_not_tell_family_or_hostname_length() -> None:
    small = seal_record(KEYS, record(hostname="a"), os.urandom(24))
    large = seal_record(
        KEYS,
        record(
            hostname="a-much-longer-host-name.example.internal",
            addresses=("2001:db8::1", "2001:db8::2", "2001:db8::3"),
            endpoints=("[2001:db8::1]:51820", "[2001:db8::2]:51820"),
        ),
        os.urandom(24),
    )
    assert len(small.data) == len(large.data) == SEALED_SIZES[0]
    v4, v6 = Endpoint.parse("192.0.2.1:1"), Endpoint.parse("[2001:db8::1]:1")
    assert len(encode_endpoint(v4)) == len(encode_endpoint(v6)) == ENDPOINT_BYTES
    assert decode_endpoint(encode_endpoint(v4)) == v4
    assert decode_endpoint(encode_endpoint(v6)) == v6


def test_the_largest_record_fits_the_largest_size() -> None:
    biggest = record(
        hostname=".".join(["h" * 63] * 3) + "." + "h" * 61,
        addresses=tuple(f"2001:db8:ffff:ffff:ffff:ffff:ffff:{i:x}" for i in range(MAX_ADDRESSES)),
        endpoints=tuple(
            f"[2001:db8:ffff:ffff:ffff:ffff:ffff:{i:x}]:65535" for i in range(MAX_ENDPOINTS)
        ),
        pod_cidrs=tuple(f"2001:db8:ffff:{i:x}::/64" for i in range(MAX_POD_CIDRS)),
        version=(1 << 63) - 1,
    )
    sealed = seal_record(KEYS, biggest, os.urandom(24))
    assert len(sealed.data) in SEALED_SIZES
    assert decode_record(encode_record(biggest)) == biggest


def document(signer: bytes | None = None, **changes: Any) -> bytes:
    """A record's plaintext with `changes`, signed again (by `signer`, default the node's own
    key) so that what is tested is the field check, not the signature."""
    base = json.loads(encode_record(record()))
    base.update(changes)
    return resign({k: v for k, v in base.items() if v is not ...}, signer or NODE.private_key)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (document(node_id="n\udc00de"), "node_id"),
        (document(node_id="node-1"), "node_id"),
        (document(node_id="x" * 65), "node_id"),
        (document(hostname="\x1b[2Jfake peer line"), "hostname"),
        (document(hostname="a b"), "hostname"),
        (document(hostname="a" * 64), "hostname"),
        (document(public_key="AAAA"), "public_key"),
        (document(ula="192.0.2.1"), "ula"),
        (document(ula="fe80::1%eth0"), "ula"),
        (document(addresses=["192.0.2.1"] * (MAX_ADDRESSES + 1)), "addresses"),
        (document(addresses=[3232235777]), "addresses"),
        (document(addresses=["192.168.001.001"]), "addresses"),
        (document(pod_cidrs=["10.244.1.1/24"]), "pod_cidrs"),
        (document(endpoints=["192.0.2.1:0"]), "endpoints"),
        (document(endpoints=["[fe80::1%eth0]:51820"]), "endpoints"),
        (document(version=0), "version"),
        (document(version=True), "version"),
        (document(version=1 << 64), "version"),
        (document(version=...), "version"),
        (document(valid_until=-1), "valid_until"),
        (document(leave="yes"), "leave"),
        # Written out null, a field would not encode back as signed (the peer cache encodes
        # kept records again): refused, so it spoils nothing later.
        (document(relay_ports=None), "relay_ports"),
        # Not in canonical form: the same, for the same reason.
        (document(addresses=["2001:DB8::1"]), "canonical form"),
        (document(ula="fd00:0::1"), "canonical form"),
        (document(endpoints=["[2001:db8:0::1]:51820"]), "canonical form"),
        (document(OTHER.private_key), "signature does not verify"),
        (document(public_key=OTHER.public_key_b64), "signature does not verify"),
        (
            document(OTHER.private_key, public_key=OTHER.public_key_b64),
            "node_id is not the one of the record's public_key",
        ),
        (document(public_key=NODE.public_key_b64[:-1] + "x"), "canonical base64"),
        (
            json.dumps({**json.loads(encode_record(record())), "sig": "AAAA"}).encode(),
            "no signature of 64 bytes",
        ),
        (document(v=1), "payload version"),
        (b"[" * 1000, "nested"),
        (b" " * 5000, "larger"),
        (b"\xff", "UTF-8"),
    ],
)
def test_every_field_is_checked(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_record(raw)


def test_fields_of_later_versions_are_ignored_but_signed() -> None:
    later = document(relay_endpoints=["192.0.2.9:51821"], zone="eu-west-1a")
    decoded = decode_record(later)
    assert replace(decoded, signature=b"", later_fields=b"") == replace(record(), signature=b"")
    # Encoded again (the peer cache does), it is the record the node signed, and verifies.
    assert decode_record(encode_record(decoded)) == decoded
    assert json.loads(encode_record(decoded))["zone"] == "eu-west-1a"
    # Still part of what the node signed: changed on the way, the record is refused.
    changed = json.loads(later)
    changed["zone"] = "us-east-1a"
    with pytest.raises(ValueError, match="signature does not verify"):
        decode_record(json.dumps(changed).encode())
    # And within the record's bounds: nothing deeper than two levels.
    with pytest.raises(ValueError, match="nested"):
        decode_record(document(relay={"ports": [1]}))


def test_every_accepted_record_encodes_back_exactly_as_signed() -> None:
    """What the peer cache relies on: a record read is written again byte for byte, so it
    verifies when the cache is loaded."""
    for raw in (
        encode_record(record()),
        document(relay_ports=[29100, 256]),
        document(zone="eu-west-1a"),
    ):
        decoded = decode_record(raw)
        assert json.loads(encode_record(decoded)) == json.loads(raw)


def test_a_bad_record_harms_only_its_affiliate() -> None:
    original = record()
    good = seal_record(KEYS, original, os.urandom(24))
    bad_id = KEYS.affiliate_id(NODE.node_id)
    evil = KEYS.seal_data(bad_id, document(hostname="\x1b[2J"), os.urandom(24))
    opened, problems = open_affiliate(KEYS, WireAffiliate(good.affiliate_id, good.data, (), 60))
    assert opened is not None and opened.record == original and problems == []
    opened, problems = open_affiliate(KEYS, WireAffiliate(bad_id, evil, (), 60))
    assert opened is None and "hostname" in problems[0]


def test_a_record_moved_to_another_affiliate_id_is_refused() -> None:
    sealed = seal_record(KEYS, record(), os.urandom(24))
    other = KEYS.affiliate_id(OTHER.node_id)
    moved = KEYS.seal_data(other, encode_record(record()), os.urandom(24))
    opened, problems = open_affiliate(KEYS, WireAffiliate(other, moved, (), 60))
    assert opened is None and "does not match" in problems[0]
    opened, problems = open_affiliate(KEYS, WireAffiliate(other, sealed.data, (), 60))
    assert opened is None and "authentication" in problems[0]


def test_listed_endpoints_beyond_the_record_are_hints() -> None:
    sealed = seal_record(KEYS, record(), os.urandom(24))
    harvested = KEYS.seal_endpoint(
        sealed.affiliate_id, encode_endpoint(Endpoint.parse("203.0.113.9:40000"))
    )
    junk = b"\x01" + bytes(60)
    listed = WireAffiliate(
        sealed.affiliate_id, sealed.data, (*sealed.endpoints, harvested, junk), 9
    )
    opened, problems = open_affiliate(KEYS, listed)
    assert opened is not None
    assert opened.hints == (Endpoint.parse("203.0.113.9:40000"),)
    assert len(problems) == 1 and "endpoint 2" in problems[0]
