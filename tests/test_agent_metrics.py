"""Node metrics: off unless `metricsListen` is set; when on, what the status shows, in the
Prometheus text format, with peers' names escaped; a port in use costs only the metrics."""

from __future__ import annotations

import base64
import os
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from kubespan.agent.metrics import LoopCounters, label, render
from kubespan.config import parse_config
from kubespan.errors import ConfigError

from agents import config_text, make_agent, running, wait_for
from servers import discovery_server

SAMPLE_LINE = re.compile(
    r'^kubespan_[a-z_]+(\{([a-z_]+="([^"\\\n]|\\.)*",?)+\})? -?[0-9.]+(e[+-]?[0-9]+)?$'
)


def well_formed(text: str) -> None:
    assert text.endswith("\n")
    for line in text.splitlines():
        assert line.startswith(("# HELP kubespan_", "# TYPE kubespan_")) or SAMPLE_LINE.match(
            line
        ), line


def peer(name: str, state: str, handshake: float | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "public_key": "K" * 43 + "=",
        "state": state,
        "last_handshake": handshake,
        "rx_bytes": 92,
        "tx_bytes": 148,
    }


def test_rendered_from_the_status_with_hostile_names_escaped() -> None:
    document = {
        "ready": True,
        "peers": [
            peer('evil"} kubespan_ready 0\n# x', "up", 1_000.0),
            peer("b\\c", "down"),
            peer("c", "unknown"),
        ],
        "discovery": [{"url": "https://d.example", "last_error": None},
                      {"url": "https://e.example", "last_error": "timed out"}],
    }  # fmt: skip
    counters = LoopCounters(passes=7, pass_errors=1, last_pass_seconds=0.0123, endpoint_changes=3)
    text = render(document, counters, wall_now=1_010.0)
    well_formed(text)
    assert "kubespan_ready 1" in text.splitlines()
    assert 'kubespan_peers{state="up"} 1' in text and 'kubespan_peers{state="down"} 1' in text
    assert 'name="evil\\"} kubespan_ready 0\\n# x"' in text  # one label value, not a line
    assert 'name="b\\\\c"' in text
    assert "kubespan_peer_handshake_age_seconds{" in text and "} 10.0" in text
    assert 'kubespan_discovery_up{url="https://e.example"} 0' in text
    assert "kubespan_reconcile_passes_total 7" in text
    assert "kubespan_reconcile_errors_total 1" in text
    assert "kubespan_endpoint_changes_total 3" in text
    assert len(label("x" * 1000)) <= 128


def test_relayed_peers_and_the_pairs_a_relay_carries_are_counted() -> None:
    relayed = {**peer("a", "up", 1_000.0), "relay": "relay1"}
    document = {
        "peers": [relayed, peer("b", "up", 1_000.0)],
        "node": {
            "relay": {
                "ports": "29100-29355",
                "pairs": [
                    {"first": "192.0.2.1:1 -> x", "second": "192.0.2.2:2 -> y", "bytes": 640}
                ],
            }
        },
    }
    text = render(document, LoopCounters(), wall_now=1_010.0)
    well_formed(text)
    assert "kubespan_peers_relayed 1" in text.splitlines()
    assert "kubespan_relay_pairs 1" in text.splitlines()
    assert (
        'kubespan_relay_pair_bytes{first="192.0.2.1:1 -> x",second="192.0.2.2:2 -> y"} 640'
        in text.splitlines()
    )
    assert "kubespan_relay_pairs" not in render({"peers": []}, LoopCounters(), 0.0)


def test_an_empty_status_renders_too() -> None:
    text = render({}, LoopCounters(), 0.0)
    well_formed(text)
    assert "kubespan_ready 0" in text.splitlines()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def with_metrics(config: bytes, listen: str) -> bytes:
    return config.replace(
        b"      enabled: true\n", f'      enabled: true\n      metricsListen: "{listen}"\n'.encode()
    )


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        body: bytes = response.read()
        return body.decode()


def test_served_when_configured_and_only_then(tmp_path: Path) -> None:
    cluster_id = base64.b64encode(os.urandom(32)).decode()
    secret = base64.b64encode(os.urandom(32)).decode()
    port = free_port()
    with discovery_server() as server:
        plain = config_text(server.url, cluster_id, secret)
        alpha, _ = make_agent(tmp_path, "alpha", 31, with_metrics(plain, f"127.0.0.1:{port}"))
        beta, _ = make_agent(tmp_path, "beta", 32, plain)
        with running(alpha), running(beta):
            wait_for(lambda: alpha.ready and beta.ready, "both agents ready")
            url = f"http://127.0.0.1:{port}/metrics"
            wait_for(lambda: 'name="beta"' in scrape(url), "the metrics to show the peer")
            text = scrape(url)
            well_formed(text)
            assert "kubespan_ready 1" in text.splitlines()
            assert int(re.findall(r"kubespan_reconcile_passes_total (\d+)", text)[0]) >= 1
            with pytest.raises(urllib.error.HTTPError):
                scrape(f"http://127.0.0.1:{port}/other")
            assert beta.metrics is None  # off by default: no listener at all
        with pytest.raises(urllib.error.URLError):
            scrape(url)  # stopped with the agent


def test_a_port_in_use_costs_only_the_metrics(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cluster_id = base64.b64encode(os.urandom(32)).decode()
    secret = base64.b64encode(os.urandom(32)).decode()
    with socket.socket() as taken, discovery_server() as server:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        agent, _ = make_agent(
            tmp_path, "busy", 33, with_metrics(config_text(server.url, cluster_id, secret), listen)
        )
        with running(agent):
            wait_for(lambda: agent.ready, "the agent ready without its metrics")
            assert agent.metrics is None
    assert "metrics not served on" in caplog.text


@pytest.mark.parametrize("value", ["localhost:9551", "127.0.0.1", "[::1]:0", "1.2.3.4:99999"])
def test_a_bad_listen_address_is_a_config_error_naming_the_field(value: str) -> None:
    text = with_metrics(config_text("https://d.example", "c" * 44, "A" * 43 + "="), value)
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "node.yaml")
    assert any("metricsListen" in str(p) for p in raised.value.problems), raised.value.problems
