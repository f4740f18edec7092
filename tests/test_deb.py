"""The Debian package (deb/build.sh, `make deb`), built once for this module and read with
dpkg-deb: control fields, files, the precompiled code, and the bundled code run by this host's
/usr/bin/python3 (Debian 12's CPython 3.11, as on a node). The maintainer scripts the package
ships run against a stand-in root (`$DPKG_ROOT`, as dpkg's chrootless mode sets it) with
systemctl and the other system commands replaced by stubs that log their calls; dpkg itself
installs, upgrades and purges the package in such a root; and in a network namespace, the
packaged prerm takes out kubespan's nftables table, rules and routes with the packaged code."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from netlab import namespaces

REPO = Path(__file__).resolve().parent.parent
SITE = "usr/lib/kubespan/site-packages"
# Every character a build stamp may hold (kubespan.BUILD_ID_PATTERN), so the version mapping
# meets all of them: _ : - become dots.
STAMP = "20250101T000000Z-0123456789ab_t:1"
CONFIG = "etc/kubespan/machineconfig.yaml"
EXAMPLE = "etc/kubespan/machineconfig.yaml.example"
SCRIPTS = ("postinst", "prerm", "postrm")
HOST_PYTHON = Path("/usr/bin/python3")
# What lintian reports that is by design: the package bundles its dependencies as the wheels
# publish them (PyYAML links libyaml in; their objects are not stripped, so they match the
# wheels' RECORD) and precompiles them, as the system extension does.
LINTIAN_ERRORS_BY_DESIGN = {
    "package-installs-python-pycache-dir",
    "embedded-library",
    "unstripped-binary-or-object",
}


def upstream_version() -> str:
    with (REPO / "pyproject.toml").open("rb") as file:
        version = tomllib.load(file)["project"]["version"]
    assert isinstance(version, str)
    return version


VERSION = f"{upstream_version()}+20250101T000000Z.0123456789ab.t.1"


def need_tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        pytest.fail(
            f"{name} not found: the package tests need it ({name} comes with Debian's "
            "dpkg, always installed on Debian; .ci/install-host-packages)",
            pytrace=False,
        )
    return found


def run(
    argv: list[str | Path], env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], input=stdin, capture_output=True, text=True, env=env, check=False
    )


def ok(argv: list[str | Path], env: dict[str, str] | None = None) -> str:
    result = run(argv, env=env)
    assert result.returncode == 0, f"{argv} exited {result.returncode}: {result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_tool("dpkg-deb")
    out = tmp_path_factory.mktemp("deb")
    (out / "kubespan_0.0.1+old_amd64.deb").write_bytes(b"an older build")
    env = {**os.environ, "KUBESPAN_BUILD": STAMP, "PYTHON": sys.executable}
    result = run([REPO / "deb/build.sh", out], env=env)
    assert result.returncode == 0, f"deb/build.sh failed:\n{result.stdout}{result.stderr}"
    built = sorted(out.glob("*.deb"))
    assert [p.name for p in built] == [f"kubespan_{VERSION}_amd64.deb"], "older builds go"
    return built[0]


@pytest.fixture(scope="module")
def extracted(package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's files, and its control files in DEBIAN/ (`dpkg-deb --raw-extract`)."""
    root = tmp_path_factory.mktemp("extracted") / "root"
    ok([need_tool("dpkg-deb"), "--raw-extract", package, root])
    return root


def field(package: Path, name: str) -> str:
    return ok([need_tool("dpkg-deb"), "--field", package, name]).strip()


@dataclass(frozen=True)
class Entry:
    mode: str
    owner: str
    size: int
    target: str | None


def contents(package: Path) -> dict[str, Entry]:
    """`dpkg-deb --contents`, by path (no leading ./, directories ending in /)."""
    line_pattern = re.compile(r"(\S+) (\S+)\s+(\d+) \S+ \S+ \./(.*?)(?: -> (.*))?")
    entries = {}
    for line in ok([need_tool("dpkg-deb"), "--contents", package]).splitlines():
        match = line_pattern.fullmatch(line)
        assert match, line
        mode, owner, size, path, target = match.groups()
        entries[path] = Entry(mode, owner, int(size), target)
    return entries


