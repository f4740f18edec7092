"""Read and change kernel network state through netlink (pyroute2)."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, WireGuard
from pyroute2.netlink.exceptions import NetlinkError

from kubespan.apply.dataplane import Dataplane
from kubespan.apply.probe import TunnelProber
from kubespan.apply.wgdump import WireGuardReader
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

IFF_UP = 0x1


class Kernel:
    """One netlink session; close it when done (or use as a context manager)."""

    def __init__(self) -> None:
        self._ipr = IPRoute()
        self._wg: WireGuard | None = None
        self._wg_reader: WireGuardReader | None = None
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
        self._ipr.close()
        if self._wg is not None:
            self._wg.close()
        if self._wg_reader is not None:
            self._wg_reader.close()

    @property
    def dataplane(self) -> Dataplane:
        if self._dataplane is None:
            self._dataplane = Dataplane(self._ipr)
        return self._dataplane

    def observe_routing(self, link: str) -> ObservedRouting:
        return self.dataplane.observe(link)

    @property
    def wireguard(self) -> WireGuard:
        # Created on first use: the generic-netlink family exists only once the module loaded.
        if self._wg is None:
            self._wg = WireGuard()
        return self._wg

    def link_index(self, name: str) -> int | None:
        found = self._ipr.link_lookup(ifname=name)
        return int(found[0]) if found else None

    def observe_link(self, name: str) -> ObservedLink | None:
        base = self.observe_link_base(name)
        return None if base is None else self.observe_device(name, base)

    def observe_link_base(self, name: str) -> ObservedLink | None:
        """The link as rtnetlink has it (kind, MTU, state, addresses), without WireGuard's
        device: what changes only with a link or address event."""
        index = self.link_index(name)
        if index is None:
            return None
        (link,) = self._ipr.get_links(index)
        addresses = tuple(
            ipaddress.ip_interface(f"{a.get('address')}/{a['prefixlen']}")
            for a in self._ipr.get_addr(index=index)
        )
        return ObservedLink(
            mtu=int(link.get("mtu") or 0),
            up=bool(link["flags"] & IFF_UP),
            addresses=addresses,
            private_key=None,
            listen_port=0,
            fwmark=0,
            peers=(),
            kind=str(link.get(("linkinfo", "kind")) or ""),
        )

    def observe_device(self, name: str, base: ObservedLink) -> ObservedLink:
        """`base` with WireGuard's device read now (its peers' counters change by the
        second); another program's link under our name is reported, never configured."""
        if base.foreign:
            return base
        if self._wg_reader is None:
            self._wg_reader = WireGuardReader()
        device = self._wg_reader.device(name)
        return replace(
            base,
            private_key=device.private_key,
            listen_port=device.listen_port,
            fwmark=device.fwmark,
            peers=tuple(device.peers[k] for k in sorted(device.peers)),
        )

    def local_addresses(self) -> tuple[LocalAddress, ...]:
        links: dict[int, Any] = {int(link["index"]): link for link in self._ipr.get_links()}
        out = []
        for entry in self._ipr.get_addr():
            link = links.get(int(entry["index"]))
            if link is None or entry.get("address") is None:
                continue
            out.append(
                LocalAddress(
                    interface=str(link.get("ifname")),
                    address=ipaddress.ip_interface(f"{entry.get('address')}/{entry['prefixlen']}"),
                    scope=int(entry["scope"]),
                    link_up=bool(link["flags"] & IFF_UP),
                    link_kind=str(link.get(("linkinfo", "kind")) or ""),
                )
            )
        return tuple(out)

    def link_hardware(self) -> tuple[LinkHardware, ...]:
        out = []
        for link in self._ipr.get_links():
            name = str(link.get("ifname"))
            out.append(
                LinkHardware(
                    name=name,
                    mac=str(link.get("address") or ""),
                    physical=Path(f"/sys/class/net/{name}/device").exists(),
                )
            )
        return tuple(out)

    def apply(self, operations: Sequence[Operation]) -> None:
        """Apply in order; the first refusal raises ApplyError naming the operation."""
        for operation in operations:
            if isinstance(operation, DataplaneOperation):
                self.dataplane.apply([operation])
                continue
            try:
                self._apply_one(operation)
            except (NetlinkError, OSError, ValueError) as error:
                raise ApplyError(f"{operation.render()}: {error}") from error

    def teardown(self) -> list[str]:
        """Remove everything kubespan created in the kernel, and only that; what was removed."""
        removed = self.dataplane.teardown()
        index = self.link_index(LINK_NAME)
        if index is None:
            return removed
        (link,) = self._ipr.get_links(index)
        kind = str(link.get(("linkinfo", "kind")) or "")
        if kind != "wireguard":
            log.warning(
                "link %s is a %s link, not ours (ours is WireGuard): left alone",
                LINK_NAME,
                kind or "kindless",
            )
            return removed
        self._ipr.link("del", index=index)
        removed.append(f"link {LINK_NAME}")
        return removed

    def _index(self, name: str) -> int:
        index = self.link_index(name)
        if index is None:
            raise ApplyError(f"link {name} does not exist")
        return index

    def _apply_one(self, op: LinkOperation) -> None:
        match op:
            case CreateLink(name=name):
                self._ipr.link("add", ifname=name, kind="wireguard")
            case SetLinkMtu(name=name, mtu=mtu):
                self._ipr.link("set", index=self._index(name), mtu=mtu)
            case SetLinkUp(name=name):
                self._ipr.link("set", index=self._index(name), state="up")
            case AddAddress(name=name, address=address) | RemoveAddress(name=name, address=address):
                self._ipr.addr(
                    "add" if isinstance(op, AddAddress) else "del",
                    index=self._index(name),
                    address=str(address.ip),
                    prefixlen=address.network.prefixlen,
                )
            case ConfigureDevice(name=name):
                self.wireguard.set(
                    name,
                    private_key=op.private_key,
                    listen_port=op.listen_port,
                    fwmark=op.fwmark,
                )
            case SetPeer():
                self.wireguard.set(op.name, peer=_peer_request(op))
            case RemovePeer(name=name, public_key=key):
                self.wireguard.set(name, peer={"public_key": key, "remove": True})
            case NudgePeer(name=name, public_key=key, keepalive=keepalive):
                for interval in (0, keepalive):
                    self.wireguard.set(
                        name,
                        peer={
                            "public_key": key,
                            "persistent_keepalive": interval,
                            "update_only": True,
                        },
                    )


def _peer_request(op: SetPeer) -> dict[str, Any]:
    peer: dict[str, Any] = {"public_key": op.public_key}
    if op.preshared_key is not None:
        peer["preshared_key"] = op.preshared_key
    if op.endpoint is not None:
        peer["endpoint_addr"] = str(op.endpoint.address)
        peer["endpoint_port"] = op.endpoint.port
    if op.keepalive is not None:
        peer["persistent_keepalive"] = op.keepalive
    if op.allowed_ips is not None:
        peer["allowed_ips"] = [str(n) for n in op.allowed_ips]
        peer["replace_allowed_ips"] = True
    return peer
