"""One side of a pair binding at a relay, inside a test's network namespace: BIND from the
WireGuard port (raw sockets, as the agent's will) with attempts 0, 1, ... until the relay
answers BOUND; prints the authentic answers it got, one JSON line each.

    netns_relay_side.py SPEC.json
    spec: {"private": b64, "public": b64, "peer": b64, "relay": b64, "bind_key": b64,
           "relay_at": "ip", "first": port, "count": n, "from_port": 51820, "binds": n}
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import sys
import time
from pathlib import Path

from kubespan.netaddr import Endpoint
from kubespan.pathcheck.codec import pair_key
from kubespan.rawudp import RawUdpPort
from kubespan.relay import bind
from kubespan.relay.ports import MAX_ATTEMPTS, PortRange, pair_ports
from kubespan.relay.server import BIND_MATCH


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    raw = base64.b64decode
    private, public, peer, relay = (raw(spec[k]) for k in ("private", "public", "peer", "relay"))
    key = pair_key(private, relay, public, raw(spec["bind_key"]))
    ports = PortRange(spec["first"], spec["count"])
    relay_at = ipaddress.ip_address(spec["relay_at"])
    with RawUdpPort(spec["from_port"], BIND_MATCH) as transport:
        attempt, bound = 0, 0
        while bound < spec["binds"] and attempt < MAX_ATTEMPTS:
            port = pair_ports(ports, relay, public, peer, attempt)[0]
            message = bind.BindMessage(
                bind.Kind.BIND, public, peer, attempt, time.time_ns() // 1_000_000,
                os.urandom(bind.TRANSACTION_ID_BYTES),
            )  # fmt: skip
            transport.send(Endpoint(relay_at, port), bind.encode(message, key))
            deadline = time.monotonic() + 5
            while (left := deadline - time.monotonic()) > 0:
                got = transport.receive(left)
                if got is None:
                    continue
                source, payload = got
                if not bind.authentic(payload, key):
                    continue
                answer = bind.parse(payload)
                if answer.transaction_id != message.transaction_id:
                    continue
                print(json.dumps({
                    "kind": answer.kind.name,
                    "reason": answer.reason.name if answer.reason else None,
                    "observed": str(answer.observed) if answer.observed else None,
                    "from": str(source),
                    "port": port,
                }), flush=True)  # fmt: skip
                if answer.kind == bind.Kind.BOUND:
                    bound += 1
                elif answer.reason == bind.Refusal.PORT_TAKEN:
                    attempt += 1
                break
            else:
                print(json.dumps({"kind": "NONE", "port": port}), flush=True)
                return
            time.sleep(0.05)


if __name__ == "__main__":
    main()
