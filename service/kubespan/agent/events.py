"""Inputs that end a run of the reconcile loop (the rest are in session.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kubespan.config import MachineConfig


class Stop:
    """Leave the loop: the service is stopping."""


@dataclass(frozen=True)
class ConfigChanged:
    """A new, valid machine config to run with."""

    config: MachineConfig
    raw: bytes = field(repr=False)
    origin: str


Terminal = Stop | ConfigChanged