def test_control_fields(package: Path, extracted: Path) -> None:
    assert field(package, "Package") == "kubespan"
    assert field(package, "Architecture") == "amd64"
    assert field(package, "Version") == VERSION
    depends = [d.strip() for d in field(package, "Depends").split(",")]
    for needed in ("python3 (>= 3.11)", "python3 (<< 3.12)", "nftables", "systemd"):
        assert needed in depends
    assert re.fullmatch(r"[^<>]+ <[^@<>\s]+@[^@<>\s]+>", field(package, "Maintainer"))
    assert field(package, "Description").startswith("encrypted node mesh")
    files = [p for p in extracted.rglob("*") if "DEBIAN" not in p.parts and p.is_file()]
    kib = sum(p.stat().st_size for p in files) / 1024
    assert kib <= int(field(package, "Installed-Size")) <= kib * 1.1


def test_files_are_the_extensions_tree_plus_etc(package: Path, extracted: Path) -> None:
    entries = contents(package)
    assert {e.owner for e in entries.values()} == {"root/root"}
    expected = {
        "usr/bin/kubespan": "-rwxr-xr-x",
        "usr/lib/systemd/system/kubespan.service": "-rw-r--r--",
        "usr/lib/systemd/system/kubespan-discovery.service": "-rw-r--r--",
        "usr/lib/systemd/system/kubespan.service.d/10-package.conf": "-rw-r--r--",
        "usr/lib/tmpfiles.d/kubespan.conf": "-rw-r--r--",
        "usr/lib/sysctl.d/60-kubespan.conf": "-rw-r--r--",
        f"{SITE}/kubespan/__init__.py": "-rw-r--r--",
        f"{SITE}/kubespan/__pycache__/__init__.cpython-311.pyc": "-rw-r--r--",
        f"{SITE}/kubespan/BUILD": "-rw-r--r--",
        f"{SITE}/nacl/": "drwxr-xr-x",
        f"{SITE}/uvloop/": "drwxr-xr-x",
        EXAMPLE: "-rw-r--r--",
        "etc/kubespan/": "drwx------",
        "usr/share/doc/kubespan/copyright": "-rw-r--r--",
        "usr/share/doc/kubespan/changelog.gz": "-rw-r--r--",
    }
    for path, mode in expected.items():
        assert path in entries, path
        assert entries[path].mode == mode, path
    # The extension's own parts stay out: a package enables its unit in postinst.
    assert not [p for p in entries if "extension-release" in p or ".wants/" in p]
    assert not [p for p, e in entries.items() if e.target is not None]
    assert CONFIG not in entries, "the live config is the operator's, never the package's"
    assert f"{SITE}/bin/" not in entries
    assert (extracted / SITE / "kubespan/BUILD").read_text() == f"{STAMP}\n"
    for source, installed in (
        ("extension/kubespan.service", "usr/lib/systemd/system/kubespan.service"),
        ("extension/kubespan.tmpfiles", "usr/lib/tmpfiles.d/kubespan.conf"),
        ("extension/kubespan.sysctl", "usr/lib/sysctl.d/60-kubespan.conf"),
        ("extension/kubespan.py", "usr/bin/kubespan"),
        (
            "deploy/discovery/kubespan-discovery.service",
            "usr/lib/systemd/system/kubespan-discovery.service",
        ),
        ("deb/machineconfig.yaml.example", EXAMPLE),
        ("deb/kubespan-package.conf", "usr/lib/systemd/system/kubespan.service.d/10-package.conf"),
    ):
        assert (extracted / installed).read_bytes() == (REPO / source).read_bytes(), installed


def test_every_module_is_precompiled_and_never_checked(extracted: Path) -> None:
    sources = sorted((extracted / SITE).rglob("*.py"))
    assert len(sources) > 100
    for source in sources:
        compiled = source.parent / "__pycache__" / f"{source.stem}.cpython-311.pyc"
        header = compiled.read_bytes()[:8]
        assert header[:4] == importlib.util.MAGIC_NUMBER, compiled
        # PEP 552 flags: hash-based (bit 0), source not checked (bit 1 clear).
        assert int.from_bytes(header[4:], "little") == 0b01, compiled


