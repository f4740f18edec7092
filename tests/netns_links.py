"""Run the kernel shell's link and address code (apply/kernel.py over apply/links.py) inside
a network namespace, for tests/test_netns_links.py; started with `ip netns exec`.

    netns_links.py observe NAME        -> {"addresses", "hardware", "link", "index"} (JSON)
    netns_links.py apply OPS           -> {"applied": n} or {"error": "..."}; OPS is a JSON
                                          list of ["mtu", link, n] | ["up", link] |
                                          ["add", link, cidr] | ["del", link, cidr] |
                                          ["create", link]
    netns_links.py teardown            -> {"removed": [...]}
"""

from __future__ import annotations

import ipaddress
import json
import sys
from typing import Any

from kubespan.apply.kernel import Kernel
from kubespan.errors import ApplyError
from kubespan.plan.diff import (
    AddAddress,
    CreateLink,
    LinkOperation,
    RemoveAddress,
    SetLinkMtu,
    SetLinkUp,
)


def operation(item: list[Any]) -> LinkOperation:
    match item:
        case ["mtu", name, mtu]:
            return SetLinkMtu(name, int(mtu))
        case ["up", name]:
            return SetLinkUp(name)
        case ["add", name, cidr]:
            return AddAddress(name, ipaddress.ip_interface(cidr))
        case ["del", name, cidr]:
            return RemoveAddress(name, ipaddress.ip_interface(cidr))
        case ["create", name]:
            return CreateLink(name)
    raise ValueError(f"unknown operation {item}")


def main() -> None:
    command = sys.argv[1]
    with Kernel() as kernel:
        if command == "observe":
            link = kernel.observe_link_base(sys.argv[2])
            out: dict[str, Any] = {
                "addresses": [
                    [a.interface, str(a.address), a.scope, a.link_up, a.link_kind]
                    for a in kernel.local_addresses()
                ],
                "hardware": [[h.name, h.mac, h.physical] for h in kernel.link_hardware()],
                "link": None
                if link is None
                else {
                    "mtu": link.mtu,
                    "up": link.up,
                    "kind": link.kind,
                    "addresses": [str(a) for a in link.addresses],
                },
                "index": kernel.link_index(sys.argv[2]),
            }
        elif command == "apply":
            operations = [operation(item) for item in json.loads(sys.argv[2])]
            try:
                kernel.apply(operations)
                out = {"applied": len(operations)}
            except ApplyError as error:
                out = {"error": str(error)}
        else:
            out = {"removed": kernel.teardown()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
