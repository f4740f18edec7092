"""Config drives: a small FAT file system with a label, built without loop mounts
(dosfstools + mtools), attached to a VM as a read-only disk."""

import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from kslab.errors import LabError

CONFIG_DRIVE_LABEL = "KUBESPAN"  # what the image's config sources look for


def build_config_drive(
    path: Path, files: Sequence[tuple[str, str]], label: str = CONFIG_DRIVE_LABEL
) -> Path:
    """Write a FAT image at `path` labelled `label` holding `files` (name, text)."""
    path.unlink(missing_ok=True)
    steps = [["mkfs.vfat", "-n", label, "-C", str(path), "1440"]]
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files:
            source = Path(tmp) / name
            source.write_text(text)
            steps.append(["mcopy", "-i", str(path), str(source), f"::{name}"])
        for argv in steps:
            result = subprocess.run(argv, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise LabError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return path


def build_nocloud_volume(path: Path, files: Sequence[tuple[str, str]]) -> Path:
    """Write an ISO 9660 image at `path` labelled "cidata" holding `files` (name, text), as
    cloud-init's NoCloud data source (and kubespan's) reads it."""
    path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files:
            (Path(tmp) / name).write_text(text)
        argv = ["xorriso", "-as", "mkisofs", "-quiet", "-V", "cidata", "-J", "-r"]
        result = subprocess.run(
            [*argv, "-o", str(path), tmp], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise LabError(f"xorriso {path}: {result.stderr.strip()}")
    return path
