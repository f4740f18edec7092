"""A lab VM: what to boot (VmSpec) and the running machine (Vm)."""

import ipaddress
import re
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

from kslab.artefacts import Image
from kslab.errors import LabError
from kslab.netns import Segment
from kslab.platform import FW_CFG_PREFIX, static_network
from kslab.proc import HostProcess
from kslab.qemu import OVMF_VARS, QemuMachine, qemu_command
from kslab.qga import ExecResult, GuestAgent, GuestAgentError
from kslab.wait import wait_until

NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass(frozen=True)
class NicSpec:
    """A NIC on the lab segment named `segment`, with static addresses (none: the image's
    default, DHCP, applies)."""

    segment: str
    addresses: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...] = ()
    gateways: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()


@dataclass(frozen=True)
class VmSpec:
    name: str  # also the hostname handed to the guest
    nics: tuple[NicSpec, ...] = ()
    machineconfig: str | None = None  # YAML text, fw_cfg opt/org.kubespan/machineconfig
    network: str | None = None  # networkd file for NIC 0 instead of one rendered from `nics`
    memory_mib: int = 768
    cpus: int = 1
    state_disk_mib: int = 512
    kernel_args: tuple[str, ...] = ()
    # QEMU -smbios values, e.g. "type=1,manufacturer=Amazon EC2": what a cloud's DMI says
    smbios: tuple[str, ...] = ()
    fw_cfg: tuple[tuple[str, str], ...] = field(default=())  # extra (name, text) entries
    config_drive: tuple[tuple[str, str], ...] = ()  # files on a FAT disk labelled KUBESPAN
    # Boot the disk image (`make disk-image`) under UEFI firmware, on a disk of this size,
    # instead of direct kernel boot with a separate state disk.
    disk_image: bool = False
    disk_mib: int = 1024
    # Files on an ISO 9660 volume labelled "cidata", as cloud-init's NoCloud reads it
    # (user-data, meta-data).
    nocloud: tuple[tuple[str, str], ...] = ()
    # Another image than the lab's (e.g. kslab.find_plain_image), booted directly.
    image: Image | None = None
    # Files handed to the guest as read-only disks, each readable in full at
    # /dev/disk/by-id/virtio-SERIAL (zero-padded to a whole sector): (file, serial).
    files: tuple[tuple[Path, str], ...] = ()

    def __post_init__(self) -> None:
        if not NAME.match(self.name):
            raise ValueError(f"VM name {self.name!r}: use a-z, 0-9 and '-', up to 31 chars")


@dataclass(frozen=True)
class AttachedNic:
    spec: NicSpec
    segment: Segment
    tap: str
    mac: str


