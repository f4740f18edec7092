"""The built image the VMs boot: kernel, initramfs and read-only root (`make image`), and the
bootable disk image made from them (`make disk-image`)."""

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
    missing = [str(p) for p in (image.kernel, image.initrd, image.root) if not p.is_file()]
    if missing:
        raise ArtefactMissingError(
            f"image not built ({', '.join(missing)} missing): run `make image` first"
        )
    return image
