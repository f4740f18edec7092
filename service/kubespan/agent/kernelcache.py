"""The kernel's slow-changing state, read once and kept until it may have changed.

An idle pass needs WireGuard's peers (their counters and handshakes change by the second),
but the local addresses, our link's addresses and MTU, our nftables table, rules and routes
change only when someone changes them, and the kernel watcher (apply/watch.py) reports every
such change (another link going up, down or renamed included). Reading them all at every pass
was most of an idle node's cost. So they are kept until the watcher reports a change, until we
apply one ourselves, and in any case no longer than RESYNC_SECONDS: netlink loses nothing
unless its buffer overflows, which the watcher reports as a change, so the resync is a safety
net for what nobody foresaw, not the way changes are found.

Invalidation may come from the watcher's thread while a pass reads: each kept value carries
the generation it was read in, and a value read across an invalidation is never kept as
fresh.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from kubespan.identity import LinkHardware
from kubespan.model import LocalAddress, ObservedLink
from kubespan.plan.dataplane import ObservedRouting
from kubespan.plan.diff import Operation

RESYNC_SECONDS = 60.0
# While the watcher is not subscribed (subscribing failed and is retried), nothing reports
# a change: kept values are read again this often instead.
UNWATCHED_RESYNC_SECONDS = 10.0

T = TypeVar("T")


class KernelShell(Protocol):
    """What the loop and the cache need from the kernel, the link aside."""

    def observe_routing(self, link: str) -> ObservedRouting: ...
    def local_addresses(self) -> tuple[LocalAddress, ...]: ...
    def link_hardware(self) -> tuple[LinkHardware, ...]: ...
    def apply(self, operations: list[Operation]) -> None: ...
    def probe(self, targets: Sequence[ipaddress.IPv6Address]) -> int: ...
    def teardown(self) -> list[str]: ...


class SplitKernel(KernelShell, Protocol):
    """apply.kernel.Kernel: the link read in two parts, so the rtnetlink part can be kept."""

    def observe_link_base(self, name: str) -> ObservedLink | None: ...
    def observe_device(self, name: str, base: ObservedLink) -> ObservedLink: ...


@dataclass(frozen=True)
class _Kept(Generic[T]):
    value: T
    generation: int
    read_at: float


class CachedKernel:
    """A KernelPort (agent/loop.py) that reads the slow-changing state only when needed."""

    def __init__(
        self,
        kernel: SplitKernel,
        monotonic: Callable[[], float],
        resync: float = RESYNC_SECONDS,
    ) -> None:
        self._kernel = kernel
        self._monotonic = monotonic
        self._resync = resync
        self._lock = threading.Lock()
        self._generation = 0
        self._kept: dict[tuple[str, str], _Kept[object]] = {}
        self._watched: Callable[[], bool] = lambda: False

    def watched_by(self, subscribed: Callable[[], bool]) -> None:
        """Kept values last RESYNC_SECONDS while `subscribed()` (the kernel watcher hears
        changes), UNWATCHED_RESYNC_SECONDS otherwise (before this is called too)."""
        self._watched = subscribed

    def invalidate(self) -> None:
        """Something may have changed: read everything anew at the next use. Thread-safe."""
        with self._lock:
            self._generation += 1

    def _read(self, what: tuple[str, str], read: Callable[[], T]) -> T:
        now = self._monotonic()
        with self._lock:
            generation = self._generation
            kept = self._kept.get(what)
        resync = self._resync if self._watched() else min(self._resync, UNWATCHED_RESYNC_SECONDS)
        if kept is not None and kept.generation == generation and now - kept.read_at < resync:
            return kept.value  # type: ignore[return-value]
        value = read()
        self._kept[what] = _Kept(value, generation, now)
        return value

    def observe_link(self, name: str) -> ObservedLink | None:
        base = self._read(("link", name), lambda: self._kernel.observe_link_base(name))
        if base is None:
            return None
        try:
            return self._kernel.observe_device(name, base)
        except (OSError, ValueError):
            # Kept as existing, gone from the kernel (or replaced): read it all again now.
            self.invalidate()
            fresh = self._kernel.observe_link_base(name)
            return None if fresh is None else self._kernel.observe_device(name, fresh)

    def observe_routing(self, link: str) -> ObservedRouting:
        return self._read(("routing", link), lambda: self._kernel.observe_routing(link))

    def local_addresses(self) -> tuple[LocalAddress, ...]:
        return self._read(("addresses", ""), self._kernel.local_addresses)

    def link_hardware(self) -> tuple[LinkHardware, ...]:
        return self._kernel.link_hardware()

    def apply(self, operations: list[Operation]) -> None:
        try:
            self._kernel.apply(operations)
        finally:
            self.invalidate()  # ours now, or half applied: either way read it again

    def probe(self, targets: Sequence[ipaddress.IPv6Address]) -> int:
        return self._kernel.probe(targets)

    def teardown(self) -> list[str]:
        try:
            return self._kernel.teardown()
        finally:
            self.invalidate()
