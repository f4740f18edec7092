"""Every kernel object kubespan creates, by name: all recognisably ours, and nothing else is
touched. Teardown removes exactly these."""

from __future__ import annotations

LINK_NAME = "kubespan"
NFT_FAMILY = "inet"
NFT_TABLE = "kubespan"
ROUTE_TABLE = 180
RULE_PRIORITY = 32500
# Firewall mark bits, only these two under the mask: 0x20 on WireGuard's own encrypted
# packets (the device's fwmark), 0x40 to force a packet into the tunnel.
MARK_WIREGUARD = 0x20
MARK_TUNNEL = 0x40
MARK_MASK = 0x60
