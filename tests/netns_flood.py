"""Run inside a test's network namespace: signed hellos from many IPv6 source addresses
(given as a prefix and a count, bound through an AnyIP local route), one connection each.
Prints {"codes": [...], "addresses": [...]} as JSON."""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import sys

from kubespan.crypto import ClusterKeys
from kubespan.discovery.signing import sign


def hello(url: str, keys: ClusterKeys, source: str) -> tuple[int, str]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    target = f"/v1/clusters/{keys.cluster_address}/hello"
    headers = sign(
        keys.signing_key, "GET", target, b"", int(__import__("time").time()), os.urandom(16),
        service_url=url,
    ).as_dict()  # fmt: skip
    connection = http.client.HTTPConnection(
        host.strip("[]"), int(port), timeout=10, source_address=(source, 0)
    )
    try:
        connection.request("GET", target, headers=headers)
        response = connection.getresponse()
        body = json.loads(response.read())
        return response.status, str(body.get("client_address", ""))
    finally:
        connection.close()


def main() -> int:
    url, prefix, count = sys.argv[1], ipaddress.IPv6Network(sys.argv[2]), int(sys.argv[3])
    keys = ClusterKeys.derive("flood", bytes(32))
    codes, addresses = [], []
    for index in range(count):
        code, seen = hello(url, keys, str(prefix[index * 7919 + 1]))
        codes.append(code)
        addresses.append(seen)
    print(json.dumps({"codes": codes, "addresses": addresses}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
