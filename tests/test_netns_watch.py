"""Drift repaired by an event, not a tick: a small reconciler in the node namespace (observe,
diff, apply on each KernelWatcher callback, nothing else) against each drift, on the real
kernel. Also: our own repair does not wake us into more changes, and other programs'
changes do not wake us at all."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dataplanelab import DRIFTS, SPEC, drift_command, snapshot, wired
from netlink_capture import replay

from netlab import REPO, DataplaneHelper, Netns, namespaces, run, wait_until

pytestmark = pytest.mark.netns

REPAIR_BUDGET = 1.0  # seconds from the drift to the repaired state
PATIENCE = 10.0  # how long to wait for what must happen before declaring it missing


@pytest.fixture
def watched() -> Iterator[tuple[Netns, DataplaneHelper]]:
    with wired() as (node, _tunnel, _pod):
        helper = node.helper
        helper.call("watch", SPEC)
        first = helper.wait_for_pass(lambda p: p["pass"] == 1, 0, PATIENCE)
        assert first["operations"], "the first pass sets everything up"
        yield node, helper


class Barrier:
    """A harmless change the watcher reports (an address on lo), and the pass it causes:
    every notification made before it has been handled when that pass is reported."""

    def __init__(self, node: Netns, helper: DataplaneHelper) -> None:
        self.node = node
        self.helper = helper
        self.count = 0

    def cross(self) -> int:
        """The number of passes up to and including the barrier's."""
        self.count += 1
        address = f"192.0.2.{200 + self.count}/32"
        seen = len(self.helper.passes)
        self.node.ip("address", "add", address, "dev", "lo")
        crossing = self.helper.wait_for_pass(lambda p: "address" in p["reason"], seen, PATIENCE)
        return self.helper.passes.index(crossing) + 1


def changing(passes: list[dict[str, object]]) -> list[dict[str, object]]:
    return [p for p in passes if p["operations"] or p["error"]]


def test_the_steady_state_makes_no_changes(watched: tuple[Netns, DataplaneHelper]) -> None:
    node, helper = watched
    crossed = Barrier(node, helper).cross()
    # The first pass changed everything; the notifications of its own changes woke the
    # reconciler again, and those passes changed nothing: no storm.
    assert crossed >= 2
    assert changing(helper.passes[:crossed]) == helper.passes[:1]


def test_other_programs_changes_do_not_wake_us(watched: tuple[Netns, DataplaneHelper]) -> None:
    node, helper = watched
    barrier = Barrier(node, helper)
    before = barrier.cross()
    node.sh(
        "for i in 1 2 3 4 5; do nft 'add table ip kubeproxy'; nft 'add chain ip kubeproxy c';"
        " nft 'delete table ip kubeproxy'; done; ip route add 198.51.100.0/24 via 192.0.2.1"
    )
    after = barrier.cross()
    assert after == before + 1, helper.passes[before:after]  # only the barrier's own pass


@pytest.mark.parametrize("drift", sorted(DRIFTS))
def test_drift_is_repaired_by_an_event_within_a_second(
    watched: tuple[Netns, DataplaneHelper], drift: str
) -> None:
    node, helper = watched
    barrier = Barrier(node, helper)
    seen = barrier.cross()
    baseline = snapshot(node)
    command = drift_command(node, drift)

    started = time.monotonic()
    node.sh(command)
    wait_until(lambda: snapshot(node) == baseline, PATIENCE)
    elapsed = time.monotonic() - started
    print(f"{drift}: repaired {elapsed * 1000:.0f} ms after the drift command started")
    assert elapsed < REPAIR_BUDGET, f"{drift}: repaired after {elapsed:.3f} s"

    # Exactly one pass changed something, caused by the drift's notification; every pass
    # woken by our own repair changed nothing.
    done = barrier.cross()
    repairs = changing(helper.passes[seen:done])
    assert len(repairs) == 1, helper.passes[seen:done]
    assert repairs[0]["error"] is None
    assert snapshot(node) == baseline


def in_fresh_namespace(script: str, *args: str) -> Any:
    """Run tests/`script` in a namespace of its own; its JSON output."""
    with namespaces("probe") as ns:
        env = f"PYTHONPATH={REPO / 'tests'}"
        path = str(REPO / "tests" / script)
        argv = ["ip", "netns", "exec", ns["probe"].name, "env", env, sys.executable, path]
        return json.loads(run([*argv, *args]))


def test_live_notifications_are_classified() -> None:
    """The kernel's own notifications for each change (tests/netlink_capture.py), read as
    KernelWatcher reads them: ours wake the agent, others' do not."""
    for change, expected, given in replay(in_fresh_namespace("netlink_capture.py")):
        assert given == expected, change


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        ("callback-raises", {"again": True}),
        ("overflow", {"overflow": True, "link_after_overflow": True}),
        ("read-fails", {"resubscribed": True, "again": True}),
        ("subscribing-fails", {"resubscribed": True, "again": True}),
        ("blocked-callback", {"stop_returned": True, "ended": True}),
        ("idle", {}),
    ],
)
def test_the_watcher_survives(scenario: str, expected: dict[str, bool]) -> None:
    """A callback that raises, lost notifications (ENOBUFS), a failing read, a failing
    subscription: the thread lives on and reports changes; stop() is prompt, even while the
    callback is stuck (the thread then ends when the callback returns)."""
    result = in_fresh_namespace("netns_watch_probe.py", scenario)
    assert {key: result[key] for key in expected} == expected
    assert result.get("alive", True)
    assert result["stopped"]
    assert result["stop_seconds"] < 1.0
