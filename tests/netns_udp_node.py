"""A UDP node inside a test's network namespace: plain sockets on the given ports report
what arrives, and datagrams are sent through a raw socket with a checksum computed here
(so the checksum field on the wire is real, not left for an offloading device to fill).

    netns_udp_node.py PORT[,PORT...] SOURCE_ADDRESS
    stdin:  {"to": "ip:port", "from_port": 51820, "data": "<hex>"} per line
    stdout: {"ready": true}, then {"port": p, "from": "ip:port", "data": "<hex>"} per datagram
"""

from __future__ import annotations

import ipaddress
import json
import select
import socket
import sys
import threading

from kubespan.netaddr import Endpoint
from kubespan.rawudp import udp_segment

lock = threading.Lock()


def say(document: dict[str, object]) -> None:
    with lock:
        sys.stdout.write(json.dumps(document) + "\n")
        sys.stdout.flush()


def receive(sockets: list[socket.socket]) -> None:
    while True:
        readable, _, _ = select.select(sockets, [], [])
        for sock in readable:
            data, (host, port) = sock.recvfrom(65535)
            where = sock.getsockname()[1]
            say({"port": where, "from": f"{host}:{port}", "data": data.hex()})


def main() -> None:
    ports = [int(p) for p in sys.argv[1].split(",")]
    source = ipaddress.ip_address(sys.argv[2])  # where it listens and sends from
    sockets = []
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((str(source), port))
        sockets.append(sock)
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    raw.bind((str(source), 0))
    threading.Thread(target=receive, args=(sockets,), daemon=True).start()
    say({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        destination = Endpoint.parse(request["to"])
        segment = udp_segment(
            source, destination, request["from_port"], bytes.fromhex(request["data"])
        )
        raw.sendto(segment, (str(destination.address), 0))


if __name__ == "__main__":
    main()
