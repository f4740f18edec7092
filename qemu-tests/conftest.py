"""Fixtures of the VM tests: the built image, one lab (namespace + VMs) per test, and the
VMs' diagnostics attached to the report of a failing test."""

import os
import signal
from collections.abc import Generator, Iterator
from pathlib import Path
from types import FrameType

import pytest

from kslab import ArtefactMissingError, Image, Lab, find_image

REPO = Path(__file__).resolve().parent.parent


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # SIGTERM (CI timeout, `kill`) unwinds like Ctrl-C, so labs are torn down.
    signal.signal(signal.SIGTERM, _interrupt)


@pytest.fixture(scope="session")
def image() -> Image:
    """The image from `make image`; a missing build fails the test with what to do."""
    try:
        return find_image(REPO)
    except ArtefactMissingError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def kubespan_bin() -> Path:
    """The host's `kubespan` command (for host-side servers such as discovery)."""
    return REPO / ".venv" / "bin" / "kubespan"


@pytest.fixture
def lab(image: Image, tmp_path: Path) -> Iterator[Lab]:
    """A fresh lab: its own network namespace, torn down after the test whatever happens."""
    if os.geteuid() != 0:
        pytest.fail("VM tests need root (network namespaces, taps)", pytrace=False)
    with Lab(tmp_path / "lab", image) as lab:
        yield lab


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and isinstance(item, pytest.Function):
        # The lab of the test, or of a shared (module-scoped) scenario object holding one.
        for value in item.funcargs.values():
            lab = value if isinstance(value, Lab) else getattr(value, "lab", None)
            if isinstance(lab, Lab):
                report.sections.append((f"kslab diagnostics ({call.when})", lab.diagnostics()))
                break
    return report
