"""The built images the VMs boot: kernel, initramfs and read-only root (`make image`), the
bootable disk image made from them (`make disk-image`), and a plain Debian 12 image that is
not ours (`make plain-image`), for installing the Debian package as on any host."""

from dataclasses import dataclass
from pathlib import Path


class ArtefactMissingError(Exception):
    """The image was not built."""


@dataclass(frozen=True)
class Image:
    kernel: Path
    initrd: Path
    root: Path
    disk: Path | None = None  # qcow2 for UEFI boot, when built
    # How the kernel finds the root (the first virtio disk), and whether the VM writes to it
    # (then through a qcow2 overlay of its own).
    root_args: tuple[str, ...] = ("root=/dev/vda", "rootfstype=erofs", "ro")
    writable_root: bool = False

    def require_disk(self) -> Path:
        if self.disk is None or not self.disk.is_file():
            raise ArtefactMissingError(
                f"disk image not built ({self.disk} missing): run `make disk-image` first"
            )
        return self.disk


def find_image(repo: Path) -> Image:
    """Locate build/image/{vmlinuz,initrd.img,root.erofs} under the repository."""
    directory = repo / "build" / "image"
    image = Image(
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img",
        root=directory / "root.erofs",
        disk=directory / "disk.qcow2",
    )
    return built(image, "image", "make image")


def find_plain_image(repo: Path) -> Image:
    """build/plain/{vmlinuz,initrd.img,root.ext4}: plain Debian 12, booted read-write."""
    directory = repo / "build" / "plain"
    image = Image(
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img",
        root=directory / "root.ext4",
        root_args=("root=/dev/vda", "rootfstype=ext4", "rw"),
        writable_root=True,
    )
    return built(image, "plain Debian image", "make plain-image")


def built(image: Image, what: str, command: str) -> Image:
    """`image`, once its kernel, initramfs and root are there."""
    missing = [str(p) for p in (image.kernel, image.initrd, image.root) if not p.is_file()]
    if missing:
        raise ArtefactMissingError(
            f"{what} not built ({', '.join(missing)} missing): run `{command}` first"
        )
    return image
