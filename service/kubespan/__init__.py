"""kubespan: join machines on any network into one encrypted cluster over kernel WireGuard."""

import re
from pathlib import Path

__version__ = "0.1.0"

# extension/stage.sh (the extension's and the Debian package's build) writes the build's
# identity into the installed package, next to this file.
BUILD_FILE = "BUILD"
BUILD_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+:-]{0,63}")
_BUILD_FILE_MAX_BYTES = 128


def build_id(package_dir: Path | None = None) -> str | None:
    """The build stamp of an installed extension (`kubespan/BUILD`, or the one in
    `package_dir`), or None: a source tree has none, and an unreadable or malformed stamp
    counts as none (never an exception)."""
    try:
        with ((package_dir or Path(__file__).parent) / BUILD_FILE).open("rb") as stamp:
            raw = stamp.read(_BUILD_FILE_MAX_BYTES + 1)
        text = raw.decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if BUILD_ID_PATTERN.fullmatch(text) else None


def version_text() -> str:
    """What `kubespan --version` prints: `kubespan VERSION`, and `(build ID)` when stamped."""
    build = build_id()
    return f"kubespan {__version__}" + (f" (build {build})" if build else "")