def test_conffiles_and_md5sums(extracted: Path) -> None:
    assert (extracted / "DEBIAN/conffiles").read_text() == f"/{EXAMPLE}\n"
    sums = {}
    for line in (extracted / "DEBIAN/md5sums").read_text().splitlines():
        digest, path = line.split("  ", 1)
        sums[path] = digest
    files = {str(p.relative_to(extracted)) for p in (extracted / "usr").rglob("*") if p.is_file()}
    assert set(sums) == files
    for path in ("usr/bin/kubespan", f"{SITE}/kubespan/__init__.py"):
        assert hashlib.md5((extracted / path).read_bytes()).hexdigest() == sums[path]  # noqa: S324


def test_maintainer_scripts_are_executable_shell(package: Path) -> None:
    control = subprocess.run(
        [need_tool("dpkg-deb"), "--ctrl-tarfile", str(package)], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(control)) as archive:
        members = {m.name.removeprefix("./"): m for m in archive.getmembers()}
        for name in SCRIPTS:
            member = members[name]
            assert member.mode == 0o755 and member.uname == "root", name
            file = archive.extractfile(member)
            assert file is not None
            text = file.read().decode()
            assert text.startswith("#!/bin/sh\n"), name
            checked = run(["sh", "-n"], stdin=text)
            assert checked.returncode == 0, f"{name}: {checked.stderr}"
        assert members["control"].mode == 0o644


def test_scripts_pass_shellcheck(extracted: Path) -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (.ci/apt-packages.txt lists it)")
    scripts = [extracted / "DEBIAN" / name for name in SCRIPTS]
    built = [REPO / "deb/build.sh", REPO / "extension/stage.sh", REPO / "extension/build.sh"]
    result = run([shellcheck, *scripts, *built])
    assert result.returncode == 0, result.stdout


def test_lintian_finds_nothing_unexpected(package: Path) -> None:
    lintian = shutil.which("lintian")
    if lintian is None:
        pytest.skip("lintian not installed (optional; apt-get install lintian)")
    report = run([lintian, "--no-tag-display-limit", package]).stdout
    errors = re.findall(r"^E: kubespan: (\S+)", report, re.MULTILINE)
    assert set(errors) <= LINTIAN_ERRORS_BY_DESIGN, report


def packaged_kubespan(extracted: Path, into: Path) -> Path:
    """The packaged launcher, pointed at the extracted site-packages instead of /usr's."""
    if not HOST_PYTHON.exists():
        pytest.fail(f"{HOST_PYTHON} not found: the package's interpreter", pytrace=False)
    launcher = (extracted / "usr/bin/kubespan").read_text()
    assert launcher.startswith(f"#!{HOST_PYTHON} -I\n")
    assert f'"/{SITE}"' in launcher
    into.parent.mkdir(parents=True, exist_ok=True)
    into.write_text(launcher.replace(f'"/{SITE}"', repr(str(extracted / SITE))))
    into.chmod(0o755)
    return into