class Vm:
    """A VM of the lab. Created by `Lab.add_vm`; `start()` boots it, `wait_agent()` waits
    until its guest agent answers; `exec()` runs commands in it."""

    def __init__(
        self,
        spec: VmSpec,
        machine: QemuMachine,
        nics: tuple[AttachedNic, ...],
        netns_command: list[str],
        directory: Path,
    ) -> None:
        self.spec = spec
        self.machine = machine
        self.nics = nics
        self.directory = directory
        self._netns_command = netns_command
        self._process: HostProcess | None = None
        self.agent = GuestAgent(machine.agent_socket)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def serial_log(self) -> Path:
        return self.machine.serial_log

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start QEMU (the state disk is created blank on the first start, kept after)."""
        if self.running:
            raise LabError(f"{self.name}: already running")
        uefi = self.machine.uefi
        if uefi is not None:
            if not uefi.disk.exists():
                overlay_disk(self.machine.image.require_disk(), uefi.disk, self.spec.disk_mib)
            if not uefi.variables.exists():
                shutil.copyfile(OVMF_VARS, uefi.variables)
        elif self.machine.root_overlay is not None and not self.machine.root_overlay.exists():
            overlay_disk(self.machine.image.root, self.machine.root_overlay, None, "raw")
        if uefi is None and not self.machine.state_disk.exists():
            with self.machine.state_disk.open("wb") as f:
                f.truncate(self.spec.state_disk_mib * 1024 * 1024)
        self.agent.close()
        self._process = HostProcess(
            f"qemu-{self.name}",
            [*self._netns_command, *qemu_command(self.machine)],
            self.directory / "qemu.log",
        )

    def wait_agent(self, timeout: float = 240.0) -> None:
        """Wait until the guest agent answers: the guest has booted far enough to take
        commands. Fails at once, with the serial log, if QEMU exits."""
        try:
            self.agent.connect(timeout, alive=lambda: self.running)
        except GuestAgentError as e:
            raise LabError(f"{self.name}: {e}\n--- serial log ---\n{self.serial_tail()}") from e

    def poweroff(self, timeout: float = 120.0) -> None:
        """Shut the guest down cleanly and wait for QEMU to exit; kill it if it does not."""
        if not self.running:
            return
        try:
            if not self.agent.connected:
                self.agent.connect(10.0, alive=lambda: self.running)
            self.agent.send("guest-shutdown", {"mode": "powerdown"})
        except (GuestAgentError, OSError):
            pass  # the timeout below decides
        self.agent.close()
        assert self._process is not None
        if self._process.wait(timeout) is None:
            self.kill()
            raise LabError(f"{self.name}: did not power off within {timeout:.0f} s; killed")

    def set_fw_cfg(self, name: str, text: str | None) -> None:
        """Change (or, with None, remove) a fw_cfg entry for the next boot."""
        full = name if name.startswith("opt/") else FW_CFG_PREFIX + name
        entries = [(n, p) for n, p in self.machine.fw_cfg if n != full]
        if text is not None:
            path = self.directory / ("fw_cfg." + full.rsplit("/", 1)[-1])
            path.write_text(text)
            path.chmod(0o600)
            entries.append((full, path))
        self.machine = replace(self.machine, fw_cfg=tuple(sorted(entries)))

    def reboot(self, timeout: float = 240.0) -> None:
        """Power off cleanly and boot again from the same state disk."""
        self.poweroff()
        self.start()
        self.wait_agent(timeout)

    def kill(self) -> None:
        """Stop QEMU at once (pulls the plug)."""
        self.agent.close()
        if self._process is not None:
            self._process.stop(timeout=5.0)

    # --- commands ------------------------------------------------------------------------

    def exec(
        self, argv: list[str], stdin: bytes | None = None, timeout: float = 120.0
    ) -> ExecResult:
        """Run `argv` in the guest: (exit_code, stdout, stderr)."""
        if not self.agent.connected:
            self.wait_agent(30.0)
        return self.agent.exec(argv, stdin=stdin, timeout=timeout)

    def check(self, argv: list[str], stdin: bytes | None = None, timeout: float = 120.0) -> str:
        """Run `argv` in the guest; return its stdout, raise LabError if it fails."""
        result = self.exec(argv, stdin=stdin, timeout=timeout)
        if result.exit_code != 0:
            raise LabError(
                f"{self.name}: {' '.join(argv)}: exit {result.exit_code}\n"
                f"stdout: {result.stdout.strip()}\nstderr: {result.stderr.strip()}"
            )
        return result.stdout

    def sh(self, script: str, timeout: float = 120.0) -> ExecResult:
        """Run a shell snippet in the guest."""
        return self.exec(["/bin/sh", "-c", script], timeout=timeout)

    def write_file(self, path: str, data: bytes, mode: str = "0644") -> None:
        self.check(
            ["/bin/sh", "-c", f'umask 077; cat > "$0" && chmod {mode} "$0"', path], stdin=data
        )

    def journal(self, unit: str | None = None, lines: int | None = None) -> str:
        """This boot's journal, of one unit or of everything."""
        argv = ["journalctl", "-b", "--no-pager", "-o", "short-monotonic"]
        if unit is not None:
            argv += ["-u", unit]
        if lines is not None:
            argv += ["-n", str(lines)]
        return self.exec(argv).stdout

    def unit_state(self, unit: str) -> str:
        return self.exec(["systemctl", "is-active", unit]).stdout.strip()

    def wait_unit(self, unit: str, state: str = "active", timeout: float = 180.0) -> None:
        """Wait until `systemctl is-active UNIT` prints `state`."""
        try:
            wait_until(
                lambda: self.unit_state(unit) == state,
                timeout,
                f"{unit} to be {state}",
                interval=1.0,
            )
        except LabError as e:
            raise LabError(
                f"{self.name}: {e} (now {self.unit_state(unit)})\n{self.journal(unit, lines=50)}"
            ) from e

    def wait_boot(self, timeout: float = 240.0) -> str:
        """Wait until boot has finished; return the system state ("running", "degraded")."""
        result = self.exec(["systemctl", "is-system-running", "--wait"], timeout=timeout)
        return result.stdout.strip()

    # --- diagnostics ---------------------------------------------------------------------

    def serial_tail(self, lines: int = 60) -> str:
        try:
            text = self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no serial log)"
        text = ANSI.sub("", text).replace("\r", "")
        return "\n".join(text.splitlines()[-lines:])

    def diagnostics(self) -> str:
        """What an engineer needs when a node failed: its kubespan journal, failed units,
        and the tail of its serial console."""
        parts = [f"===== VM {self.name} ({'running' if self.running else 'not running'})"]
        if self.running:
            for title, argv in (
                ("systemctl --failed", ["systemctl", "--failed", "--no-pager"]),
                (
                    "journalctl -b -u kubespan-platform -u kubespan",
                    [
                        "journalctl",
                        "-b",
                        "--no-pager",
                        "-n",
                        "200",
                        "-u",
                        "kubespan-platform",
                        "-u",
                        "kubespan",
                    ],
                ),
            ):
                try:
                    if not self.agent.connected:
                        self.agent.connect(10.0, alive=lambda: self.running)
                    result = self.agent.exec(argv, timeout=30.0)
                    body = (result.stdout + result.stderr).rstrip()
                except LabError as e:
                    body = f"(guest agent unavailable: {e})"
                parts.append(f"----- {self.name}: {title}\n{body}")
        parts.append(f"----- {self.name}: serial console (tail)\n{self.serial_tail()}")
        if self._process is not None and not self.running:
            parts.append(f"----- {self.name}: qemu output\n{self._process.log_tail()}")
        return "\n".join(parts)

    def __repr__(self) -> str:
        return f"Vm({self.name!r}, running={self.running})"


def render_network(nics: tuple[AttachedNic, ...], primary: str | None) -> dict[str, str]:
    """fw_cfg entries configuring the NICs: NIC 0 as the platform's `network` file (or
    `primary` verbatim), further NICs with static addresses as `networkd.*` files."""
    entries: dict[str, str] = {}
    for i, nic in enumerate(nics):
        text = None
        if nic.spec.addresses:
            text = static_network(nic.mac, nic.spec.addresses, nic.spec.gateways)
        if i == 0:
            text = primary if primary is not None else text
            if text is not None:
                entries[FW_CFG_PREFIX + "network"] = text
        elif text is not None:
            entries[f"{FW_CFG_PREFIX}networkd.{10 + i}-nic{i}.network"] = text
    if not nics and primary is not None:
        entries[FW_CFG_PREFIX + "network"] = primary
    return entries


def overlay_disk(
    image: Path, disk: Path, size_mib: int | None, image_format: str = "qcow2"
) -> None:
    """A VM's own disk: writes go to `disk`, the built image stays as it is."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image), "-F", image_format]
    size = [] if size_mib is None else [f"{size_mib}M"]
    result = subprocess.run([*argv, str(disk), *size], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LabError(f"qemu-img create {disk}: {result.stderr.strip()}")
