"""Which two ports of a relay's carry a pair: computed alike by both sides and the relay,
from the three WireGuard keys, so nobody has to tell anybody. A pair whose slot another pair
already holds is refused with PORT_TAKEN and both sides move on to the next attempt."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

_PERSON = b"kubespan-relaypt"
MAX_ATTEMPTS = 8


@dataclass(frozen=True)
class PortRange:
    """The relay's ports for pairs: `first` and the `count - 1` after it (an even count)."""

    first: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 2 or self.count % 2 or not 1 <= self.first <= 65536 - self.count:
            raise ValueError(
                f"relay ports {self.first}+{self.count}: an even count of at least 2, "
                "all within 1 to 65535"
            )

    @property
    def pairs(self) -> int:
        return self.count // 2

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port < self.first + self.count


def pair_ports(
    ports: PortRange, relay: bytes, side: bytes, peer: bytes, attempt: int
) -> tuple[int, int]:
    """(the port `side` sends to, the port `peer` sends to) at this relay, for this attempt."""
    if side == peer:
        raise ValueError("a pair has two different sides")
    low, high = sorted((side, peer))
    digest = hashlib.blake2b(
        relay + low + high + bytes([attempt]), digest_size=8, person=_PERSON
    ).digest()
    first = ports.first + 2 * (int.from_bytes(digest, "big") % ports.pairs)
    return (first, first + 1) if side == low else (first + 1, first)
