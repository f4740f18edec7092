"""High availability by independent services: every node uses several discovery services at
once; one of them dies, a new node still joins through the other and the mesh stays whole.
The services share nothing (no replication): each node registers with each."""

from __future__ import annotations

import base64
import os
from functools import partial
from pathlib import Path

from kubespan.config.render import new_config_document, to_yaml

from agents import make_agent, running, wait_for
from fakekernel import FakeKernel
from servers import discovery_server


def peers(kernel: FakeKernel) -> set[str]:
    return {p.public_key for p in kernel.link.peers} if kernel.link is not None else set()


def test_a_node_joins_through_the_surviving_service(tmp_path: Path) -> None:
    cluster_id = base64.b64encode(os.urandom(32)).decode()
    secret = base64.b64encode(os.urandom(32)).decode()
    with discovery_server() as first, discovery_server() as second:
        document = new_config_document(first.url, cluster_id, secret)
        registries = document["cluster"]["discovery"]["registries"]
        registries["service"] = {"endpoints": [first.url, second.url]}
        both = to_yaml(document).encode()
        alpha, alpha_kernel = make_agent(tmp_path, "alpha", 11, both)
        beta, beta_kernel = make_agent(tmp_path, "beta", 12, both)
        gamma, gamma_kernel = make_agent(tmp_path, "gamma", 13, both)
        keys = {a.identity.public_key_b64 for a in (alpha, beta, gamma)}
        with running(alpha), running(beta):
            wait_for(
                lambda: (
                    peers(alpha_kernel) == {beta.identity.public_key_b64}
                    and peers(beta_kernel) == {alpha.identity.public_key_b64}
                ),
                "alpha and beta to mesh through both services",
            )
            first.stop()  # the first service dies with everything it knew
            with running(gamma):
                for agent, kernel in ((alpha, alpha_kernel), (beta, beta_kernel)):
                    others = keys - {agent.identity.public_key_b64}
                    wait_for(
                        partial(lambda k, want: peers(k) == want, kernel, others),
                        f"{agent.hostname()} to see the new node through the second service",
                    )
                wait_for(
                    lambda: peers(gamma_kernel) == keys - {gamma.identity.public_key_b64},
                    "the new node to join through the second service",
                )
                wait_for(
                    lambda: any(
                        s.last_error is not None for s in gamma.sessions if s.url == first.url
                    ),
                    "the new node to have tried the dead service too",
                )
