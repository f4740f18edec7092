"""A relay inside a test's network namespace: RelayServer on real raw sockets and the real
nftables table, for the members named in the spec file; prints {"ready": true}, then
{"pairs": n} each time the forwarded pairs change, and stops when stdin closes.

    netns_relay_node.py SPEC.json
    spec: {"private": b64, "public": b64, "bind_key": b64, "members": [b64...],
           "first": port, "count": n}
"""

from __future__ import annotations

import base64
import json
import logging
import sys
import threading
import time
from pathlib import Path

from kubespan.relay.ports import PortRange
from kubespan.relay.server import RelayServer


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    spec = json.loads(Path(sys.argv[1]).read_text())
    raw = base64.b64decode
    server = RelayServer(
        raw(spec["private"]),
        raw(spec["public"]),
        raw(spec["bind_key"]),
        PortRange(spec["first"], spec["count"]),
        max_pairs=16,
    )
    server.set_members(raw(k) for k in spec["members"])
    server.start()
    if not server.ready.wait(10):
        sys.exit("the relay did not get ready")  # its log says why
    done = threading.Event()

    def watch() -> None:
        shown = -1
        while not done.is_set():
            pairs = len(server.forwarding().pairs)
            if pairs != shown:
                print(json.dumps({"pairs": pairs}), flush=True)
                shown = pairs
            time.sleep(0.05)

    print(json.dumps({"ready": True}), flush=True)
    threading.Thread(target=watch, daemon=True).start()
    sys.stdin.read()
    done.set()
    server.stop()
    server.join(10)


if __name__ == "__main__":
    main()
