"""rawthread.take_waiting: a turn takes what came, up to its limit, and loses nothing."""

from __future__ import annotations

import socket
from collections import deque

from kubespan.netaddr import Endpoint
from kubespan.rawthread import take_waiting
from kubespan.rawudp import Datagram

SOURCE = Endpoint.parse("198.51.100.1:40000")


class QueuedTransport:
    def __init__(self, count: int) -> None:
        self.waiting = deque(Datagram(SOURCE, i.to_bytes(2, "big"), None) for i in range(count))
        self.waits: list[float] = []

    def receive_datagram(
        self, timeout: float, wake: socket.socket | None = None
    ) -> Datagram | None:
        self.waits.append(timeout)
        return self.waiting.popleft() if self.waiting else None


def test_a_burst_longer_than_a_turn_is_taken_whole_over_turns_in_order() -> None:
    transport = QueuedTransport(130)
    taken: list[bytes] = []
    reader, writer = socket.socketpair()
    with reader, writer:
        counts = [
            take_waiting(
                transport.receive_datagram, 1.0, reader, lambda d: taken.append(d.payload), 64
            )
        ]
        counts += [
            take_waiting(
                transport.receive_datagram, 1.0, reader, lambda d: taken.append(d.payload), 64
            )
        ]
        counts += [
            take_waiting(
                transport.receive_datagram, 1.0, reader, lambda d: taken.append(d.payload), 64
            )
        ]
    assert counts == [64, 64, 2]
    assert taken == [i.to_bytes(2, "big") for i in range(130)]
    # Only the first read of a turn waits; the rest take what is there.
    assert transport.waits[0] == 1.0 and transport.waits[1:64] == [0.0] * 63


def test_nothing_waiting_takes_nothing_after_one_wait() -> None:
    transport = QueuedTransport(0)
    reader, writer = socket.socketpair()
    with reader, writer:
        assert take_waiting(transport.receive_datagram, 0.5, reader, lambda d: None, 64) == 0
    assert transport.waits == [0.5]
