"""Run kubespan's dataplane code inside a network namespace, for the netns tests.

The caller starts this file with `ip netns exec`. It keeps one Dataplane for its life, as the
agent does (the Dataplane remembers what it applied, to recognise drift), and answers JSON
requests, one per line on stdin, with JSON lines on stdout:

  {"id": 1, "do": "apply", "spec": S}   observe, diff, apply -> {"id": 1, "operations": [...]}
  {"id": 2, "do": "diff", "spec": S}    observe and diff only -> {"id": 2, "operations": [...]}
  {"id": 3, "do": "teardown"}           -> {"id": 3, "removed": [...]}
  {"id": 4, "do": "apply-broken", "spec": S}  a batch libnftables refuses -> {"id": 4, "error"}
  {"id": 5, "do": "watch", "spec": S}   reconcile now and on every KernelWatcher callback, no
                                        tick; each pass prints {"pass": N, "reason": R,
                                        "operations": [...], "error": E}

S is {"members": [CIDR, ...], "mtu": 1420, "listen_port": 51820}. No WireGuard here: the
test provides a stand-in link named `kubespan`. End of input stops the helper.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import threading
from dataclasses import replace
from typing import Any

from kubespan.apply.dataplane import Dataplane
from kubespan.apply.libnft import Nft
from kubespan.apply.watch import KernelWatcher
from kubespan.errors import ApplyError
from kubespan.names import LINK_NAME
from kubespan.plan.dataplane import DataplaneOperation, diff_dataplane
from kubespan.plan.ipset import collapse
from kubespan.plan.ruleset import RulesetSpec, routing_spec


def spec_from(document: dict[str, Any]) -> RulesetSpec:
    members = [ipaddress.ip_network(str(m)) for m in document["members"]]
    v4 = collapse([n for n in members if n.version == 4], 4)
    v6 = collapse([n for n in members if n.version == 6], 6)
    relay = document.get("relay_ports")
    return RulesetSpec(
        v4,
        v6,
        int(document.get("mtu", 1420)),
        int(document["listen_port"]),
        (int(relay[0]), int(relay[1])) if relay else None,
    )


class Helper:
    def __init__(self) -> None:
        self.dataplane = Dataplane()
        self.lock = threading.Lock()  # the Dataplane is used by one thread at a time
        self.out = threading.Lock()
        self.wake = threading.Event()
        self.reasons: list[str] = []
        self.watcher: KernelWatcher | None = None

    def say(self, document: dict[str, Any]) -> None:
        with self.out:
            print(json.dumps(document), flush=True)

    def plan(self, spec: RulesetSpec) -> list[DataplaneOperation]:
        observed = self.dataplane.observe(LINK_NAME)
        before, after = diff_dataplane(spec, routing_spec(spec.mtu), LINK_NAME, observed)
        return [*before, *after]

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request["do"]
        if command == "teardown":
            with self.lock:
                return {"removed": self.dataplane.teardown()}
        spec = spec_from(request["spec"])
        if command == "apply-broken":
            return {"error": broken_batch(spec)}
        if command == "watch":
            self.start_watch(spec)
            return {"watching": True}
        with self.lock:
            operations = self.plan(spec)
            if command == "apply":
                self.dataplane.apply(operations)
        return {"operations": [op.render() for op in operations]}

    def start_watch(self, spec: RulesetSpec) -> None:
        def on_change(reason: str) -> None:
            with self.out:
                self.reasons.append(reason)
            self.wake.set()

        self.watcher = KernelWatcher(on_change)
        self.watcher.start()
        on_change("start")
        threading.Thread(target=self.reconcile, args=(spec,), daemon=True).start()

    def reconcile(self, spec: RulesetSpec) -> None:
        """One pass per wake-up: what the agent's loop does with the watcher's events."""
        count = 0
        while True:
            self.wake.wait()
            self.wake.clear()
            with self.out:
                reason, self.reasons = "; ".join(self.reasons), []
            count += 1
            report: dict[str, Any] = {"pass": count, "reason": reason, "error": None}
            with self.lock:
                try:
                    operations = self.plan(spec)
                    self.dataplane.apply(operations)
                    report["operations"] = [op.render() for op in operations]
                except ApplyError as error:
                    report.update(operations=[], error=str(error))
            self.say(report)


def broken_batch(spec: RulesetSpec) -> str | None:
    """An element of the wrong family makes libnftables refuse the whole batch."""
    broken = replace(spec, members_v4=(ipaddress.ip_network("2001:db8::/64"),))
    try:
        Nft().run(broken.batch())
    except ApplyError as error:
        return str(error)
    return None


def main() -> int:
    helper = Helper()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = helper.handle(request)
        except ApplyError as error:
            answer = {"failed": str(error)}
        helper.say({"id": request["id"], **answer})
    if helper.watcher is not None:
        helper.watcher.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
