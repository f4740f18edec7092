"""An extension upgrade on a running node, host side: a second extension made from the built
one (the same files, another build stamp, so no wheel is rebuilt), served over HTTP from the
lab's host side, and installed in a guest the way an operator would (README.md, "Upgrading").

    newer = derive_extension(image_extension, workdir / "kubespan.raw", "upgrade-test")
    serve_file(lab, newer, host, 8080)
    print(install_extension(vm, served_url(host, 8080, newer)))  # kubespan 0.1.0 (build ...)
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from kubespan import BUILD_FILE, BUILD_ID_PATTERN

from kslab import HostProcess, Lab, LabError, Vm

# Where the package (and its build stamp) lives inside the extension (extension/build.sh).
PACKAGE_DIR = Path("usr/lib/kubespan/site-packages/kubespan")
STAMP = PACKAGE_DIR / BUILD_FILE
# systemd-sysext takes the first image of a name along /etc/extensions, /run/extensions,
# /var/lib/extensions, /usr/local/lib/extensions, /usr/lib/extensions: this one shadows the
# image's own /usr/lib/extensions/kubespan.raw.
GUEST_EXTENSIONS = "/var/lib/extensions"
GUEST_EXTENSION = GUEST_EXTENSIONS + "/kubespan.raw"
GUEST_PARTIAL = GUEST_EXTENSION + ".tmp"  # no .raw suffix: systemd-sysext never picks it up
TOOL_TIMEOUT_SECONDS = 300.0

# Run by the guest's python3 (the image has no curl or wget): fetch URL to DEST, check the
# length the server announced and the erofs magic, and fsync before the caller renames it.
_DOWNLOAD = """\
import os, sys, urllib.request
url, dest = sys.argv[1], sys.argv[2]
size = 0
with urllib.request.urlopen(url, timeout=60) as answer, open(dest, "wb") as out:
    expected = answer.headers.get("Content-Length")
    while chunk := answer.read(1 << 20):
        out.write(chunk)
        size += len(chunk)
    out.flush()
    os.fsync(out.fileno())
if expected is not None and int(expected) != size:
    sys.exit(f"got {size} bytes of {expected}")
with open(dest, "rb") as image:
    image.seek(1024)
    if image.read(4) != bytes.fromhex("e2e1f5e0"):
        sys.exit(f"{url} is not an erofs image")
