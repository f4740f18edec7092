"""The relay's forwarding applied: the nftables table of relay.forward, replaced whole in
one transaction (a batch that fails leaves the previous table as it was). The rules are
stateless, so there are no conntrack flows to clean up when a pair changes or goes."""

from __future__ import annotations

from pathlib import Path

from kubespan.apply.libnft import Nft
from kubespan.relay.forward import RelaySpec, teardown_batch


class RelayForwarder:
    """Owns table inet kubespan_relay in this network namespace."""

    def __init__(self, nft: Nft | None = None) -> None:
        self._nft = nft or Nft()
        self._applied: str | None = None  # the fingerprint in the kernel; None: not known

    def close(self) -> None:
        self._nft.close()

    def apply(self, spec: RelaySpec) -> bool:
        """Forward exactly `spec`'s pairs; whether the kernel's table had to change."""
        if spec.fingerprint == self._applied:
            return False
        self._applied = None  # unknown until the transaction has gone through
        self._nft.run(spec.batch())
        self._applied = spec.fingerprint
        return True

    def teardown(self) -> None:
        """Remove the table, if there is one."""
        self._applied = None
        self._nft.run(teardown_batch())


IPV4_FORWARDING = Path("/proc/sys/net/ipv4/ip_forward")


def enable_ipv4_forwarding(path: Path = IPV4_FORWARDING) -> bool:
    """Let the kernel forward IPv4 (a relay forwards between its pairs' sides; a Kubernetes
    node forwards for its pods anyway); whether it was off before."""
    if path.read_text().strip() == "1":
        return False
    path.write_text("1\n")
    return True
