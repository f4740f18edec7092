"""A client's copy of one cluster's listing, kept current from reset and delta listings."""

from __future__ import annotations

from kubespan.discovery.protocol import Listing, WireAffiliate


class ClusterView:
    def __init__(self) -> None:
        self.revision: int | None = None
        self.affiliates: dict[str, WireAffiliate] = {}

    def apply(self, listing: Listing) -> bool:
        """Take in a listing; whether anything is different afterwards."""
        before = dict(self.affiliates)
        if listing.reset:
            self.affiliates = {a.id: a for a in listing.affiliates}
        else:
            for affiliate_id in listing.removed:
                self.affiliates.pop(affiliate_id, None)
            for affiliate in listing.affiliates:
                self.affiliates[affiliate.id] = affiliate
        changed = self.revision != listing.revision or _content(before) != _content(self.affiliates)
        self.revision = listing.revision
        return changed

    def listing(self) -> Listing:
        """The whole cluster as this client knows it."""
        affiliates = tuple(self.affiliates[k] for k in sorted(self.affiliates))
        return Listing(self.revision or 0, affiliates, (), reset=True)


def _content(affiliates: dict[str, WireAffiliate]) -> dict[str, tuple[bytes, tuple[bytes, ...]]]:
    return {k: (a.data, a.endpoints) for k, a in affiliates.items()}
