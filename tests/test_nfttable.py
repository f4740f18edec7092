"""Proving the table is ours as applied: the listing's digest, and the nftables generation.
A fake libnftables and a fake generation counter stand in for the kernel here, to check the
logic (when to list, what to trust); the netns tests show that nft's listing changes with
every kind of drift, on the real kernel."""

from __future__ import annotations

import ipaddress
import struct

from kubespan.apply.netlink import Message
from kubespan.apply.nfttable import NFNL_SUBSYS_NFTABLES, NFT_MSG_NEWGEN, NftTable, parse_generation
from kubespan.errors import ApplyError
from kubespan.plan.dataplane import ObservedRuleset
from kubespan.plan.ruleset import RulesetSpec

SPEC = RulesetSpec((ipaddress.ip_network("192.0.2.1/32"),), (), 1420, 51820)
LISTING = """table inet kubespan {
	set members_v4 {
		type ipv4_addr
		flags interval
		elements = { 192.0.2.1 }
	}
}
"""


class FakeNft:
    def __init__(self) -> None:
        self.listing: str | None = None
        self.lists = 0
        self.generation = 1
        self.meddle_on_apply = False

    def run(self, script: str) -> str:
        if script.startswith("list"):
            self.lists += 1
            if self.listing is None:
                raise ApplyError("No such file or directory")
            return self.listing
        self.listing = LISTING if script.rstrip().endswith("}") else None  # made or deleted
        self.generation += 2 if self.meddle_on_apply else 1
        return ""

    def close(self) -> None:
        pass


class FakeNetfilter:
    def __init__(self, nft: FakeNft) -> None:
        self.nft = nft

    def request(self, kind: int, flags: int, payload: bytes) -> list[Message]:
        gen = struct.pack("=HH", 8, 1) + struct.pack("!I", self.nft.generation)
        reply = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN
        return [Message(reply, 0, 1, 0, bytes(4) + gen)]

    def close(self) -> None:
        pass


def table() -> tuple[NftTable, FakeNft]:
    nft = FakeNft()
    return NftTable(nft, FakeNetfilter(nft)), nft  # type: ignore[arg-type]


def test_no_table_and_a_table_we_cannot_vouch_for() -> None:
    ours, nft = table()
    assert ours.observe() is None
    nft.listing = LISTING  # there, but not applied by this process
    assert ours.observe() == ObservedRuleset(None)


def test_unchanged_generation_needs_no_listing() -> None:
    ours, nft = table()
    ours.replace(SPEC)
    lists = nft.lists
    for _ in range(3):
        assert ours.observe() == ObservedRuleset(SPEC.fingerprint)
    assert nft.lists == lists


def test_someone_elses_change_costs_one_listing() -> None:
    ours, nft = table()
    ours.replace(SPEC)
    nft.generation += 1  # kube-proxy changed its own table
    assert ours.observe() == ObservedRuleset(SPEC.fingerprint)
    lists = nft.lists
    assert ours.observe() == ObservedRuleset(SPEC.fingerprint)
    assert nft.lists == lists  # the new generation is proven too


def test_a_change_to_our_table_is_drift() -> None:
    ours, nft = table()
    ours.replace(SPEC)
    nft.listing = LISTING.replace("interval", "interval, timeout")
    nft.generation += 1
    assert ours.observe() == ObservedRuleset(None)


def test_a_change_slipped_in_with_ours_is_not_learnt_as_ours() -> None:
    ours, nft = table()
    nft.meddle_on_apply = True  # another transaction committed between ours and the listing
    ours.replace(SPEC)
    assert ours.observe() == ObservedRuleset(None)
    nft.meddle_on_apply = False
    ours.replace(SPEC)
    assert ours.observe() == ObservedRuleset(SPEC.fingerprint)


def test_deleted_is_gone() -> None:
    ours, _ = table()
    ours.replace(SPEC)
    ours.delete()
    assert ours.observe() is None


def test_the_generation_is_read_from_the_kernels_answer() -> None:
    gen = struct.pack("=HH", 8, 1) + struct.pack("!I", 0x01020304)
    reply = Message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN, 0, 1, 0, bytes(4) + gen)
    assert parse_generation([reply]) == 0x01020304
