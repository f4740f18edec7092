"""The kernel cache: slow-changing state read once, read again after a change, an apply of
ours, or RESYNC_SECONDS; WireGuard's device read at every pass."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import replace

import pytest

from kubespan.agent.kernelcache import RESYNC_SECONDS, UNWATCHED_RESYNC_SECONDS, CachedKernel
from kubespan.identity import LinkHardware
from kubespan.model import LocalAddress, ObservedLink
from kubespan.plan.dataplane import ObservedRouting
from kubespan.plan.diff import Operation, SetLinkUp

BASE = ObservedLink(
    mtu=1420,
    up=True,
    addresses=(),
    private_key=None,
    listen_port=0,
    fwmark=0,
    peers=(),
)


class CountingKernel:
    def __init__(self) -> None:
        self.reads: dict[str, int] = {}
        self.base: ObservedLink | None = BASE
        self.mtu = 1420
        self.device_fails = 0
        self.during_read: Callable[[], None] = lambda: None
        self.apply_fails = False

    def _count(self, what: str) -> int:
        self.reads[what] = self.reads.get(what, 0) + 1
        return self.reads[what]

    def observe_link_base(self, name: str) -> ObservedLink | None:
        self._count("base")
        return None if self.base is None else replace(self.base, mtu=self.mtu)

    def observe_device(self, name: str, base: ObservedLink) -> ObservedLink:
        self._count("device")
        if self.device_fails:
            self.device_fails -= 1
            raise OSError("No such device")
        return replace(base, listen_port=51820)

    def observe_routing(self, link: str) -> ObservedRouting:
        self._count("routing")
        return ObservedRouting(None, (), (), None)

    def local_addresses(self) -> tuple[LocalAddress, ...]:
        count = self._count("addresses")
        self.during_read()
        address = ipaddress.ip_interface(f"192.0.2.{count}/24")
        return (LocalAddress("eth0", address, 0, True, "veth"),)

    def link_hardware(self) -> tuple[LinkHardware, ...]:
        return ()

    def apply(self, operations: list[Operation]) -> None:
        self._count("apply")
        if self.apply_fails:
            raise OSError("refused")

    def probe(self, targets: Sequence[ipaddress.IPv6Address]) -> int:
        return len(targets)

    def teardown(self) -> list[str]:
        return []


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def cached() -> tuple[CachedKernel, CountingKernel, Clock]:
    kernel, clock = CountingKernel(), Clock()
    return CachedKernel(kernel, clock, resync=10.0), kernel, clock


def test_slow_state_is_read_once_until_something_changes() -> None:
    cache, kernel, _ = cached()
    first = cache.local_addresses()
    assert cache.local_addresses() == first
    cache.observe_routing("kubespan")
    cache.observe_routing("kubespan")
    assert kernel.reads == {"addresses": 1, "routing": 1}


def test_kept_for_a_minute_while_the_watcher_hears_changes_else_for_ten_seconds() -> None:
    kernel, clock = CountingKernel(), Clock()
    cache = CachedKernel(kernel, clock)
    subscribed = [True]
    cache.watched_by(lambda: subscribed[0])
    cache.local_addresses()
    clock.now += UNWATCHED_RESYNC_SECONDS + 1
    cache.local_addresses()
    assert kernel.reads == {"addresses": 1}
    subscribed[0] = False  # the watcher lost its sockets: nothing reports a change
    cache.local_addresses()
    assert kernel.reads == {"addresses": 2}
    subscribed[0] = True
    clock.now += RESYNC_SECONDS - 1
    cache.local_addresses()
    assert kernel.reads == {"addresses": 2}
    clock.now += 2
    cache.local_addresses()
    assert kernel.reads == {"addresses": 3}


def test_a_reported_change_makes_the_next_pass_read_again() -> None:
    cache, kernel, _ = cached()
    first = cache.local_addresses()
    cache.observe_routing("kubespan")
    cache.invalidate()
    assert cache.local_addresses() != first
    cache.observe_routing("kubespan")
    assert kernel.reads == {"addresses": 2, "routing": 2}


def test_nothing_is_kept_longer_than_the_resync() -> None:
    cache, kernel, clock = cached()
    cache.local_addresses()
    clock.now += 9.9
    cache.local_addresses()
    assert kernel.reads["addresses"] == 1
    clock.now += 0.1
    cache.local_addresses()
    assert kernel.reads["addresses"] == 2


def test_a_value_read_across_a_change_is_not_kept_as_fresh() -> None:
    cache, kernel, _ = cached()
    kernel.during_read = cache.invalidate  # the watcher reports a change mid-read
    cache.local_addresses()
    kernel.during_read = lambda: None
    cache.local_addresses()
    cache.local_addresses()
    assert kernel.reads["addresses"] == 2


@pytest.mark.parametrize("fails", [False, True])
def test_our_own_apply_makes_the_next_pass_read_again(fails: bool) -> None:
    cache, kernel, _ = cached()
    cache.observe_routing("kubespan")
    kernel.apply_fails = fails
    try:
        cache.apply([SetLinkUp("kubespan")])
    except OSError:
        assert fails
    cache.observe_routing("kubespan")
    assert kernel.reads["routing"] == 2


def test_the_wireguard_device_is_read_at_every_pass_the_link_once() -> None:
    cache, kernel, _ = cached()
    for _ in range(3):
        link = cache.observe_link("kubespan")
        assert link is not None and link.listen_port == 51820
    assert kernel.reads == {"base": 1, "device": 3}
    kernel.mtu = 1380
    cache.invalidate()
    link = cache.observe_link("kubespan")
    assert link is not None and link.mtu == 1380


def test_a_link_gone_under_the_cache_is_read_again_at_once() -> None:
    cache, kernel, _ = cached()
    cache.observe_link("kubespan")
    kernel.base = None
    kernel.device_fails = 1  # the kept link no longer exists
    assert cache.observe_link("kubespan") is None
    assert cache.observe_link("kubespan") is None
    assert kernel.reads == {"base": 3, "device": 2}


def test_no_link_is_kept_as_no_link_until_a_change() -> None:
    cache, kernel, _ = cached()
    kernel.base = None
    assert cache.observe_link("kubespan") is None
    kernel.base = BASE
    assert cache.observe_link("kubespan") is None  # not reported yet: read at the resync
    cache.invalidate()
    assert cache.observe_link("kubespan") is not None
