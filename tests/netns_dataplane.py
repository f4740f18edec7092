"""Run kubespan's dataplane code inside a network namespace (the caller runs this file with
`ip netns exec`): plan the ruleset and routing for the members given on stdin, diff against
the kernel, apply, and print the operations as JSON. No WireGuard here: the test provides a
stand-in link named `kubespan`."""

from __future__ import annotations

import ipaddress
import json
import sys

from pyroute2 import IPRoute

from kubespan.apply.dataplane import Dataplane
from kubespan.apply.libnft import Nft
from kubespan.errors import ApplyError
from kubespan.names import LINK_NAME
from kubespan.plan.dataplane import diff_dataplane
from kubespan.plan.ipset import collapse
from kubespan.plan.ruleset import RulesetSpec, routing_spec


def spec_from(document: dict[str, object]) -> RulesetSpec:
    members = [ipaddress.ip_network(str(m)) for m in document["members"]]  # type: ignore[attr-defined]
    v4 = collapse([n for n in members if n.version == 4], 4)
    v6 = collapse([n for n in members if n.version == 6], 6)
    return RulesetSpec(v4, v6, int(document.get("mtu", 1420)))  # type: ignore[call-overload]


def main() -> int:
    command = sys.argv[1]
    document = json.loads(sys.stdin.read() or "{}")
    with IPRoute() as ipr:
        dataplane = Dataplane(ipr)
        try:
            if command == "teardown":
                print(json.dumps({"removed": dataplane.teardown()}))
                return 0
            spec = spec_from(document)
            routing = routing_spec(spec.mtu)
            observed = dataplane.observe(LINK_NAME)
            before, after = diff_dataplane(spec, routing, LINK_NAME, observed)
            operations = [*before, *after]
            if command == "apply-broken":
                # An element of the wrong family makes libnftables refuse the whole batch.
                broken = spec.to_json()
                for item in broken["nftables"]:
                    if "set" in item.get("add", {}) and item["add"]["set"]["name"] == "members_v4":
                        item["add"]["set"]["elem"] = [{"prefix": {"addr": "2001:db8::", "len": 64}}]
                try:
                    Nft().run(broken)
                except ApplyError as error:
                    print(json.dumps({"error": str(error)}))
                    return 0
                print(json.dumps({"error": None}))
                return 1
            dataplane.apply(operations)
            print(json.dumps({"operations": [op.render() for op in operations]}))
        finally:
            dataplane.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
