"""The build stamp (`kubespan/BUILD`, `kubespan --version`) and the VM tests' second extension
(qemu-tests/upgrade.py): derived from a built one, it differs in the stamp and nothing else.
The erofs images here are tiny ones made by the test (erofs-utils, .ci/apt-packages.txt)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import kubespan
from kubespan import BUILD_FILE, build_id, version_text
from kubespan.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "qemu-tests"))

from upgrade import PACKAGE_DIR, STAMP, derive_extension

from kslab import LabError

EROFS_TOOLS = ("mkfs.erofs", "fsck.erofs")
needs_erofs = pytest.mark.skipif(
    not all(shutil.which(t) or shutil.which(t, path="/usr/sbin:/sbin") for t in EROFS_TOOLS),
    reason="erofs-utils (mkfs.erofs, fsck.erofs) not installed",
)


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    assert found is not None
    return found


def make_tree(root: Path, with_package: bool = True) -> None:
    """A small extension tree: the parts of the real one that matter here (an executable, a
    symlink, a binary file, empty and nested directories, the stamp)."""
    if with_package:
        package = root / PACKAGE_DIR
        package.mkdir(parents=True)
        (package / "__init__.py").write_text('__version__ = "0.1.0"\n')
        (package / BUILD_FILE).write_text("20250101T000000Z-0123456789ab\n")
        (package / "_native.so").write_bytes(os.urandom(200_000))
    command = root / "usr/bin/kubespan"
    command.parent.mkdir(parents=True)
    command.write_text("#!/usr/bin/python3 -I\nprint('kubespan')\n")
    command.chmod(0o755)
    units = root / "usr/lib/systemd/system"
    (units / "multi-user.target.wants").mkdir(parents=True)
    (units / "kubespan.service").write_text("[Service]\nExecStart=/usr/bin/kubespan agent\n")
    (units / "multi-user.target.wants/kubespan.service").symlink_to("../kubespan.service")
    release = root / "usr/lib/extension-release.d/extension-release.kubespan"
    release.parent.mkdir(parents=True)
    release.write_text("ID=debian\nVERSION_ID=12\n")
    (root / "usr/share/empty").mkdir(parents=True)


def pack(tree: Path, image: Path) -> Path:
    subprocess.run(
        [tool("mkfs.erofs"), "--quiet", "-zlz4hc", "--all-root", str(image), str(tree)],
        check=True,
    )
    return image


def extract(image: Path, into: Path) -> Path:
    flags = ["--preserve-perms", "--no-preserve-owner"]
    subprocess.run(
        [tool("fsck.erofs"), f"--extract={into}", *flags, str(image)],
        check=True,
        capture_output=True,
    )
    return into


def inventory(root: Path) -> dict[str, tuple[str, int, bytes]]:
    """Every entry under `root`: its kind, permission bits and content (a link's target)."""
    entries: dict[str, tuple[str, int, bytes]] = {}
    for path in sorted(root.rglob("*")):
        mode = path.lstat().st_mode
        name = str(path.relative_to(root))
        if stat.S_ISLNK(mode):
            entries[name] = ("link", 0, str(path.readlink()).encode())
        elif stat.S_ISDIR(mode):
            entries[name] = ("dir", stat.S_IMODE(mode), b"")
        else:
            entries[name] = ("file", stat.S_IMODE(mode), path.read_bytes())
    return entries


@needs_erofs
def test_derived_extension_differs_in_the_stamp_only(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_tree(tree)
    original = pack(tree, tmp_path / "kubespan.raw")
    before = hashlib.sha256(original.read_bytes()).digest()

    out = tmp_path / "newer" / "kubespan.raw"
    assert derive_extension(original, out, "upgrade-test.2") == out

    assert hashlib.sha256(original.read_bytes()).digest() == before  # untouched
    assert not out.with_name("kubespan.raw.tmp").exists()
    old = inventory(extract(original, tmp_path / "old"))
    new = inventory(extract(out, tmp_path / "new"))
    assert new.keys() == old.keys()
    stamp = str(STAMP)
    assert new[stamp] == ("file", 0o644, b"upgrade-test.2\n")
    assert old[stamp] == ("file", 0o644, b"20250101T000000Z-0123456789ab\n")
    assert {k: v for k, v in new.items() if k != stamp} == {
        k: v for k, v in old.items() if k != stamp
    }
    assert new["usr/bin/kubespan"][1] == 0o755
    assert build_id(tmp_path / "new" / PACKAGE_DIR) == "upgrade-test.2"


@needs_erofs
def test_derived_extension_replaces_its_output(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_tree(tree)
    original = pack(tree, tmp_path / "kubespan.raw")
    out = tmp_path / "out.raw"
    derive_extension(original, out, "first")
    derive_extension(original, out, "second")
    assert build_id(extract(out, tmp_path / "x") / PACKAGE_DIR) == "second"


@needs_erofs
def test_derive_refuses_an_image_without_the_package(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_tree(tree, with_package=False)
    original = pack(tree, tmp_path / "other.raw")
    with pytest.raises(LabError, match="not a kubespan extension"):
        derive_extension(original, tmp_path / "out.raw", "x1")
    assert not (tmp_path / "out.raw").exists()


@needs_erofs
def test_derive_names_what_failed(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="no such extension"):
        derive_extension(tmp_path / "missing.raw", tmp_path / "out.raw", "x1")
    garbage = tmp_path / "garbage.raw"
    garbage.write_bytes(b"not erofs" * 1000)
    with pytest.raises(LabError, match="extract"):
        derive_extension(garbage, tmp_path / "out.raw", "x1")


@pytest.mark.parametrize("build", ["", "-x", "a b", "a/b", "x" * 65, "é"])
def test_derive_refuses_a_build_id_the_stamp_cannot_carry(tmp_path: Path, build: str) -> None:
    with pytest.raises(ValueError, match="build"):
        derive_extension(tmp_path / "kubespan.raw", tmp_path / "out.raw", build)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"20250101T000000Z-0123456789ab\n", "20250101T000000Z-0123456789ab"),
        (b"  v1.2+local:3_x  \n", "v1.2+local:3_x"),
        (b"x" * 64, "x" * 64),
        (b"x" * 65, None),
        (b"x" * 100_000, None),
        (b"", None),
        (b"two words\n", None),
        (b"two\nlines\n", None),
        (b"\xff\xfe", None),
        (b"-leading-dash", None),
    ],
)
def test_build_id_reads_a_well_formed_stamp_only(
    tmp_path: Path, content: bytes, expected: str | None
) -> None:
    (tmp_path / BUILD_FILE).write_bytes(content)
    assert build_id(tmp_path) == expected


def test_build_id_without_a_readable_stamp(tmp_path: Path) -> None:
    assert build_id(tmp_path) is None  # a source tree: no stamp
    (tmp_path / BUILD_FILE).mkdir()
    assert build_id(tmp_path) is None
    assert build_id(tmp_path / "missing") is None


def test_version_names_the_build_when_stamped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(kubespan, "build_id", lambda: "20250101T000000Z-0123456789ab")
    assert (
        version_text() == f"kubespan {kubespan.__version__} (build 20250101T000000Z-0123456789ab)"
    )
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == (
        f"kubespan {kubespan.__version__} (build 20250101T000000Z-0123456789ab)\n"
    )


def test_version_without_a_stamp(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(kubespan, "build_id", lambda: None)
    assert version_text() == f"kubespan {kubespan.__version__}"
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out == f"kubespan {kubespan.__version__}\n"
