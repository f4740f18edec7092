"""Inputs of the reconcile loop: those that end a run, and kernel changes (the discovery
services' inputs are in session.py)."""

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


@dataclass(frozen=True)
class KernelChanged:
    """Something of ours in the kernel (or a local address) changed: reconcile now."""

    reason: str


Terminal = Stop | ConfigChanged
