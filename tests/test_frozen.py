"""evolve: what dataclasses.replace makes, for the records it may copy; the rest refused."""

from __future__ import annotations

import dataclasses
import functools
import ipaddress

import pytest

from kubespan.frozen import evolve
from kubespan.model import PeerState
from kubespan.netaddr import Endpoint
from kubespan.plan.peerstate import EndpointDecision, Tracking

ENDPOINT = Endpoint(ipaddress.ip_address("192.0.2.1"), 51820)


def test_every_field_changed_as_replace_changes_it() -> None:
    tracking = Tracking(ENDPOINT, 1.0)
    changes = {
        "endpoint": Endpoint(ipaddress.ip_address("2001:db8::1"), 1),
        "since": 2.0,
        "handshake": 3.0,
        "rx_bytes": 4,
        "heard": 5.0,
        "observed_at": 6.0,
        "tried": (ENDPOINT,),
        "cycles": 7,
        "seen_candidates": frozenset({ENDPOINT}),
        "trials": 8,
        "known_since": 9.0,
        "probe_since": 10.0,
        "probed_at": 11.0,
        "checked_at": 12.0,
        "failed": (ENDPOINT,),
        "why": "because",
        "direct_checked_at": 13.0,
    }
    assert set(changes) == {f.name for f in dataclasses.fields(Tracking)}
    for name, value in changes.items():
        evolved = evolve(tracking, **{name: value})
        assert evolved == dataclasses.replace(tracking, **{name: value})  # type: ignore[arg-type]
        assert getattr(evolved, name) == value
        assert hash(evolved) == hash(dataclasses.replace(tracking, **{name: value}))  # type: ignore[arg-type]
    assert evolve(tracking) == tracking and evolve(tracking) is not tracking
    assert tracking == Tracking(ENDPOINT, 1.0)  # the original is untouched


def test_the_copy_stays_frozen() -> None:
    decision = evolve(EndpointDecision(Tracking(None, 0.0), PeerState.UP, None), probe=True)
    assert decision.probe
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.probe = False  # type: ignore[misc]


def test_a_name_that_is_no_field_is_refused() -> None:
    with pytest.raises(TypeError, match="Tracking has no field sence"):
        evolve(Tracking(None, 0.0), sence=1.0)


@dataclasses.dataclass(frozen=True)
class Checked:
    value: int

    def __post_init__(self) -> None:
        if self.value < 0:
            raise ValueError("negative")


@dataclasses.dataclass(frozen=True)
class Cached:
    value: int

    @functools.cached_property
    def double(self) -> int:
        return self.value * 2


@dataclasses.dataclass
class Mutable:
    value: int


@dataclasses.dataclass(frozen=True)
class Derived:
    value: int
    total: int = dataclasses.field(init=False, default=0)


class Plain:
    value = 1


@pytest.mark.parametrize("record", [Checked(1), Cached(1), Mutable(1), Derived(1), Plain()])
def test_records_it_could_copy_wrongly_are_refused(record: object) -> None:
    """A __post_init__ would not check the copy; a cached value would be stale."""
    with pytest.raises(TypeError, match=r"use replace|not a dataclass"):
        evolve(record, value=2)


def test_an_endpoints_fields_are_its_address_and_port_only() -> None:
    """Its hash is kept when it is made, outside the fields: asdict and astuple make it
    again, and replace hashes the new one anew."""
    assert [f.name for f in dataclasses.fields(Endpoint)] == ["address", "port"]
    assert Endpoint(**dataclasses.asdict(ENDPOINT)) == ENDPOINT
    assert Endpoint(*dataclasses.astuple(ENDPOINT)) == ENDPOINT
    moved = dataclasses.replace(ENDPOINT, port=1)
    assert hash(moved) == hash(Endpoint(ENDPOINT.address, 1)) != hash(ENDPOINT)
    assert {ENDPOINT, Endpoint(ipaddress.ip_address("192.0.2.1"), 51820)} == {ENDPOINT}
