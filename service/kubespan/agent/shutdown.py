"""Whether the machine is powering off, rather than rebooting: only then does a stopping agent
publish its leave. A node that reboots (or whose agent restarts, or is upgraded) comes back
with the same identity, and its peers must keep it meanwhile: a leave would make every peer
drop it and tear down its tunnels for nothing.

systemd says what is under way in its job queue: a power-off queues `poweroff.target` (or
`halt.target`), a reboot `reboot.target` or `kexec.target`. Stopping the unit by hand
queues neither, so a plain `systemctl stop kubespan` does not leave either.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable

log = logging.getLogger(__name__)

POWER_OFF_TARGETS = frozenset({"poweroff.target", "halt.target"})
LIST_JOBS = ("systemctl", "list-jobs", "--no-legend", "--plain", "--no-pager")
LIST_JOBS_TIMEOUT_SECONDS = 5.0
MAX_LISTING_BYTES = 1 << 20  # a job queue during shutdown lists a few hundred units at most


def powering_off(listing: str) -> bool:
    """Whether a `systemctl list-jobs --no-legend --plain` listing has a power-off start job.
    Its lines are "ID UNIT TYPE STATE"; anything else is ignored."""
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] in POWER_OFF_TARGETS and fields[2] == "start":
            return True
    return False


Runner = Callable[..., "subprocess.CompletedProcess[bytes]"]


def system_powering_off(run: Runner = subprocess.run) -> bool:
    """Ask systemd; in doubt (no systemd, an error, a timeout) the answer is no: a node that
    fails to leave drops out when its sealed record expires, whereas a wrong leave cuts a
    rebooting node off."""
    try:
        result = run(
            list(LIST_JOBS),
            capture_output=True,
            timeout=LIST_JOBS_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("cannot tell whether the machine powers off (%s): not leaving", error)
        return False
    if result.returncode != 0:
        log.warning(
            "cannot tell whether the machine powers off (systemctl list-jobs exited %d): "
            "not leaving",
            result.returncode,
        )
        return False
    return powering_off(result.stdout[:MAX_LISTING_BYTES].decode(errors="replace"))
