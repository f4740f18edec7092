"""One raw netlink socket for requests: send a request, read its answer (a dump, a reply,
or an acknowledgement). Only answers from the kernel to this request are taken."""

from __future__ import annotations

import errno
import os
import socket

from kubespan.apply.netlink import (
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_NOOP,
    Message,
    encode_message,
    error_code,
    split_messages,
)

SOL_NETLINK = 270
NETLINK_GET_STRICT_CHK = 12
RECEIVE_BUFFER = 1 << 17  # the kernel's dump datagrams are at most 32 KiB
TIMEOUT = 5.0  # the kernel answers at once; this only bounds a broken socket
DUMP_TRIES = 3


class NetlinkSocket:
    def __init__(self, protocol: int, strict: bool = False) -> None:
        """`strict`: the kernel checks dump requests and honours their filters (a route dump
        for one table returns only that table's routes)."""
        self._socket = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol
        )
        if strict:
            self._socket.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
        self._socket.settimeout(TIMEOUT)
        self._socket.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._socket.close()

    def request(self, kind: int, flags: int, payload: bytes) -> list[Message]:
        """The messages answering one request; OSError with the kernel's errno if refused.
        A dump ends with NLMSG_DONE; anything else must ask for an acknowledgement. A dump
        the kernel marks interrupted (its data changed meanwhile: a peer or link may be
        missing from it) is asked again, and refused with EINTR if it stays so."""
        if not flags & (NLM_F_DUMP | NLM_F_ACK):
            raise ValueError("a request must be a dump or ask for an acknowledgement")
        for _ in range(DUMP_TRIES):
            answer, interrupted = self._exchange(kind, flags, payload)
            if not interrupted:
                return answer
        raise OSError(errno.EINTR, "netlink dump interrupted again and again: data changing")

    def _exchange(self, kind: int, flags: int, payload: bytes) -> tuple[list[Message], bool]:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        self._socket.send(encode_message(kind, flags | NLM_F_REQUEST, seq, payload))
        answer: list[Message] = []
        interrupted = False
        while True:
            data, _, msg_flags, address = self._socket.recvmsg(RECEIVE_BUFFER)
            if msg_flags & socket.MSG_TRUNC:
                raise OSError(f"netlink answer larger than {RECEIVE_BUFFER} bytes")
            if address[0] != 0:
                continue  # not from the kernel
            for message in split_messages(data):
                if message.seq != seq or message.type == NLMSG_NOOP:
                    continue  # an answer to an earlier, abandoned request
                interrupted |= bool(message.flags & NLM_F_DUMP_INTR)
                if message.type == NLMSG_ERROR:
                    code = error_code(message)
                    if code:
                        raise OSError(code, os.strerror(code))
                    return answer, interrupted
                if message.type == NLMSG_DONE:
                    return answer, interrupted
                answer.append(message)
