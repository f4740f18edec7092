"""Seal this node's record; open a listing into the records it holds. Keys never leave this
module's callers: the service sees only the blobs made here."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from kubespan.crypto import ClusterKeys
from kubespan.discovery.payload import (
    MAX_VALID_UNTIL,
    decode_endpoint,
    decode_record,
    encode_endpoint,
    encode_record,
    sign_record,
)
from kubespan.discovery.protocol import Listing, WireAffiliate
from kubespan.errors import CryptoError
from kubespan.model import MAX_HINTS, AffiliateInfo, ListedRecord, Member, MemberRecord
from kubespan.netaddr import Endpoint


@dataclass(frozen=True)
class Registration:
    """A sealed record, ready to send to every discovery service."""

    affiliate_id: str
    record: MemberRecord
    data: bytes = field(repr=False)
    endpoints: tuple[bytes, ...] = field(repr=False)


def seal_record(keys: ClusterKeys, record: MemberRecord, nonce: bytes) -> Registration:
    affiliate_id = keys.affiliate_id(record.info.node_id)
    return Registration(
        affiliate_id=affiliate_id,
        record=record,
        data=keys.seal_data(affiliate_id, encode_record(record), nonce),
        # The endpoints again, each sealed deterministically: the service can then tell that
        # an endpoint another member harvests is one the node has already (and drop it).
        endpoints=tuple(
            keys.seal_endpoint(affiliate_id, encode_endpoint(e)) for e in record.endpoints
        ),
    )


def open_affiliate(
    keys: ClusterKeys, affiliate: WireAffiliate
) -> tuple[ListedRecord | None, list[str]]:
    """The record one listed affiliate carries, or None; a problem line for what is wrong.
    Nothing here trusts the service: the record must authenticate for this affiliate id and
    name the node that id belongs to."""
    problems: list[str] = []
    try:
        record = decode_record(keys.open_data(affiliate.id, affiliate.data))
    except (CryptoError, ValueError) as error:
        return None, [f"affiliate {affiliate.id[:48]}: ignored: {error}"]
    if keys.affiliate_id(record.info.node_id) != affiliate.id:
        return None, [f"affiliate {affiliate.id[:48]}: ignored: node id does not match"]
    own = set(record.endpoints)
    hints: list[Endpoint] = []
    for index, blob in enumerate(affiliate.endpoints):
        try:
            endpoint = decode_endpoint(keys.open_endpoint(affiliate.id, blob))
        except (CryptoError, ValueError) as error:
            problems.append(f"affiliate {affiliate.id[:48]}: endpoint {index} ignored: {error}")
            continue
        if endpoint not in own and endpoint not in hints and len(hints) < MAX_HINTS:
            hints.append(endpoint)
    return ListedRecord(record, tuple(hints)), problems


def seal_registration(
    keys: ClusterKeys,
    info: AffiliateInfo,
    endpoints: tuple[Endpoint, ...],
    private_key: bytes,
    version: int = 1,
    valid_until: int = MAX_VALID_UNTIL,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> Registration:
    """Sign and seal a record from its parts (tools and tests; the agent seals its own
    records with versions from its counter and a real expiry). `private_key` is the node's
    WireGuard key."""
    record = MemberRecord(info, endpoints, version, valid_until)
    signed = sign_record(record, private_key, random_bytes(64))
    return seal_record(keys, signed, random_bytes(24))


def open_listing(keys: ClusterKeys, listing: Listing) -> tuple[tuple[Member, ...], list[str]]:
    """The members a listing's records describe (leave records left out), as they stand in
    this one listing; the agent folds records over time instead (plan/membership.py)."""
    members: list[Member] = []
    problems: list[str] = []
    for affiliate in listing.affiliates:
        opened, found = open_affiliate(keys, affiliate)
        problems.extend(found)
        if opened is not None and not opened.record.leave:
            record = opened.record
            members.append(Member(record.info, record.endpoints + opened.hints))
    return tuple(members), problems
