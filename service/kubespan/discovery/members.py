"""Seal this node's registration; open a listing into members. Keys never leave this module's
callers: the server sees only the blobs made here."""

from __future__ import annotations

from dataclasses import dataclass, field

from kubespan.crypto import ClusterKeys
from kubespan.discovery.payload import decode_endpoint, decode_info, encode_endpoint, encode_info
from kubespan.discovery.protocol import Listing
from kubespan.errors import CryptoError
from kubespan.model import AffiliateInfo, Member
from kubespan.netaddr import Endpoint


@dataclass(frozen=True)
class Registration:
    affiliate_id: str
    data: bytes = field(repr=False)
    endpoints: tuple[bytes, ...] = field(repr=False)


def seal_registration(
    keys: ClusterKeys, info: AffiliateInfo, endpoints: tuple[Endpoint, ...], nonce: bytes
) -> Registration:
    affiliate_id = keys.affiliate_id(info.node_id)
    return Registration(
        affiliate_id=affiliate_id,
        data=keys.seal_data(affiliate_id, encode_info(info), nonce),
        endpoints=tuple(keys.seal_endpoint(affiliate_id, encode_endpoint(e)) for e in endpoints),
    )


def open_listing(keys: ClusterKeys, listing: Listing) -> tuple[tuple[Member, ...], list[str]]:
    """Members whose blobs authenticate and parse; a problem line for each that does not."""
    members: list[Member] = []
    problems: list[str] = []
    for affiliate in listing.affiliates:
        try:
            info = decode_info(keys.open_data(affiliate.id, affiliate.data))
        except (CryptoError, ValueError) as error:
            problems.append(f"affiliate {affiliate.id}: ignored: {error}")
            continue
        if keys.affiliate_id(info.node_id) != affiliate.id:
            problems.append(f"affiliate {affiliate.id}: ignored: node id does not match")
            continue
        endpoints: list[Endpoint] = []
        for index, blob in enumerate(affiliate.endpoints):
            try:
                endpoint = decode_endpoint(keys.open_endpoint(affiliate.id, blob))
            except (CryptoError, ValueError) as error:
                problems.append(f"affiliate {affiliate.id}: endpoint {index} ignored: {error}")
                continue
            if endpoint not in endpoints:
                endpoints.append(endpoint)
        members.append(Member(info, tuple(endpoints)))
    return tuple(members), problems


def merge_members(sources: list[tuple[Member, ...]]) -> tuple[Member, ...]:
    """Members seen through several discovery services, merged by node id."""
    merged: dict[str, Member] = {}
    for members in sources:
        for member in members:
            known = merged.get(member.info.node_id)
            if known is None:
                merged[member.info.node_id] = member
                continue
            extra = tuple(e for e in member.endpoints if e not in known.endpoints)
            merged[member.info.node_id] = Member(known.info, known.endpoints + extra)
    return tuple(merged[k] for k in sorted(merged))