print(size)
"""


def derive_extension(original: Path, out: Path, build: str) -> Path:
    """A second extension made from `original` without rebuilding anything: every file the
    same but the build stamp (`kubespan/BUILD`), which says `build`. Extracted with
    fsck.erofs, packed with mkfs.erofs as extension/build.sh packs; written atomically to
    `out`, which is returned. LabError names the step or tool that failed."""
    if not BUILD_ID_PATTERN.fullmatch(build):
        raise ValueError(f"build {build!r}: use 1 to 64 of A-Z a-z 0-9 . _ + : -")
    fsck, mkfs = _tool("fsck.erofs"), _tool("mkfs.erofs")
    if not original.is_file():
        raise LabError(f"{original}: no such extension (make extension builds it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".tmp")
    with tempfile.TemporaryDirectory(prefix="kubespan-derive-") as scratch:
        tree = Path(scratch) / "root"
        # Ownership does not matter (packed --all-root, as build.sh does); modes do.
        _run(
            [fsck, f"--extract={tree}", "--preserve-perms", "--no-preserve-owner", str(original)],
            f"extract {original}",
        )
        if not (tree / PACKAGE_DIR).is_dir():
            raise LabError(f"{original}: no /{PACKAGE_DIR}: not a kubespan extension")
        stamp = tree / STAMP
        stamp.unlink(missing_ok=True)
        stamp.write_text(build + "\n")
        stamp.chmod(0o644)
        try:
            _run(
                [mkfs, "--quiet", "-zlz4hc", "--all-root", str(partial), str(tree)],
                f"pack {out}",
            )
            partial.replace(out)
        finally:
            partial.unlink(missing_ok=True)
    return out


def serve_file(lab: Lab, path: Path, host: str, port: int) -> HostProcess:
    """Serve `path` (that file alone) over HTTP at http://HOST:PORT/NAME from the lab's host
    side (inside the lab namespace, like the discovery service); ready when returned, stopped
    with the lab. `served_url` names the URL."""
    if not path.is_file():
        raise LabError(f"{path}: nothing to serve")
    name = f"http-{port}"
    suffix = 1
    while name in lab.processes:
        suffix += 1
        name = f"http-{port}-{suffix}"
    directory = lab.workdir / name
    directory.mkdir(parents=True)
    served = directory / path.name
    try:
        served.hardlink_to(path)
    except OSError:
        shutil.copyfile(path, served)
    argv = [sys.executable, "-m", "http.server", "--bind", host, "--directory", str(directory)]
    process = lab.spawn(name, [*argv, str(port)])
    lab.wait_tcp(host, port)
    return process


def served_url(host: str, port: int, path: Path) -> str:
    """The URL `serve_file(lab, path, host, port)` serves the file at."""
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    return f"http://{host}:{port}/{path.name}"


def install_extension(vm: Vm, url: str) -> str:
    """Upgrade the running node as an operator would: download the extension at `url` to
    /var/lib/extensions/kubespan.raw (atomically), `systemd-sysext refresh`, `systemctl
    daemon-reload`, `systemctl restart kubespan`. Returns what `kubespan --version` prints
    afterwards. A failing step raises LabError naming it."""
    _step(vm, "create /var/lib/extensions", ["mkdir", "-p", GUEST_EXTENSIONS])
    _step(vm, f"download {url}", ["python3", "-I", "-c", _DOWNLOAD, url, GUEST_PARTIAL], 300.0)
    _step(vm, "move into place", ["mv", "-f", GUEST_PARTIAL, GUEST_EXTENSION])
    _step(vm, "systemd-sysext refresh", ["systemd-sysext", "refresh"], 180.0)
    # `list` shows, per name, the image systemd-sysext picks: it must be the new one.
    listed = _step(vm, "systemd-sysext list", ["systemd-sysext", "list", "--json=short"])
    picked = _picked(listed, "kubespan")
    if picked != [GUEST_EXTENSION]:
        raise LabError(
            f"{vm.name}: extension upgrade, step 'systemd-sysext refresh': systemd-sysext "
            f"picks {picked} for kubespan, not {GUEST_EXTENSION}"
        )
    _step(vm, "systemctl daemon-reload", ["systemctl", "daemon-reload"])
    try:
        _step(vm, "systemctl restart kubespan", ["systemctl", "restart", "kubespan"], 180.0)
    except LabError as error:
        try:
            journal = vm.journal("kubespan", lines=40)
        except LabError as unreachable:
            journal = f"(no journal: {unreachable})"
        raise LabError(f"{error}\n{journal}") from error
    return _step(vm, "kubespan --version", ["kubespan", "--version"]).strip()


def _step(vm: Vm, step: str, argv: list[str], timeout: float = 120.0) -> str:
    try:
        return vm.check(argv, timeout=timeout)
    except LabError as error:
        raise LabError(f"{vm.name}: extension upgrade, step {step!r} failed: {error}") from error


def _picked(listing: str, name: str) -> list[str]:
    """The paths `systemd-sysext list --json=short` names for extension `name`."""
    try:
        images = json.loads(listing) if listing.strip() else []
    except ValueError:
        raise LabError(f"systemd-sysext list: not JSON: {listing[:200]!r}") from None
    if not isinstance(images, list):
        raise LabError(f"systemd-sysext list: not a JSON list: {listing[:200]!r}")
    return [
        str(image.get("path"))
        for image in images
        if isinstance(image, dict) and image.get("name") == name
    ]


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise LabError(f"{name} not found: install erofs-utils (.ci/apt-packages.txt)")
    return found


def _run(argv: list[str], step: str) -> None:
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_SECONDS, check=False
        )
    except subprocess.TimeoutExpired:
        raise LabError(
            f"{step}: {argv[0]} still running after {TOOL_TIMEOUT_SECONDS:.0f} s"
        ) from None
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()
        raise LabError(f"{step}: {' '.join(argv)}: exit {result.returncode}\n{output}")
