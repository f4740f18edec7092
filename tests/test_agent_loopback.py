"""Two agents and the real discovery service on loopback; kernels are in-memory fakes.

This checks the whole control plane (config, identity, sealing, registration, watch, planning,
status) end to end; the VM suite checks the same against real kernels.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from kubespan.agent.loop import Agent
from kubespan.agent.status import STATUS_FILE, render_status
from kubespan.errors import ApplyError
from kubespan.plan.diff import Operation
from test_status_live import validate

from agents import config_text, make_agent, running, wait_for
from fakekernel import FakeKernel
from servers import discovery_server


def test_two_agents_mesh_through_the_real_service(tmp_path: Path) -> None:
    cluster_id = base64.b64encode(os.urandom(32)).decode()
    secret = base64.b64encode(os.urandom(32)).decode()
    with discovery_server() as server:
        config = config_text(server.url, cluster_id, secret)
        alpha, alpha_kernel = make_agent(tmp_path, "alpha", 11, config)
        beta, beta_kernel = make_agent(tmp_path, "beta", 12, config)
        with running(alpha), running(beta):

            def has_peer(kernel: FakeKernel, other: Agent) -> bool:
                link = kernel.link
                return link is not None and any(
                    p.public_key == other.identity.public_key_b64 for p in link.peers
                )

            wait_for(lambda: has_peer(alpha_kernel, beta), "alpha to configure beta")
            wait_for(lambda: has_peer(beta_kernel, alpha), "beta to configure alpha")
            wait_for(lambda: alpha.ready and beta.ready, "both agents to be ready")

        assert alpha_kernel.link is not None
        (peer,) = alpha_kernel.link.peers
        assert {str(n) for n in peer.allowed_ips} == {"192.0.2.12/32", f"{beta.ula}/128"}
        assert str(peer.endpoint) == "192.0.2.12:51820"
        assert peer.keepalive == 25
        assert peer.preshared_key == alpha.keys.wireguard_psk_b64
        assert alpha_kernel.link.private_key == alpha.identity.private_key_b64
        assert alpha.ula != beta.ula
        assert alpha.ula in alpha.prefix and beta.ula in alpha.prefix

        applied = len(alpha_kernel.applied)
        assert alpha.reconcile() == []
        assert len(alpha_kernel.applied) == applied

        document = json.loads((tmp_path / "alpha" / "run" / STATUS_FILE).read_text())
        validate(document)  # what `kubespan status --json` promises
        assert document["node"]["name"] == "alpha"
        assert [p["name"] for p in document["peers"]] == ["beta"]
        assert document["peers"][0]["state_since"] is not None
        text = render_status(document)
        assert "beta" in text and "192.0.2.12:51820" in text


def test_agent_becomes_ready_when_discovery_is_unreachable(tmp_path: Path) -> None:
    cluster_id = base64.b64encode(os.urandom(32)).decode()
    secret = base64.b64encode(os.urandom(32)).decode()
    with discovery_server() as server:
        url = server.url
    config = config_text(url, cluster_id, secret)
    agent, kernel = make_agent(tmp_path, "lonely", 13, config)
    agent.ready_timeout = 0.5
    with running(agent):
        wait_for(lambda: agent.ready, "the agent to give up waiting for discovery")
        assert kernel.link is not None
        assert kernel.link.peers == ()
        document = json.loads((tmp_path / "lonely" / "run" / STATUS_FILE).read_text())
        wait_for(
            lambda: (
                json.loads((tmp_path / "lonely" / "run" / STATUS_FILE).read_text())["discovery"][0][
                    "last_error"
                ]
                is not None
            ),
            "the discovery error to show in status",
        )
        assert document["node"]["name"] == "lonely"


def test_failed_apply_is_retried_with_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cluster_id = base64.b64encode(os.urandom(32)).decode()
    secret = base64.b64encode(os.urandom(32)).decode()
    with discovery_server() as server:
        agent, kernel = make_agent(
            tmp_path, "flaky", 14, config_text(server.url, cluster_id, secret)
        )
        failures = [2]
        real_apply = kernel.apply

        def flaky_apply(operations: list[Operation]) -> None:
            if failures[0] > 0:
                failures[0] -= 1
                raise ApplyError(f"{operations[0].render()}: kernel said no")
            real_apply(operations)

        kernel.apply = flaky_apply  # type: ignore[method-assign]
        with running(agent):
            wait_for(lambda: kernel.link is not None, "the link after two refusals", 30)
            wait_for(lambda: agent.ready, "the agent to be ready")
    assert failures == [0]
    assert caplog.text.count("apply failed, keeping the previous state") == 2


def test_members_are_merged_across_discovery_services(tmp_path: Path) -> None:
    cluster_id = base64.b64encode(os.urandom(32)).decode()
    secret = base64.b64encode(os.urandom(32)).decode()
    with discovery_server() as first, discovery_server() as second:
        both = config_text(first.url, cluster_id, secret).replace(
            f"endpoint: {first.url}".encode(),
            f"endpoints: [{first.url}, {second.url}]".encode(),
        )
        alpha, _ = make_agent(tmp_path, "alpha", 11, both)
        beta, beta_kernel = make_agent(
            tmp_path, "beta", 12, config_text(first.url, cluster_id, secret)
        )
        gamma, gamma_kernel = make_agent(
            tmp_path, "gamma", 13, config_text(second.url, cluster_id, secret)
        )
        with running(alpha), running(beta), running(gamma):
            key = alpha.identity.public_key_b64

            def sees_alpha(kernel: FakeKernel) -> bool:
                return kernel.link is not None and any(
                    p.public_key == key for p in kernel.link.peers
                )

            wait_for(lambda: sees_alpha(beta_kernel), "beta (first service only) to see alpha")
            wait_for(lambda: sees_alpha(gamma_kernel), "gamma (second service only) to see alpha")
            wait_for(lambda: len(alpha.tracking) == 2, "alpha to see both through either service")


def test_a_pass_that_fails_shows_its_error_in_the_status(tmp_path: Path) -> None:
    """Not "is the agent running?": the agent runs, and says why it cannot apply."""
    cluster_id = base64.b64encode(os.urandom(32)).decode()
    secret = base64.b64encode(os.urandom(32)).decode()
    with discovery_server() as server:
        agent, kernel = make_agent(
            tmp_path, "stuck", 15, config_text(server.url, cluster_id, secret)
        )
        refusing = [True]
        real_apply = kernel.apply

        def refusing_apply(operations: list[Operation]) -> None:
            if refusing[0]:
                raise ApplyError(f"{operations[0].render()}: kernel said no")
            real_apply(operations)

        kernel.apply = refusing_apply  # type: ignore[method-assign]
        status_file = tmp_path / "stuck" / "run" / STATUS_FILE

        def status() -> dict[str, object]:
            document: dict[str, object] = json.loads(status_file.read_text())
            return document

        with running(agent):
            wait_for(status_file.exists, "a status while every pass fails", 30)
            document = status()
            validate(document)
            assert document["ready"] is False
            assert "kernel said no" in str(document["last_error"])
            refusing[0] = False
            wait_for(lambda: status()["last_error"] is None, "the error to clear", 30)
