"""What the agent needs before it touches anything, checked first.

Each missing piece is one line that says what is missing and what to do, and the agent
stops with an exit status the unit does not restart on (retrying cannot grow a kernel
module or a capability). The decision is pure (`missing`, from `HostFacts`); `gather` reads
the facts from /proc, /sys, /lib/modules, libnftables and the state directory.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

# sysexits.h: the unit's RestartPreventExitStatus lists them with EX_CONFIG (78).
EXIT_UNAVAILABLE = 69  # a kernel or library piece is missing
EXIT_NOPERM = 77  # not enough privilege
EXIT_CANTCREAT = 73  # the state directory cannot be written

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13

LOADED, BUILTIN, MODULE, MISSING = "loaded", "built in", "module", "missing"


@dataclass(frozen=True)
class HostFacts:
    effective_caps: int | None  # None: unknown (no /proc/self/status to read)
    wireguard: str  # LOADED, BUILTIN, MODULE (loads on first use) or MISSING
    kernel_release: str
    nftables_error: str | None  # None: a harmless listing worked
    state_dir: Path
    state_dir_error: str | None  # None: a file could be written there


@dataclass(frozen=True)
class Missing:
    what: str
    todo: str
    exit_status: int

    def __str__(self) -> str:
        return f"{self.what}: {self.todo}"


def has_capability(caps: int | None, capability: int) -> bool:
    return caps is not None and bool(caps >> capability & 1)


def missing(facts: HostFacts) -> list[Missing]:
    """What stops the agent, most fundamental first (no privilege explains the rest)."""
    found: list[Missing] = []
    if not has_capability(facts.effective_caps, CAP_NET_ADMIN):
        found.append(
            Missing(
                "no CAP_NET_ADMIN (needed for the WireGuard link, routes, rules and nftables)",
                "run the agent as root (the kubespan.service unit does), or grant "
                "CAP_NET_ADMIN and CAP_NET_RAW",
                EXIT_NOPERM,
            )
        )
        return found  # nothing else can be judged without it
    if not has_capability(facts.effective_caps, CAP_NET_RAW):
        found.append(
            Missing(
                "no CAP_NET_RAW (needed for STUN and path checks from the WireGuard port)",
                "grant CAP_NET_RAW as well as CAP_NET_ADMIN",
                EXIT_NOPERM,
            )
        )
    if facts.wireguard == MISSING:
        found.append(
            Missing(
                f"this kernel ({facts.kernel_release}) has no WireGuard "
                "(no wireguard module, loaded, built in or installed)",
                "boot a kernel with WireGuard (Linux 5.6 or later has it; Debian's does), "
                "or install its module package",
                EXIT_UNAVAILABLE,
            )
        )
    if facts.nftables_error is not None:
        found.append(
            Missing(
                f"nftables is not usable ({facts.nftables_error})",
                "install nftables (libnftables) and use a kernel with nf_tables",
                EXIT_UNAVAILABLE,
            )
        )
    if facts.state_dir_error is not None:
        found.append(
            Missing(
                f"the state directory {facts.state_dir} cannot be written "
                f"({facts.state_dir_error})",
                "make it a writable directory for the agent (the unit's StateDirectory does)",
                EXIT_CANTCREAT,
            )
        )
    return found


def exit_status(found: list[Missing]) -> int:
    return found[0].exit_status if found else 0


# --- reading the facts ---------------------------------------------------------------


def effective_capabilities(root: Path = Path("/")) -> int | None:
    try:
        text = (root / "proc/self/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == "CapEff":
            try:
                return int(value.strip(), 16)
            except ValueError:
                return None
    return None


def wireguard_presence(release: str, root: Path = Path("/")) -> str:
    if (root / "sys/module/wireguard").exists():
        return LOADED
    modules = root / "lib/modules" / release
    for listing, presence in (("modules.builtin", BUILTIN), ("modules.dep", MODULE)):
        try:
            with (modules / listing).open() as lines:
                if any(_names_wireguard(line) for line in lines):
                    return presence
        except OSError:
            continue
    return MISSING


def _names_wireguard(line: str) -> bool:
    path = line.partition(":")[0].strip()
    return path.rsplit("/", 1)[-1].split(".ko", 1)[0] == "wireguard"


def nftables_error() -> str | None:
    from kubespan.apply.libnft import Nft
    from kubespan.errors import ApplyError

    try:
        nft = Nft()
    except ApplyError as error:
        return str(error)
    try:
        nft.run("list tables")
    except ApplyError as error:
        return str(error)
    finally:
        nft.close()
    return None


def state_dir_error(state_dir: Path) -> str | None:
    probe = state_dir / f".preflight-{os.getpid()}"
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        return error.strerror or type(error).__name__
    return None


def gather(state_dir: Path, root: Path = Path("/")) -> HostFacts:
    caps = effective_capabilities(root)
    release = platform.release()
    privileged = has_capability(caps, CAP_NET_ADMIN)
    return HostFacts(
        effective_caps=caps,
        wireguard=wireguard_presence(release, root),
        kernel_release=release,
        nftables_error=nftables_error() if privileged else None,
        state_dir=state_dir,
        state_dir_error=state_dir_error(state_dir),
    )
