"""The built image the VMs boot: kernel, initramfs and read-only root (`make image`)."""

from dataclasses import dataclass
from pathlib import Path


class ArtefactMissingError(Exception):
    """The image was not built."""


@dataclass(frozen=True)
class Image:
    kernel: Path
    initrd: Path
    root: Path


def find_image(repo: Path) -> Image:
    """Locate build/image/{vmlinuz,initrd.img,root.erofs} under the repository."""
    directory = repo / "build" / "image"
    image = Image(
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img",
        root=directory / "root.erofs",
    )
    missing = [str(p) for p in (image.kernel, image.initrd, image.root) if not p.is_file()]
    if missing:
        raise ArtefactMissingError(
            f"image not built ({', '.join(missing)} missing): run `make image` first"
        )
    return image
