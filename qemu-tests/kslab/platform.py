"""What the platform hands a VM: machine config, networkd files, hostname (QEMU fw_cfg
entries under opt/org.kubespan/, read by the image's kubespan-platform.service)."""

import base64
import ipaddress
import secrets
from collections.abc import Sequence

FW_CFG_PREFIX = "opt/org.kubespan/"

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def static_network(
    mac: str,
    addresses: Sequence[Interface],
    gateways: Sequence[Address] = (),
    dns: Sequence[Address] = (),
) -> str:
    """A systemd-networkd .network file giving the NIC with `mac` static addresses only
    (no DHCP, no router advertisements)."""
    lines = ["[Match]", f"MACAddress={mac}", "", "[Network]", "DHCP=no", "IPv6AcceptRA=no"]
    lines += [f"Address={a.with_prefixlen}" for a in addresses]
    lines += [f"Gateway={g}" for g in gateways]
    lines += [f"DNS={d}" for d in dns]
    return "\n".join(lines) + "\n"


def cluster_identity() -> tuple[str, str]:
    """A fresh (cluster.id, cluster.secret): 32 random bytes each, standard base64."""
    return (
        base64.b64encode(secrets.token_bytes(32)).decode(),
        base64.b64encode(secrets.token_bytes(32)).decode(),
    )
