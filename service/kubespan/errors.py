"""The exception tree of kubespan, in one place.

KubespanError                 base of every error we raise on purpose
├── ConfigError               the machine config is unreadable or invalid (carries every problem)
├── SourceUnavailable         a config source that should have a config could not deliver it
├── StateFileError            a file under the state directory is unreadable or corrupt
├── DiscoveryError            the discovery service could not be reached or refused a request
│   └── DiscoveryRejected     the service answered with a 4xx error body
├── CryptoError               a sealed blob failed to authenticate or decode
└── ApplyError                the kernel refused a change (carries which object failed)

A user error (ConfigError, StateFileError) ends in one clear message and a non-zero exit,
never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class KubespanError(Exception):
    """Base class of every error kubespan raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One problem in a file: where it is and what is wrong."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        field = f" {self.path}:" if self.path else ""
        return f"{where}:{field} {self.message}"


class ConfigError(KubespanError):
    """The machine config is invalid; `problems` lists every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class SourceUnavailable(KubespanError):
    """A machine config source that should have a config could not deliver it: a URL or a
    metadata service that stayed down, a drive that would not mount, user data that is not a
    machine config at all. The message says what went wrong, not which source (the caller
    names it)."""


class StateFileError(KubespanError):
    """A state file is unreadable or corrupt; the message names the file."""


class DiscoveryError(KubespanError):
    """The discovery service could not be reached or did not answer as expected."""


class DiscoveryRejected(DiscoveryError):
    """The discovery service refused a request with a 4xx error."""

    def __init__(self, status: int, field: str | None, message: str) -> None:
        self.status = status
        self.field = field
        self.message = message
        self.retry_after = 0.0
        where = f" ({field})" if field else ""
        super().__init__(f"discovery service refused the request: HTTP {status}{where}: {message}")


class CryptoError(KubespanError):
    """A sealed blob failed to authenticate or decode."""


class ApplyError(KubespanError):
    """The kernel refused a change."""
