"""Probe STUN reflectors from port 51820 inside a network namespace, for the netns tests.

The caller starts this file with `ip netns exec`. It binds a plain UDP socket to the listen
port first (standing in for the kernel's WireGuard socket, which the host lacks), asks the
discovery service at argv[1] for its reflectors (hello), probes them `count` times through
the raw socket, and prints one JSON document:

  {"reflectors": [...], "probes": [{"mapped": {reflector: endpoint|null}, "mapping": M,
   "seconds": S}, ...], "stand_in_received": N}
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
import time
import urllib.parse

from kubespan.crypto import ClusterKeys
from kubespan.discovery.client import DiscoveryClient
from kubespan.stun.prober import probe

LISTEN_PORT = 51820


def main() -> None:
    url, count = sys.argv[1], int(sys.argv[2])
    stand_in = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # The port is taken, as WireGuard's would be (in the test's own namespace).
    stand_in.bind(("0.0.0.0", LISTEN_PORT))  # noqa: S104
    stand_in.setblocking(False)
    client = DiscoveryClient(url, ClusterKeys.derive("stun-lab", os.urandom(32)))
    service = ipaddress.ip_address(urllib.parse.urlsplit(url).hostname or "")
    reflectors = client.hello_info().reflectors([service])
    client.close()
    probes = []
    for _ in range(count):
        started = time.monotonic()
        result = probe(LISTEN_PORT, reflectors)
        probes.append(
            {
                "mapped": {
                    str(a.reflector): None if a.mapped is None else str(a.mapped)
                    for a in result.answers
                },
                "mapping": result.mapping.value,
                "seconds": time.monotonic() - started,
            }
        )
    received = 0
    while True:
        try:
            stand_in.recv(2048)
        except BlockingIOError:
            break
        received += 1
    document = {
        "reflectors": [str(r) for r in reflectors],
        "probes": probes,
        "stand_in_received": received,
    }
    print(json.dumps(document), flush=True)


if __name__ == "__main__":
    main()
