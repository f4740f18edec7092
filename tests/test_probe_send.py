"""What the liveness prober sends, on a recording socket (tests/test_netns_probe.py sends on
the real kernel): each target's echo request to its address, however often the same target
comes (one packet, a sequence number per round), and its memory of targets' text bounded
when peers come and go."""

from __future__ import annotations

import ipaddress
import struct

from kubespan.apply.probe import ICMP6_ECHO_REQUEST, PAYLOAD, TunnelProber


class RecordingSocket:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, packet: bytes, destination: tuple[str, int]) -> int:
        self.sent.append((packet, destination))
        return len(packet)

    def close(self) -> None:
        pass


def prober() -> tuple[TunnelProber, RecordingSocket]:
    made, sock = TunnelProber(), RecordingSocket()
    made._socket = sock  # type: ignore[assignment]
    return made, sock


def test_each_round_sends_one_echo_request_to_each_target() -> None:
    made, sock = prober()
    targets = [ipaddress.IPv6Address(f"fd00:1:2:3::{n:x}") for n in range(1, 6)]
    for _ in range(3):
        assert made.send(targets) == len(targets)
    assert [d for _, d in sock.sent] == [(str(t), 0) for t in targets] * 3
    sequences = []
    for packet, _ in sock.sent:
        kind, code, _, _, sequence = struct.unpack("!BBHHH", packet[:8])
        assert (kind, code, packet[8:]) == (ICMP6_ECHO_REQUEST, 0, PAYLOAD)
        sequences.append(sequence)
    # One packet per round (answers are not read): a sequence number per round.
    rounds = [sequences[i : i + len(targets)] for i in range(0, len(sequences), len(targets))]
    assert all(len(set(r)) == 1 for r in rounds)
    assert len({r[0] for r in rounds}) == len(rounds)


def test_targets_that_come_and_go_do_not_grow_what_it_remembers() -> None:
    made, sock = prober()
    for generation in range(200):
        targets = [ipaddress.IPv6Address(f"fd00:{generation:x}::{n:x}") for n in range(1, 11)]
        made.send(targets)
        assert sock.sent[-1][1] == (str(targets[-1]), 0)
    assert len(made._destinations) <= 2 * 10 + 64 + 10
