"""One finding of `kubespan check`: what was found, why it matters for kubespan, what to do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning", "info"]
SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    what: str  # naming the rule, priority, table, device or value found
    why: str
    todo: str