def tree(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def test_the_bundled_code_runs_on_this_hosts_python(extracted: Path, tmp_path: Path) -> None:
    version = ok([HOST_PYTHON, "-c", "import sys; print(sys.version_info[:2])"])
    assert version.strip() == "(3, 11)", f"{HOST_PYTHON} is not CPython 3.11 (Debian 12's)"
    kubespan = packaged_kubespan(extracted, tmp_path / "kubespan")
    before = tree(extracted)
    assert ok([kubespan, "--version"]) == f"kubespan {upstream_version()} (build {STAMP})\n"
    # The compiled dependencies, the discovery server's included, load here.
    imports = "import nacl.bindings, uvloop, httptools, yaml, rpds, jsonschema"
    ok(
        [
            HOST_PYTHON,
            "-I",
            "-c",
            f"import sys; sys.path.insert(0, {str(extracted / SITE)!r}); {imports}",
        ]
    )
    assert tree(extracted) == before, "nothing compiled at run time: every module's .pyc is used"


def test_the_example_config_is_refused_until_filled_in(extracted: Path, tmp_path: Path) -> None:
    kubespan = packaged_kubespan(extracted, tmp_path / "kubespan")
    example = extracted / EXAMPLE
    refused = run([kubespan, "config", "validate", example])
    assert refused.returncode == 1
    assert "cluster.id" in refused.stdout + refused.stderr
    assert "cluster.secret" in refused.stdout + refused.stderr
    identity = dict(line.split(": ", 1) for line in ok([kubespan, "gen", "cluster"]).splitlines())
    text = example.read_text()
    text = text.replace("REPLACE-with-the-id-from-kubespan-gen-cluster", identity["id"])
    text = text.replace("REPLACE-with-the-secret-from-kubespan-gen-cluster", identity["secret"])
    filled = tmp_path / "filled.yaml"
    filled.write_text(text)
    ok([kubespan, "config", "validate", filled])
    # Every option shown commented out is a real one with a valid value.
    options = re.sub(r"(?m)^(\s*)# (\s*[A-Za-z]+:.*)$", r"\1\2", text)
    assert options.count("\n") == text.count("\n") and options != text
    everything = tmp_path / "everything.yaml"
    everything.write_text(options)
    ok([kubespan, "config", "validate", everything])


# Maintainer scripts against a stand-in root, system commands stubbed.

STUB = """#!/bin/sh
call="$(basename "$0") $*"
printf '%s\\n' "$call" >>"$STUB_LOG"
while IFS='|' read -r prefix status; do
    case "$call" in "$prefix"*) exit "$status" ;; esac
done <"$STUB_RULES"
exit 0
"""


@dataclass
class Sandbox:
    """A root for the maintainer scripts ($DPKG_ROOT): `systemd` says whether it runs
    systemd; commands answer per `rules` (call prefix -> exit status, 0 otherwise)."""

    root: Path
    scripts: Path
    bin: Path
    log: Path
    rules: dict[str, int]

    @property
    def systemd(self) -> bool:
        return (self.root / "run/systemd/system").is_dir()

    @systemd.setter
    def systemd(self, running: bool) -> None:
        if running:
            (self.root / "run/systemd/system").mkdir(parents=True, exist_ok=True)
        else:
            shutil.rmtree(self.root / "run/systemd", ignore_errors=True)

    def write(self, path: str, text: str = "") -> Path:
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        return target

    def env(self) -> dict[str, str]:
        rules = self.log.with_suffix(".rules")
        rules.write_text("".join(f"{p}|{s}\n" for p, s in self.rules.items()))
        return {
            **os.environ,
            "DPKG_ROOT": str(self.root),
            "PATH": f"{self.bin}:{os.environ['PATH']}",
            "STUB_LOG": str(self.log),
            "STUB_RULES": str(rules),
        }

    def run(self, script: str, *args: str) -> subprocess.CompletedProcess[str]:
        self.log.write_text("")
        return run(["sh", self.scripts / script, *args], env=self.env())

    def calls(self) -> list[str]:
        return self.log.read_text().replace(str(self.root), "ROOT").splitlines()


def stub(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(STUB)
    path.chmod(0o755)


@pytest.fixture
def sandbox(extracted: Path, tmp_path: Path) -> Sandbox:
    box = Sandbox(tmp_path / "root", extracted / "DEBIAN", tmp_path / "bin", tmp_path / "log", {})
    for command in ("systemctl", "deb-systemd-helper", "systemd-tmpfiles"):
        stub(box.bin / command)
    stub(box.root / "usr/bin/kubespan")
    stub(box.root / "lib/systemd/systemd-sysctl")
    box.systemd = True
    return box


FIRST_STEPS = [
    "systemd-tmpfiles --create --root=ROOT kubespan.conf",
    "deb-systemd-helper --quiet was-enabled kubespan.service",
    "deb-systemd-helper enable kubespan.service",
]
RUNTIME_STEPS = [
    "systemctl daemon-reload",
    "systemd-sysctl ROOT/usr/lib/sysctl.d/60-kubespan.conf",
    "systemctl try-restart kubespan-discovery.service",
]
ASK_TO_WRITE = (
    "kubespan: write /etc/kubespan/machineconfig.yaml, mode 0600 (example: "
    "/etc/kubespan/machineconfig.yaml.example), then run: systemctl start kubespan\n"
)


def test_postinst_without_a_config_enables_and_says_what_to_do(sandbox: Sandbox) -> None:
    result = sandbox.run("postinst", "configure", "")
    assert result.returncode == 0, result.stderr
    assert sandbox.calls() == [
        *FIRST_STEPS,
        *RUNTIME_STEPS,
        "systemctl try-restart kubespan.service",
    ]
    assert result.stdout == ASK_TO_WRITE


@pytest.mark.parametrize("previous", ["", "0.1.0+20240101T000000Z"])
def test_postinst_starts_an_enabled_agent_that_has_a_config(
    sandbox: Sandbox, previous: str
) -> None:
    """Installed, upgraded (it restarts on the new code) or installed again after a removal;
    from the operator's file (the only source of a packaged agent)."""
    sandbox.write(CONFIG, "machine: {}\n")
    result = sandbox.run("postinst", "configure", previous)
    assert result.returncode == 0, result.stderr
    assert sandbox.calls() == [
        *FIRST_STEPS,
        *RUNTIME_STEPS,
        "systemctl --quiet is-enabled kubespan.service",
        "systemctl restart kubespan.service",
    ]
    assert result.stdout == ""


def test_postinst_keeps_an_operators_disable(sandbox: Sandbox) -> None:
    sandbox.write(CONFIG)
    sandbox.rules = {
        "deb-systemd-helper --quiet was-enabled": 1,
        "systemctl --quiet is-enabled": 1,
    }
    result = sandbox.run("postinst", "configure", "0.1.0+20240101T000000Z")
    assert result.returncode == 0, result.stderr
    assert sandbox.calls() == [
        FIRST_STEPS[0],
        FIRST_STEPS[1],
        "deb-systemd-helper update-state kubespan.service",
        *RUNTIME_STEPS,
        "systemctl --quiet is-enabled kubespan.service",
        "systemctl try-restart kubespan.service",
    ]


def test_postinst_in_a_chroot_starts_nothing(sandbox: Sandbox) -> None:
    sandbox.systemd = False
    sandbox.write(CONFIG)
    result = sandbox.run("postinst", "configure", "")
    assert result.returncode == 0, result.stderr
    assert sandbox.calls() == FIRST_STEPS


def test_postinst_succeeds_when_the_agent_does_not_start(sandbox: Sandbox) -> None:
    sandbox.write(CONFIG)
    sandbox.rules = {"systemctl restart": 1, "systemctl try-restart": 1, "systemd-tmpfiles": 1}
    result = sandbox.run("postinst", "configure", "")
    assert result.returncode == 0
    assert "kubespan did not start; see: journalctl -u kubespan" in result.stderr


@pytest.mark.parametrize("failing", [None, "kubespan agent --cleanup", "systemctl stop"])
def test_prerm_remove_stops_then_cleans_up(sandbox: Sandbox, failing: str | None) -> None:
    if failing:
        sandbox.rules = {failing: 1}
    result = sandbox.run("prerm", "remove")
    assert result.returncode == 0, "a removal never fails here"
    assert sandbox.calls() == [
        "systemctl stop kubespan.service kubespan-discovery.service",
        "kubespan agent --cleanup",
    ]
    assert ("cleanup failed" in result.stderr) == (failing == "kubespan agent --cleanup")


@pytest.mark.parametrize(
    ("args", "systemd"),
    [
        (("upgrade", "0.2.0"), True),
        (("failed-upgrade", "0.1.0"), True),
        (("deconfigure", "in-favour", "other", "1"), True),
        (("remove",), False),
    ],
)
def test_prerm_leaves_the_agent_running_on_upgrade_and_in_chroots(
    sandbox: Sandbox, args: tuple[str, ...], systemd: bool
) -> None:
    sandbox.systemd = systemd
    result = sandbox.run("prerm", *args)
    assert result.returncode == 0
    assert sandbox.calls() == []


def test_postrm_remove_keeps_the_state(sandbox: Sandbox) -> None:
    key = sandbox.write("var/lib/kubespan/identity.json", "{}")
    result = sandbox.run("postrm", "remove")
    assert result.returncode == 0
    assert sandbox.calls() == ["systemctl daemon-reload"]
    assert key.exists()


def test_postrm_purge_deletes_what_the_package_made_and_nothing_else(sandbox: Sandbox) -> None:
    sandbox.write("var/lib/kubespan/identity.json", "{}")
    sandbox.write("var/lib/kubespan/peers.json", "{}")
    sandbox.write("var/lib/private/kubespan-discovery/discovery-state.json", "{}")
    (sandbox.root / "var/lib/kubespan-discovery").symlink_to("private/kubespan-discovery")
    sandbox.write("run/kubespan/status.json", "{}")
    operators = [
        sandbox.write(CONFIG, "secret"),
        sandbox.write("etc/kubespan/discovery.env", ""),
        sandbox.write("etc/systemd/system/other.service"),
        sandbox.write("var/lib/other/state"),
    ]
    wants = sandbox.root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    # Enablement links into the removed package dangle (relative here: inside the sandbox).
    up = "../../../../usr/lib/systemd/system"
    (wants / "kubespan-discovery.service").symlink_to(f"{up}/kubespan-discovery.service")
    (wants / "kubespan.service").symlink_to(f"{up}/kubespan.service")
    (wants / "other.service").symlink_to("../other.service")
    result = sandbox.run("postrm", "purge")
    assert result.returncode == 0, result.stderr
    assert sandbox.calls() == [
        "deb-systemd-helper purge kubespan.service",
        "systemctl daemon-reload",
    ]
    for gone in (
        "var/lib/kubespan",
        "var/lib/kubespan-discovery",
        "var/lib/private/kubespan-discovery",
        "run/kubespan",
    ):
        assert not os.path.lexists(sandbox.root / gone), gone
    assert sorted(p.name for p in wants.iterdir()) == ["other.service"]
    assert all(p.exists() for p in operators)
    assert "kept /etc/kubespan/machineconfig.yaml" in result.stdout


# dpkg itself, in a root of its own (chrootless: the scripts run here, under $DPKG_ROOT).


def dpkg(root: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    argv: list[str | Path] = [
        need_tool("dpkg"),
        f"--root={root}",
        "--force-script-chrootless",
        "--force-depends",
        "--force-confold",
        "--log=/dev/null",
        *args,
    ]
    result = run(argv)
    assert result.returncode == 0, f"dpkg {args}: {result.stdout}{result.stderr}"
    return result


def repacked(package: Path, version: str, into: Path) -> Path:
    """The same package under another version (uncompressed: quick)."""
    tree = into / "tree"
    ok([need_tool("dpkg-deb"), "--raw-extract", package, tree])
    control = tree / "DEBIAN/control"
    control.write_text(re.sub(r"(?m)^Version: .*$", f"Version: {version}", control.read_text()))
    out = into / f"kubespan_{version}_amd64.deb"
    ok([need_tool("dpkg-deb"), "-Znone", "--root-owner-group", "--build", tree, out])
    return out


def test_dpkg_installs_upgrades_and_purges_it(package: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("dpkg --root needs root (it sets owners)")
    root = tmp_path / "root"
    for directory in ("var/lib/dpkg/info", "var/lib/dpkg/updates"):
        (root / directory).mkdir(parents=True)
    (root / "var/lib/dpkg/status").touch()
    installed = dpkg(root, "--install", package)
    assert ASK_TO_WRITE in installed.stdout
    assert (root / "usr/bin/kubespan").is_file()
    state = root / "var/lib/kubespan"
    assert state.is_dir() and (state.stat().st_mode & 0o777) == 0o700
    link = root / "etc/systemd/system/multi-user.target.wants/kubespan.service"
    assert str(link.readlink()) == "/usr/lib/systemd/system/kubespan.service"

    # An operator's config, an edited example and the agent's state outlive an upgrade, and
    # so does an operator's disable (systemctl disable removes the link).
    (root / CONFIG).write_text("machine: {}\n")
    (root / EXAMPLE).write_text("# mine\n")
    (state / "identity.json").write_text("{}")
    link.unlink()
    newer = repacked(package, f"{VERSION}.1", tmp_path)
    assert "machineconfig.yaml" not in dpkg(root, "--install", newer).stdout
    assert (root / EXAMPLE).read_text() == "# mine\n"
    assert (state / "identity.json").exists()
    assert not os.path.lexists(link)

    dpkg(root, "--purge", "kubespan")
    left = {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if not p.is_dir() and "var/lib/dpkg" not in str(p.relative_to(root))
    }
    assert left == {CONFIG}, "only the operator's file stays"


# Removal on the real kernel, in a network namespace.


@pytest.mark.netns
def test_removal_takes_out_kubespans_kernel_objects(sandbox: Sandbox, extracted: Path) -> None:
    """The packaged prerm runs the packaged `kubespan agent --cleanup` (this host has no
    WireGuard module, so no link here: the rest of what an agent makes)."""
    packaged_kubespan(extracted, sandbox.root / "usr/bin/kubespan")
    with namespaces("deb") as made:
        node = made["deb"]
        node.sh(
            "nft 'add table inet kubespan'; nft 'add chain inet kubespan output "
            "{ type route hook output priority 0; }'; nft 'add table inet foreign'; "
            "nft 'add table inet kubespan_relay'; "
            "ip rule add priority 32500 fwmark 0x40/0x60 lookup 180; "
            "ip -6 rule add priority 32500 fwmark 0x40/0x60 lookup 180; "
            "ip route add unreachable default metric 4294967295 table 180; "
            "ip -6 route add unreachable default metric 4294967295 table 180; "
            "ip rule add priority 31000 fwmark 0x4000/0x4000 lookup 200; "
            "ip link add foreign0 type veth peer name foreign1"
        )
        env = sandbox.env()
        sandbox.log.write_text("")
        result = run(
            ["ip", "netns", "exec", node.name, "sh", sandbox.scripts / "prerm", "remove"],
            env=env,
        )
        assert result.returncode == 0, result.stderr
        assert sandbox.calls() == ["systemctl stop kubespan.service kubespan-discovery.service"]
        assert "removed nftables table inet kubespan" in result.stderr
        assert "removed nftables table inet kubespan_relay" in result.stderr
        assert node.sh("nft list tables").split() == ["table", "inet", "foreign"]
        assert "lookup 180" not in node.ip("rule", "show")
        assert "lookup 180" not in node.ip("-6", "rule", "show")
        assert node.ip("route", "show", "table", "180") == ""
        assert node.ip("-6", "route", "show", "table", "180") == ""
        assert "lookup 200" in node.ip("rule", "show")
        assert "foreign0" in node.ip("link", "show")


def test_the_packaged_agent_runs_from_the_hosts_file_alone(extracted: Path) -> None:
    """Not the image's sources: on a host, cloud user data is cloud-init's (a #cloud-config
    would be taken for a machine config with kubespan off)."""
    dropin = (extracted / "usr/lib/systemd/system/kubespan.service.d/10-package.conf").read_text()
    starts = [line for line in dropin.splitlines() if line.startswith("ExecStart=")]
    assert starts[0] == "ExecStart=", "the unit's own ExecStart is reset first"
    assert starts[1].split() == [
        "ExecStart=/usr/bin/kubespan",
        "agent",
        "--state-dir",
        "/var/lib/kubespan",
        "--config",
        "/etc/kubespan/machineconfig.yaml",
    ]


def test_postinst_does_not_start_an_agent_from_a_last_good_copy_alone(sandbox: Sandbox) -> None:
    """The packaged agent reads only /etc/kubespan/machineconfig.yaml: without it, the
    operator is asked to write it."""
    sandbox.write("var/lib/kubespan/machineconfig.yaml", "machine: {}\n")
    result = sandbox.run("postinst", "configure", "")
    assert result.returncode == 0, result.stderr
    assert "systemctl restart kubespan.service" not in sandbox.calls()
    assert result.stdout == ASK_TO_WRITE
