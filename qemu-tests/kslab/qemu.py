"""The QEMU command line of a lab VM (pure: values in, argv out)."""

from dataclasses import dataclass
from pathlib import Path

from kslab.artefacts import Image

KERNEL_ARGS = ("console=ttyS0", "quiet", "panic=-1")  # and the image's root_args
STATE_DISK_SERIAL = "kubespan-state"  # the image mounts /dev/disk/by-id/virtio-<this> on /var


# UEFI firmware from Debian's ovmf package (4 MiB flash, no Secure Boot).
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


@dataclass(frozen=True)
class UefiBoot:
    """Boot the disk image under OVMF instead of direct kernel boot."""

    disk: Path  # this VM's own writable disk (a qcow2 overlay of the built image)
    variables: Path  # this VM's copy of OVMF's variable store


@dataclass(frozen=True)
class QemuNic:
    tap: str
    mac: str


@dataclass(frozen=True)
class QemuMachine:
    name: str
    image: Image
    memory_mib: int
    cpus: int
    uuid: str  # SMBIOS system UUID: systemd derives a stable machine-id from it
    state_disk: Path
    nics: tuple[QemuNic, ...]
    fw_cfg: tuple[tuple[str, Path], ...]  # (fw_cfg name, file with the contents)
    agent_socket: Path
    serial_log: Path
    kernel_args: tuple[str, ...] = ()
    smbios: tuple[str, ...] = ()
    uefi: UefiBoot | None = None
    root_overlay: Path | None = None  # this VM's writes to a writable root image
    drives: tuple[tuple[Path, str], ...] = ()  # extra read-only disks: (image file, serial)


def qemu_command(m: QemuMachine) -> list[str]:
    argv = [
        "qemu-system-x86_64",
        "-name", m.name,
        "-accel", "tcg",  # KVM does not work here (nested); software emulation
        "-m", str(m.memory_mib),
        "-smp", str(m.cpus),
        "-uuid", m.uuid,
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-rng-pci,rng=rng0",
        "-chardev", f"socket,id=qga0,path={m.agent_socket},server=on,wait=off",
        "-device", "virtio-serial-pci",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-chardev", f"file,id=serial0,path={m.serial_log},append=on",
        "-serial", "chardev:serial0",
    ]  # fmt: skip
    argv += boot_arguments(m)
    for i, (path, serial) in enumerate(m.drives):
        argv += [
            "-drive", f"file={path},format=raw,if=none,id=extra{i},readonly=on",
            "-device", f"virtio-blk-pci,drive=extra{i},serial={serial}",
        ]  # fmt: skip
    for i, nic in enumerate(m.nics):
        argv += [
            "-netdev", f"tap,id=net{i},ifname={nic.tap},script=no,downscript=no",
            # romfile=: no iPXE option ROM, we never network-boot
            "-device", f"virtio-net-pci,netdev=net{i},mac={nic.mac},romfile=",
        ]  # fmt: skip
    for name, path in m.fw_cfg:
        argv += ["-fw_cfg", f"name={name},file={path}"]
    for value in m.smbios:
        argv += ["-smbios", value]
    return argv


def boot_arguments(m: QemuMachine) -> list[str]:
    if m.uefi is not None:
        return [
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={m.uefi.variables}",
            "-drive", f"file={m.uefi.disk},format=qcow2,if=none,id=disk,discard=unmap",
            "-device", "virtio-blk-pci,drive=disk,serial=kubespan-disk,bootindex=0",
        ]  # fmt: skip
    if m.root_overlay is not None:
        root = f"file={m.root_overlay},format=qcow2,if=none,id=root"
    else:
        root = f"file={m.image.root},format=raw,if=none,id=root,readonly=on"
    return [
        "-kernel", str(m.image.kernel),
        "-initrd", str(m.image.initrd),
        "-append", " ".join((*KERNEL_ARGS, *m.image.root_args, *m.kernel_args)),
        # The root disk comes first so that it is /dev/vda.
        "-drive", root,
        "-device", "virtio-blk-pci,drive=root,serial=kubespan-root",
        "-drive", f"file={m.state_disk},format=raw,if=none,id=state,discard=unmap",
        "-device", f"virtio-blk-pci,drive=state,serial={STATE_DISK_SERIAL}",
    ]  # fmt: skip
