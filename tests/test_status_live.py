"""`kubespan status` from the live agent: its socket (root's only), the stale file a dead
agent left (marked, exit 3), not ready (exit 1), and the JSON Schema every document meets."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from kubespan import cli
from kubespan.agent.status import STATUS_FILE, status_document
from kubespan.agent.statusserver import (
    STATUS_SOCKET,
    LatestStatus,
    NoLiveStatus,
    StatusServer,
    placeholder,
    read_live,
)
from kubespan.model import AffiliateInfo, PeerState
from kubespan.netaddr import Endpoint
from kubespan.plan.desired import PeerReport

SCHEMA_PATH = Path(cli.__file__).parent / "schema" / "status.schema.json"


def validate(document: Any) -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(document)


def sample(ready: bool = True) -> dict[str, Any]:
    import ipaddress

    info = AffiliateInfo("alpha", "node-a", "A" * 43 + "=", ipaddress.IPv6Address("fd00::1"), ())
    report = PeerReport(
        "B" * 43 + "=",
        "beta\x1b[2J",  # a hostile name: printed escaped
        "node-b",
        PeerState.UP,
        Endpoint.parse("192.0.2.12:51820"),
        1_800_000_000.0,
        92,
        148,
    )
    return status_document(
        info,
        (Endpoint.parse("192.0.2.11:51820"),),
        (report,),
        [{"url": "https://discovery.example", "revision": 3, "public_address": None,
          "last_error": None}],
        ready,
        1_800_000_000.0,
        state_since={report.public_key: 1_799_999_990.0},
        pid=4242,
    )  # fmt: skip


@pytest.fixture
def served(tmp_path: Path) -> Any:
    latest = LatestStatus()
    server = StatusServer(tmp_path, latest)
    server.start()
    try:
        yield latest, server
    finally:
        server.stop()


def run_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], *flags: str
) -> tuple[int, str, str]:
    status = cli.main(["status", "--runtime-dir", str(tmp_path), *flags])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_the_live_document_is_served_on_a_socket_only_root_can_use(
    tmp_path: Path, served: Any
) -> None:
    latest, server = served
    mode = (tmp_path / STATUS_SOCKET).stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert json.loads(read_live(tmp_path))["agent"] == "starting"  # before the first pass
    latest.set(json.dumps(sample()).encode())
    assert json.loads(read_live(tmp_path))["pid"] == 4242
    assert server.served == 2


def test_a_socket_left_by_a_killed_agent_is_replaced(tmp_path: Path) -> None:
    first = StatusServer(tmp_path, LatestStatus())
    first.start()
    first._stopping.set()  # killed: the kernel closes its socket, the file stays behind
    first._wakeup.poke()
    first._thread.join(5)
    assert not first._thread.is_alive()
    assert first._sock is not None
    first._sock.close()
    assert (tmp_path / STATUS_SOCKET).exists()
    with pytest.raises(NoLiveStatus, match="no agent answers"):
        read_live(tmp_path)
    second_latest = LatestStatus()
    second_latest.set(b'{"version": 1}')
    second = StatusServer(tmp_path, second_latest)
    second.start()
    try:
        assert json.loads(read_live(tmp_path)) == {"version": 1}
    finally:
        second.stop()
        first.stop()
    assert not (tmp_path / STATUS_SOCKET).exists()


def test_live_and_ready_exits_0_live_not_ready_exits_1(
    tmp_path: Path, served: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    latest, _ = served
    latest.set(json.dumps(sample(ready=True)).encode())
    status, out, _ = run_status(tmp_path, capsys)
    assert status == 0 and "STALE" not in out
    assert "beta\\x1b[2J" in out  # escaped, never sent to the terminal as is
    latest.set(json.dumps(sample(ready=False)).encode())
    status, out, _ = run_status(tmp_path, capsys, "--json")
    assert status == cli.STATUS_NOT_READY
    document = json.loads(out)
    assert document["live"] is True
    validate(document)


def test_a_dead_agents_file_is_shown_stale_and_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / STATUS_FILE).write_text(json.dumps(sample(ready=True)))
    status, out, err = run_status(tmp_path, capsys)
    assert status == cli.STATUS_NO_AGENT
    assert "no agent answers" in err and "STALE: no agent is running" in out
    status, out, _ = run_status(tmp_path, capsys, "--json")
    assert status == cli.STATUS_NO_AGENT
    document = json.loads(out)
    assert document["live"] is False and document["ready"] is True
    validate(document)


@pytest.mark.parametrize("content", [None, "{not json", "[]", '{"node": 3}'])
def test_no_agent_and_no_usable_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None
) -> None:
    if content is not None:
        (tmp_path / STATUS_FILE).write_text(content)
    status, out, err = run_status(tmp_path, capsys)
    assert status == cli.STATUS_NO_AGENT and out == ""
    assert "Traceback" not in err
    assert "the agent has not run" in err if content is None else "unreadable" in err


def test_the_schema_accepts_what_the_agent_writes_and_refuses_what_it_never_would() -> None:
    document = sample()
    validate(document)
    for broken in (
        {**document, "version": 2},
        {**document, "peers": [{**document["peers"][0], "state": "sideways"}]},
        {k: v for k, v in document.items() if k != "node"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            validate(broken)


def test_a_relayed_peer_and_a_relays_pairs_are_shown_and_fit_the_schema() -> None:
    import ipaddress
    from dataclasses import replace

    from kubespan.agent.status import render_status

    info = AffiliateInfo("relay1", "node-r", "R" * 43 + "=", ipaddress.IPv6Address("fd00::9"), ())
    base = sample()
    report = PeerReport(
        "C" * 43 + "=",
        "gamma",
        "node-c",
        PeerState.UP,
        Endpoint.parse("203.0.113.30:29101"),
        1_800_000_000.0,
        92,
        148,
        relay="relay2",
    )
    relay = {
        "ports": "29100-29355",
        "pairs": [
            {"first": "198.51.100.1:40000 -> 203.0.113.30:29100",
             "second": "192.0.2.2:51820 -> 203.0.113.30:29101", "bytes": 3 << 20},
        ],
    }  # fmt: skip
    document = status_document(
        replace(info), (), (report,), base["discovery"], True, 1_800_000_000.0, relay=relay
    )
    validate(document)
    text = render_status(document, now=1_800_000_001.0)
    assert "up via relay2" in text
    assert "relays for members on ports 29100-29355: 1 pairs" in text
    assert "3.0 MiB" in text
    assert document["peers"][0]["relay"] == "relay2" and sample()["peers"][0]["relay"] is None


@pytest.mark.parametrize(("agent", "words"), [("starting", "starting"), ("disabled", "disabled")])
def test_a_live_agent_without_a_report_says_why(
    tmp_path: Path, served: Any, capsys: pytest.CaptureFixture[str], agent: str, words: str
) -> None:
    latest, _ = served
    latest.set(placeholder(agent))
    status, out, _ = run_status(tmp_path, capsys)
    assert status == cli.STATUS_NOT_READY and words in out
    status, out, _ = run_status(tmp_path, capsys, "--json")
    document = json.loads(out)
    assert document["agent"] == agent and document["live"] is True
    validate(document)


def test_status_summarises_the_check_on_what_it_read(
    tmp_path: Path,
    served: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check runs on the report status read (not a second one), its summary and codes
    are shown, and it does not change the exit status (ready is ready)."""
    from dataclasses import replace

    from kubespan import preflight
    from kubespan.diagnose import observe as observe_module
    from kubespan.diagnose.statusread import AgentReport
    from test_diagnose import HEALTHY_FACTS

    seen: list[AgentReport | None] = []

    def observed(runtime_dir: Path, report: AgentReport | None = None, **_: Any) -> Any:
        seen.append(report)
        return replace(HEALTHY_FACTS, rp_filter=(("all", 0), ("kubespan", 1)))

    monkeypatch.setattr(observe_module, "observe", observed)
    monkeypatch.setattr(preflight, "has_capability", lambda _caps, _cap: True)
    latest, _ = served
    latest.set(json.dumps(sample(ready=True)).encode())
    status, out, _ = run_status(tmp_path, capsys)
    assert status == 0
    assert "check: 1 error found (rp-filter-strict); details: kubespan check" in out
    assert seen and seen[-1] is not None and seen[-1].state == "running"

    status, out, _ = run_status(tmp_path, capsys, "--json")
    document = json.loads(out)
    validate(document)
    assert document["check"] == {
        "summary": "1 error found",
        "findings": [{"code": "rp-filter-strict", "severity": "error"}],
    }

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("nftables went away")

    monkeypatch.setattr(observe_module, "observe", broken)
    status, out, _ = run_status(tmp_path, capsys)
    assert status == 0 and "check: not run: RuntimeError: nftables went away" in out

    status, out, _ = run_status(tmp_path, capsys, "--json", "--no-check")
    assert status == 0 and "check" not in json.loads(out)

    monkeypatch.setattr(preflight, "has_capability", lambda _caps, _cap: False)
    status, out, _ = run_status(tmp_path, capsys, "--json")
    document = json.loads(out)
    validate(document)
    assert document["check"]["summary"] == "not run: it needs root (CAP_NET_ADMIN)"


def test_a_stale_status_is_shown_without_a_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / STATUS_FILE).write_text(json.dumps(sample()))
    status, out, _ = run_status(tmp_path, capsys, "--json")
    assert status == cli.STATUS_NO_AGENT
    assert "check" not in json.loads(out)
