"""Read and change kernel network state through netlink: links and addresses over
rtnetlink (apply/links.py), WireGuard over generic netlink (apply/wireguard.py), rules,
routes and nftables through apply/dataplane.py."""

from __future__ import annotations

import errno
import ipaddress
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from kubespan.apply import links
from kubespan.apply.dataplane import Dataplane
from kubespan.apply.netlink import (
    NETLINK_ROUTE,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    Message,
    NetlinkFormatError,
)
from kubespan.apply.nlsocket import NetlinkSocket
from kubespan.apply.probe import TunnelProber
from kubespan.apply.wireguard import (
    WireGuardNetlink,
    set_device_request,
    set_peer_request,
    set_peer_requests,
)
from kubespan.errors import ApplyError
from kubespan.identity import LinkHardware
from kubespan.model import LocalAddress, ObservedLink
from kubespan.names import LINK_NAME
from kubespan.plan.dataplane import DataplaneOperation, ObservedRouting
from kubespan.plan.diff import (
    AddAddress,
    ConfigureDevice,
    CreateLink,
    LinkOperation,
    NudgePeer,
    Operation,
    RemoveAddress,
    RemovePeer,
    SetLinkMtu,
    SetLinkUp,
    SetPeer,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

IFF_UP = 0x1


def _each(parse: Callable[[Message], T], messages: Iterable[Message]) -> list[T]:
    """Each message parsed; one the codec cannot read is left out with a warning, so one
    strange link or address (another program's) harms nothing else."""
    out = []
    for message in messages:
        try:
            out.append(parse(message))
        except NetlinkFormatError as error:
            log.warning("kernel answer left out: %s", error)
    return out


class Kernel:
    """Netlink sessions; close them when done (or use as a context manager)."""

    def __init__(self) -> None:
        self._rtnl = NetlinkSocket(NETLINK_ROUTE)
        self._wg: WireGuardNetlink | None = None
        self._dataplane: Dataplane | None = None
        self._prober = TunnelProber()

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def probe(self, targets: Sequence[ipaddress.IPv6Address]) -> int:
        """Liveness probes through the tunnel (apply/probe.py); how many went out. Never
        raises."""
        return self._prober.send(targets)

    def close(self) -> None:
        self._prober.close()
        if self._dataplane is not None:
            self._dataplane.close()
        self._rtnl.close()
        if self._wg is not None:
            self._wg.close()

    @property
    def dataplane(self) -> Dataplane:
        if self._dataplane is None:
            self._dataplane = Dataplane()
        return self._dataplane

    def observe_routing(self, link: str) -> ObservedRouting:
        return self.dataplane.observe(link)

    @property
    def wireguard(self) -> WireGuardNetlink:
        if self._wg is None:
            self._wg = WireGuardNetlink()
        return self._wg

    def _links(self) -> list[links.Link]:
        answer = self._rtnl.request(links.RTM_GETLINK, NLM_F_DUMP, links.every_link())
        return _each(links.parse_link, (m for m in answer if m.type == links.RTM_NEWLINK))

    def _addresses(self) -> list[links.Address]:
        answer = self._rtnl.request(links.RTM_GETADDR, NLM_F_DUMP, links.every_address())
        found = _each(links.parse_address, (m for m in answer if m.type == links.RTM_NEWADDR))
        return [a for a in found if a is not None]

    def _link(self, name: str) -> links.Link | None:
        try:
            answer = self._rtnl.request(links.RTM_GETLINK, NLM_F_ACK, links.link_by_name(name))
        except OSError as error:
            if error.errno == errno.ENODEV:
                return None
            raise
        found = [links.parse_link(m) for m in answer if m.type == links.RTM_NEWLINK]
        return found[0] if found else None

    def link_index(self, name: str) -> int | None:
        link = self._link(name)
        return None if link is None else link.index

    def observe_link(self, name: str) -> ObservedLink | None:
        base = self.observe_link_base(name)
        return None if base is None else self.observe_device(name, base)

    def observe_link_base(self, name: str) -> ObservedLink | None:
        """The link as rtnetlink has it (kind, MTU, state, addresses), without WireGuard's
        device: what changes only with a link or address event."""
        link = self._link(name)
        if link is None:
            return None
        return ObservedLink(
            mtu=link.mtu,
            up=link.up,
            addresses=tuple(a.interface for a in self._addresses() if a.index == link.index),
            private_key=None,
            listen_port=0,
            fwmark=0,
            peers=(),
            kind=link.kind,
        )

    def observe_device(self, name: str, base: ObservedLink) -> ObservedLink:
        """`base` with WireGuard's device read now (its peers' counters change by the
        second); another program's link under our name is reported, never configured."""
        if base.foreign:
            return base
        device = self.wireguard.device(name)
        return replace(
            base,
            private_key=device.private_key,
            listen_port=device.listen_port,
            fwmark=device.fwmark,
            peers=tuple(map(device.peers.__getitem__, sorted(device.peers))),
        )

    def local_addresses(self) -> tuple[LocalAddress, ...]:
        by_index = {link.index: link for link in self._links()}
        out = []
        for address in self._addresses():
            link = by_index.get(address.index)
            if link is None:
                continue
            out.append(
                LocalAddress(
                    interface=link.name,
                    address=address.interface,
                    scope=address.scope,
                    link_up=link.up,
                    link_kind=link.kind,
                )
            )
        return tuple(out)

    def link_hardware(self) -> tuple[LinkHardware, ...]:
        return tuple(
            LinkHardware(
                name=link.name,
                mac=link.mac,
                physical=Path(f"/sys/class/net/{link.name}/device").exists(),
            )
            for link in self._links()
        )

    def apply(self, operations: Sequence[Operation]) -> None:
        """Apply in order; the first refusal raises ApplyError naming the operation."""
        for operation in operations:
            if isinstance(operation, DataplaneOperation):
                self.dataplane.apply([operation])
                continue
            try:
                self._apply_one(operation)
            except (OSError, ValueError) as error:
                raise ApplyError(f"{operation.render()}: {error}") from error

    def teardown(self) -> list[str]:
        """Remove everything kubespan created in the kernel, and only that; what was removed."""
        removed = self.dataplane.teardown()
        link = self._link(LINK_NAME)
        if link is None:
            return removed
        if link.kind != "wireguard":
            log.warning(
                "link %s is a %s link, not ours (ours is WireGuard): left alone",
                LINK_NAME,
                link.kind or "kindless",
            )
            return removed
        self._rtnl.request(links.RTM_DELLINK, NLM_F_ACK, links.link_by_index(link.index))
        removed.append(f"link {LINK_NAME}")
        return removed

    def _index(self, name: str) -> int:
        index = self.link_index(name)
        if index is None:
            raise ApplyError(f"link {name} does not exist")
        return index

    def _link_request(self, kind: int, payload: bytes, flags: int = 0) -> None:
        self._rtnl.request(kind, NLM_F_ACK | flags, payload)

    def _apply_one(self, op: LinkOperation) -> None:
        match op:
            case CreateLink(name=name):
                self._link_request(
                    links.RTM_NEWLINK, links.create_wireguard(name), NLM_F_CREATE | NLM_F_EXCL
                )
            case SetLinkMtu(name=name, mtu=mtu):
                self._link_request(links.RTM_NEWLINK, links.set_mtu(self._index(name), mtu))
            case SetLinkUp(name=name):
                self._link_request(links.RTM_NEWLINK, links.set_up(self._index(name)))
            case AddAddress(name=name, address=address):
                change = links.address_change(self._index(name), address)
                self._link_request(links.RTM_NEWADDR, change, NLM_F_CREATE | NLM_F_EXCL)
            case RemoveAddress(name=name, address=address):
                change = links.address_change(self._index(name), address)
                self._link_request(links.RTM_DELADDR, change)
            case ConfigureDevice(name=name):
                self.wireguard.set(
                    set_device_request(name, op.private_key, op.listen_port, op.fwmark)
                )
            case SetPeer():
                for request in set_peer_requests(
                    op.name,
                    op.public_key,
                    preshared_key=op.preshared_key,
                    endpoint=op.endpoint,
                    keepalive=op.keepalive,
                    allowed_ips=op.allowed_ips,
                ):
                    self.wireguard.set(request)
            case RemovePeer(name=name, public_key=key):
                self.wireguard.set(set_peer_request(name, key, remove=True))
            case NudgePeer(name=name, public_key=key, keepalive=keepalive):
                for interval in (0, keepalive):
                    self.wireguard.set(
                        set_peer_request(name, key, keepalive=interval, update_only=True)
                    )
