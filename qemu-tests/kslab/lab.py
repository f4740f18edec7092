"""The lab: one network namespace with its segments, host processes and VMs, torn down as
a whole (processes, VMs, namespace) on close, whatever happened."""

import atexit
import ipaddress
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from kslab.artefacts import Image
from kslab.capture import Capture
from kslab.configdrive import build_config_drive, build_nocloud_volume
from kslab.errors import LabError
from kslab.netns import Namespace, Segment
from kslab.platform import FW_CFG_PREFIX
from kslab.proc import HostProcess
from kslab.qemu import QemuMachine, QemuNic, UefiBoot
from kslab.router import LAN_IF, WAN_IF, Router, RouterSpec
from kslab.vm import AttachedNic, NicSpec, Vm, VmSpec, render_network
from kslab.wait import wait_until

# What a capture keeps of each packet (tcpdump's snapshot length): see Lab.capture.
CAPTURE_BYTES = 160


class Lab:
    """Usage: `with Lab(workdir, image) as lab: ...`. Logs, state disks and fw_cfg files are
    kept under `workdir` (one directory per VM); sockets go to a short temporary directory."""

    def __init__(self, workdir: Path, image: Image) -> None:
        self.workdir = workdir
        self.image = image
        self.segments: dict[str, Segment] = {}
        self.vms: dict[str, Vm] = {}
        self.processes: dict[str, HostProcess] = {}
        self.routers: dict[str, Router] = {}
        self._ns: Namespace | None = None
        self._runtime: Path | None = None
        self._taps = 0

    # --- setup -----------------------------------------------------------------------------

    def open(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._runtime = Path(tempfile.mkdtemp(prefix="kslab-"))
        atexit.register(self.close)
        self._ns = Namespace.create()
        # The lab namespace is a switch and a host, never a router between segments: site
        # segments are reached only through their NAT routers.
        self._ns.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"])
        self._ns.run(["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=0"])

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def ns(self) -> Namespace:
        if self._ns is None:
            raise LabError("lab is not open")
        return self._ns

    def add_segment(
        self,
        name: str = "lan",
        subnet: str = "192.0.2.0/24",
        subnet6: str | None = "2001:db8::/64",
        host: tuple[int, ...] = (4, 6),
    ) -> Segment:
        """A new L2 segment (bridge). The lab namespace takes host address 1 of the subnet
        of each IP version in `host`: `host=()` makes a segment the lab namespace has no
        address on (a site behind a NAT router, reached only through the router), `(6,)`
        an IPv6-only one."""
        if name in self.segments:
            raise LabError(f"segment {name} exists")
        segment = Segment(
            name=name,
            bridge=f"br{len(self.segments)}",
            subnet=ipaddress.IPv4Network(subnet),
            subnet6=ipaddress.IPv6Network(subnet6) if subnet6 else None,
        )
        addresses = [str(segment.gateway)] if 4 in host else []
        if segment.subnet6 is not None and 6 in host:
            addresses.append(str(segment.address6(1)))
        self.ns.add_bridge(segment.bridge, addresses)
        self.segments[name] = segment
        return segment

    def add_router(self, spec: RouterSpec) -> Router:
        """A NAT router (router.py) between `spec.wan_segment` and `spec.lan_segment`,
        running in a namespace of its own; torn down with the lab."""
        if spec.name in self.routers:
            raise LabError(f"router {spec.name} exists")
        for segment in (spec.wan_segment, spec.lan_segment):
            if segment not in self.segments:
                raise LabError(f"no segment {segment}: add_segment() it first")
        router = Router(spec, Namespace.create("ksr"))
        self.routers[spec.name] = router
        self.ns.add_veth_to(
            f"r{spec.name}-w", self.segments[spec.wan_segment].bridge, router.ns, WAN_IF
        )
        self.ns.add_veth_to(
            f"r{spec.name}-l", self.segments[spec.lan_segment].bridge, router.ns, LAN_IF
        )
        router.configure()
        return router

    # --- host processes ------------------------------------------------------------------

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> HostProcess:
        """Start a host process inside the lab namespace; output goes to WORKDIR/NAME.log.
        It is stopped at teardown."""
        if name in self.processes:
            raise LabError(f"process {name} exists")
        process = HostProcess(
            name, self.ns.command(argv), self.workdir / f"{name}.log", env=env, cwd=cwd
        )
        self.processes[name] = process
        return process

    def run(
        self, argv: Sequence[str], timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command inside the lab namespace."""
        return self.ns.run(argv, timeout=timeout, check=check)

    def capture(self, segment: str, name: str = "capture") -> Capture:
        """Capture every packet on a segment's bridge until `stop()`; ready when returned.
        Each packet's first CAPTURE_BYTES are kept: every header the checks read (Ethernet,
        IPv6, ICMPv6 and the IPv6 and UDP headers it quotes: 110 bytes) and the start of the
        payload that tells WireGuard's messages apart. Whole packets would cost the host
        (2 cores, running every VM) a copy of every byte a stream sends, twice over where it
        crosses the segment twice (through a relay)."""
        path = self.workdir / f"{name}.pcap"
        bridge = self.segments[segment].bridge
        process = self.spawn(
            name,
            ["tcpdump", "-i", bridge, "-n", "-U", "-s", str(CAPTURE_BYTES), "-w", str(path)],
        )
        capture = Capture(process, path)
        capture.wait_ready()
        return capture

    def wait_tcp(self, host: str, port: int, timeout: float = 30.0) -> None:
        """Wait until something inside the namespace accepts TCP connections on host:port."""
        probe = f"import socket; socket.create_connection(({host!r}, {port}), 1).close()"
        wait_until(
            lambda: self.run([sys.executable, "-c", probe], check=False).returncode == 0,
            timeout,
            f"TCP {host}:{port} in {self.ns.name}",
        )

    # --- VMs -----------------------------------------------------------------------------

    def add_vm(self, spec: VmSpec) -> Vm:
        """Prepare a VM (taps, state disk location, fw_cfg files); `Vm.start()` boots it."""
        if spec.name in self.vms:
            raise LabError(f"VM {spec.name} exists")
        index = len(self.vms)
        directory = self.workdir / spec.name
        directory.mkdir(parents=True, exist_ok=True)
        nics = tuple(self._attach(nic, index, i) for i, nic in enumerate(spec.nics))

        entries = render_network(nics, spec.network)
        entries[FW_CFG_PREFIX + "hostname"] = spec.name
        if spec.machineconfig is not None:
            entries[FW_CFG_PREFIX + "machineconfig"] = spec.machineconfig
        for name, text in spec.fw_cfg:
            entries[name if name.startswith("opt/") else FW_CFG_PREFIX + name] = text
        fw_cfg = []
        for name, text in sorted(entries.items()):
            path = directory / ("fw_cfg." + name.rsplit("/", 1)[-1])
            path.write_text(text)
            path.chmod(0o600)
            fw_cfg.append((name, path))

        drives: tuple[tuple[Path, str], ...] = ()
        if spec.config_drive:
            drive = build_config_drive(directory / "config-drive.img", spec.config_drive)
            drives += ((drive, "kubespan-config"),)
        if spec.nocloud:
            volume = build_nocloud_volume(directory / "cidata.iso", spec.nocloud)
            drives += ((volume, "cidata"),)
        for path, serial in spec.files:
            drives += ((sector_padded(path, directory / f"file-{serial}.img"), serial),)
        image = spec.image or self.image
        uefi = None
        if spec.disk_image:
            uefi = UefiBoot(disk=directory / "disk.qcow2", variables=directory / "OVMF_VARS.fd")
        machine = QemuMachine(
            name=spec.name,
            image=image,
            memory_mib=spec.memory_mib,
            cpus=spec.cpus,
            uuid=str(uuid.uuid4()),
            state_disk=directory / "state.img",
            nics=tuple(QemuNic(tap=n.tap, mac=n.mac) for n in nics),
            fw_cfg=tuple(fw_cfg),
            agent_socket=self._runtime_dir() / f"{spec.name}.qga",
            serial_log=directory / "serial.log",
            kernel_args=spec.kernel_args,
            smbios=spec.smbios,
            uefi=uefi,
            root_overlay=directory / "root.qcow2" if image.writable_root else None,
            drives=drives,
        )
        vm = Vm(spec, machine, nics, self.ns.command([]), directory)
        self.vms[spec.name] = vm
        return vm

    def boot(self, spec: VmSpec, timeout: float = 240.0) -> Vm:
        """Add, start and wait for one VM."""
        return self.boot_all([spec], timeout)[0]

    def boot_all(self, specs: Sequence[VmSpec], timeout: float = 300.0) -> list[Vm]:
        """Start several VMs at once, then wait for each one's guest agent."""
        vms = [self.add_vm(spec) for spec in specs]
        for vm in vms:
            vm.start()
        for vm in vms:
            vm.wait_agent(timeout)
        return vms

    def _attach(self, nic_spec: NicSpec, vm_index: int, nic_index: int) -> AttachedNic:
        segment = self.segments.get(nic_spec.segment)
        if segment is None:
            raise LabError(f"no segment {nic_spec.segment}: add_segment() it first")
        tap = f"tap{self._taps}"
        self._taps += 1
        self.ns.add_tap(tap, segment.bridge)
        mac = f"52:54:00:6b:{vm_index & 0xFF:02x}:{nic_index & 0xFF:02x}"
        return AttachedNic(spec=nic_spec, segment=segment, tap=tap, mac=mac)

    def _runtime_dir(self) -> Path:
        if self._runtime is None:
            raise LabError("lab is not open")
        return self._runtime

    # --- teardown ------------------------------------------------------------------------

    def diagnostics(self) -> str:
        parts = [f"lab namespace {self._ns.name if self._ns else '-'}, workdir {self.workdir}"]
        parts += [vm.diagnostics() for vm in self.vms.values()]
        parts += [router.diagnostics() for router in self.routers.values()]
        for process in self.processes.values():
            state = "running" if process.running else f"exited {process.returncode}"
            parts.append(
                f"===== host process {process.name} ({state}), {process.log_path}\n"
                f"{process.log_tail()}"
            )
        return "\n".join(parts)

    def close(self) -> None:
        """Kill VMs, stop host processes, delete the namespace. Safe to call twice."""
        for vm in self.vms.values():
            vm.kill()
        for process in self.processes.values():
            process.stop()
        for router in self.routers.values():
            router.destroy()
        self.routers.clear()
        if self._ns is not None:
            self._ns.destroy()
            self._ns = None
        if self._runtime is not None:
            shutil.rmtree(self._runtime, ignore_errors=True)
            self._runtime = None
        atexit.unregister(self.close)


def sector_padded(source: Path, target: Path) -> Path:
    """A copy of `source` padded with zeros to whole 512-byte sectors, which is what a disk
    image must hold (the guest reads the file's own length back)."""
    data = source.read_bytes()
    target.write_bytes(data + bytes(-len(data) % 512))
    return target
