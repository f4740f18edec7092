"""Our nftables table, and proof of what it holds.

How drift is noticed without guessing nft's output format: after applying a ruleset we list
the table back and remember a digest of that listing (nft's own canonical text, without
handles or counter values: apply.libnft), with the nftables generation at which it was
taken. Every committed nftables transaction, ours or anyone's, bumps the generation (one
counter per network namespace), so:

- generation unchanged since we last proved the table: nothing in nftables changed, the
  table is ours as applied (no listing: a no-change pass costs one small netlink request);
- generation moved (another program changed some table, or ours): list ours, and it is ours
  as applied exactly when the digest is the one remembered. Any difference at all (an element
  swapped, a rule replaced by `accept`, a chain's policy, priority or hook, a rule added, a
  set's flags) changes the digest, so the diff replaces the table whole, atomically.

The remembered digest is trusted only if it was taken when our transaction was the only one
committed since the generation read before it (generation + 1); otherwise a foreign change
could have slipped in between and been learnt as ours, and nothing is remembered: the next
pass replaces the table again. Nothing is remembered across restarts either, so the first
pass of an agent replaces the table once.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import struct
from dataclasses import dataclass

from kubespan.apply.libnft import Nft
from kubespan.apply.netlink import NLM_F_ACK, Message, attribute_map, be32
from kubespan.apply.nlsocket import NetlinkSocket
from kubespan.errors import ApplyError
from kubespan.names import NFT_FAMILY, NFT_TABLE
from kubespan.plan.dataplane import ObservedRuleset
from kubespan.plan.ruleset import RulesetSpec, teardown_batch

log = logging.getLogger(__name__)

NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
NFNETLINK_V0 = 0
NFGENMSG = struct.Struct("=BBH")  # family, version, resource id


def generation_request() -> tuple[int, bytes]:
    return (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN, NFGENMSG.pack(
        socket.AF_UNSPEC, NFNETLINK_V0, 0
    )


def parse_generation(answer: list[Message]) -> int:
    for message in answer:
        if message.type == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
            attrs = attribute_map(message.payload[NFGENMSG.size :])
            if NFTA_GEN_ID in attrs:
                return be32(attrs[NFTA_GEN_ID])
    raise ApplyError("the kernel did not report the nftables generation")


def digest(listing: str) -> str:
    return hashlib.sha256(listing.encode()).hexdigest()


@dataclass(frozen=True)
class Proven:
    """At `generation` the table was exactly the ruleset `fingerprint`, listed as `digest`."""

    fingerprint: str
    digest: str
    generation: int


class NftTable:
    """Our table in the current network namespace: observe it, replace it, delete it."""

    def __init__(self, nft: Nft, netfilter: NetlinkSocket) -> None:
        self._nft = nft
        self._netfilter = netfilter
        self._proven: Proven | None = None

    def close(self) -> None:
        self._nft.close()
        self._netfilter.close()

    def generation(self) -> int:
        kind, payload = generation_request()
        return parse_generation(self._netfilter.request(kind, NLM_F_ACK, payload))

    def observe(self) -> ObservedRuleset | None:
        before = self.generation()
        proven = self._proven
        if proven is not None and proven.generation == before:
            return ObservedRuleset(proven.fingerprint)
        listing = self._list()
        if listing is None:
            return None
        if proven is not None and digest(listing) == proven.digest:
            if self.generation() == before:  # the listing is of generation `before`
                self._proven = Proven(proven.fingerprint, proven.digest, before)
            return ObservedRuleset(proven.fingerprint)
        if proven is not None:
            log.warning(
                "drift: table=%s %s differs from the ruleset applied fingerprint=%s",
                NFT_FAMILY,
                NFT_TABLE,
                proven.fingerprint[:12],
            )
        return ObservedRuleset(None)

    def replace(self, spec: RulesetSpec) -> None:
        before = self.generation()
        self._proven = None
        self._nft.run(spec.batch())
        listing = self._list()
        after = self.generation()
        if listing is not None and after == (before + 1) & 0xFFFFFFFF:
            self._proven = Proven(spec.fingerprint, digest(listing), after)
        else:
            log.info(
                "unverified: another nftables change came with ours, table=%s %s "
                "generation_before=%d generation_after=%d: the next pass replaces it again",
                NFT_FAMILY,
                NFT_TABLE,
                before,
                after,
            )

    def delete(self) -> None:
        self._proven = None
        self._nft.run(teardown_batch())

    def remove_other(self, family: str, name: str) -> bool:
        """Delete another table of ours (the relay's), if it exists; whether it did."""
        try:
            self._nft.run(f"list table {family} {name}")
        except ApplyError:
            return False
        self._nft.run(f"add table {family} {name}\ndelete table {family} {name}\n")
        return True

    def _list(self) -> str | None:
        try:
            return self._nft.run(f"list table {NFT_FAMILY} {NFT_TABLE}")
        except ApplyError:
            return None  # no such table
