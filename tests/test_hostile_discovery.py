"""Agents against a discovery service that lies, breaks and attacks (tests/hostile.py), on
loopback with in-memory kernels. Whatever it serves, every agent keeps every peer and every
member-set entry, every thread stays alive, nothing ends in a traceback, and a node whose own
record is missing puts it back at once."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from kubespan.agent.loop import Agent
from kubespan.discovery.payload import encode_record, sign_record
from kubespan.model import MemberRecord

from agents import config_text, make_agent, running, wait_for
from fakekernel import FakeKernel, local_address
from hostile import Answer, Hostile, Stored, blob, hostile_service
from nodes import member_info, private_key, resign

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


def peers(kernel: FakeKernel) -> set[str]:
    return {p.public_key for p in kernel.link.peers} if kernel.link else set()


def member_set(kernel: FakeKernel) -> set[str]:
    spec = kernel.last_ruleset
    return {str(n) for n in (*spec.members_v4, *spec.members_v6)} if spec else set()


def threads_alive(agent: Agent) -> bool:
    return all(t.is_alive() for s in agent.sessions for t in s._threads)


@contextmanager
def cluster(
    tmp_path: Path, hostile: Hostile, count: int, cluster_id: str, secret: str
) -> Iterator[list[tuple[Agent, FakeKernel]]]:
    config = config_text(hostile.url, cluster_id, secret)
    nodes = [make_agent(tmp_path, f"n{i}", 11 + i, config) for i in range(count)]
    with ExitStack() as stack:
        for agent, _ in nodes:
            stack.enter_context(running(agent))
        for agent, kernel in nodes:
            others = {a.identity.public_key_b64 for a, _ in nodes if a is not agent}
            wait_for(lambda k=kernel, o=others: peers(k) == o, "the mesh")  # type: ignore[misc]
        yield nodes


def took_listing(nodes: list[tuple[Agent, FakeKernel]]) -> None:
    """Wait until every agent has taken in a listing after now, and reconciled after it."""
    marks = [(a, a.listings_taken) for a, _ in nodes]
    wait_for(lambda: all(a.listings_taken > n for a, n in marks), "agents to take the listing")
    ran_passes(nodes)


def ran_passes(nodes: list[tuple[Agent, FakeKernel]], count: int = 2) -> None:
    """Wait until every agent has run `count` more reconcile passes."""
    marks = [(a, a.passes) for a, _ in nodes]
    wait_for(lambda: all(a.passes >= n + count for a, n in marks), "reconcile passes")


def snapshot(nodes: list[tuple[Agent, FakeKernel]]) -> list[tuple[set[str], set[str]]]:
    return [(peers(k), member_set(k)) for _, k in nodes]


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info], [
        r.getMessage() for r in caplog.records if r.exc_info
    ]


def test_lying_listings_remove_nobody_and_missing_records_come_back(
    tmp_path: Path, cluster_id: str, cluster_secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        hostile_service() as hostile,
        cluster(tmp_path, hostile, 3, cluster_id, cluster_secret) as nodes,
    ):
        before = snapshot(nodes)
        assert all(len(p) == 2 and m for p, m in before)
        ids = [a.keys.affiliate_id(a.identity.node_id) for a, _ in nodes]
        first_id = ids[0]

        # The service restarted empty (or lies): nobody is removed, and everybody puts its
        # record back at once.
        puts = [hostile.put_count(i) for i in ids]
        with hostile.lock:
            hostile.current.clear()
        hostile.serve(None)
        took_listing(nodes)
        assert snapshot(nodes) == before
        wait_for(
            lambda: all(hostile.put_count(i) > n for i, n in zip(ids, puts, strict=True)),
            "every node to register again",
            timeout=10,
        )

        # A partial listing: only the first node.
        hostile.serve(lambda h: Answer(body=h.honest_body({first_id: h.current[first_id]})))
        took_listing(nodes)
        assert snapshot(nodes) == before

        # Rollback: node 2 moves to a new address, then the service serves its old record.
        _, kernel2 = nodes[2]
        hostile.serve(None)
        kernel2.addresses = (local_address("ens3", "192.0.2.99/24"),)
        wait_for(lambda: "192.0.2.99/32" in member_set(nodes[0][1]), "node 2's new address")
        moved = snapshot(nodes)
        old = hostile.history[ids[2]][0]
        hostile.serve(lambda h: Answer(body=h.honest_body({**h.current, ids[2]: old})))
        took_listing(nodes)
        assert snapshot(nodes) == moved
        assert "192.0.2.13/32" not in member_set(nodes[0][1])
        assert all(threads_alive(a) for a, _ in nodes)
    no_tracebacks(caplog)


HOSTILE_ANSWERS = {
    "nested": Answer(body=b"[" * 100_000),
    "not json": Answer(body=b"<html>maintenance</html>"),
    "huge": Answer(body=b'{"revision": 1, "affiliates": [' + b" " * (17 << 20) + b"]}"),
    "wrong types": Answer(body=b'{"revision": "1", "affiliates": {}}'),
    "huge retry-after": Answer(429, b"{}", {"retry-after": "99999999"}),
    "non-ascii retry-after": Answer(429, b"{}", {"retry-after": "\u00b2"}),
    "server error": Answer(500, b"oops"),
    "huge integers": Answer(body=b'{"revision": ' + b"9" * 5000 + b', "affiliates": []}'),
}


def test_hostile_answers_kill_no_thread_and_remove_nobody(
    tmp_path: Path, cluster_id: str, cluster_secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with (
        hostile_service() as hostile,
        hostile_service() as elsewhere,
        cluster(tmp_path, hostile, 2, cluster_id, cluster_secret) as nodes,
    ):
        before = snapshot(nodes)
        redirect = Answer(302, b"", {"location": f"{elsewhere.url}/v1/steal"})
        for name, answer in [*HOSTILE_ANSWERS.items(), ("redirect", redirect)]:
            served = hostile.listings

            def fixed(_hostile: Hostile, answer: Answer = answer) -> Answer:
                return answer

            hostile.serve(fixed)
            wait_for(lambda s=served: hostile.listings >= s + len(nodes), f"{name} served")  # type: ignore[misc]
            ran_passes(nodes)
            assert snapshot(nodes) == before, name
            assert all(threads_alive(a) for a, _ in nodes), name
        assert elsewhere.listings == 0 and elsewhere.puts == []  # no redirect was followed

        # Honest again: the watchers still work, a new member is learned by everyone.
        hostile.serve(None)
        config = config_text(hostile.url, cluster_id, cluster_secret)
        newcomer, _ = make_agent(tmp_path, "late", 20, config)
        with running(newcomer):
            key = newcomer.identity.public_key_b64
            for _, kernel in nodes:
                wait_for(lambda k=kernel: key in peers(k), "the newcomer", timeout=30)  # type: ignore[misc]
    no_tracebacks(caplog)


def test_stop_is_prompt_whatever_retry_after_says(
    tmp_path: Path, cluster_id: str, cluster_secret: str
) -> None:
    with hostile_service() as hostile:
        hostile.serve(lambda _h: Answer(429, b"{}", {"retry-after": "86400"}))
        agent, _ = make_agent(
            tmp_path, "n", 11, config_text(hostile.url, cluster_id, cluster_secret)
        )
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        wait_for(lambda: hostile.listings >= 1, "a 429")
        time.sleep(0.5)  # the client is now waiting as long as it will believe
        started = time.monotonic()
        agent.stop()
        thread.join(10)
        for session in agent.sessions:
            session.join(10)
        assert not thread.is_alive()
        assert not any(t.is_alive() for s in agent.sessions for t in s._threads)
        assert time.monotonic() - started < 5


def test_malformed_members_harm_only_themselves(
    tmp_path: Path, cluster_id: str, cluster_secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        hostile_service() as hostile,
        cluster(tmp_path, hostile, 2, cluster_id, cluster_secret) as nodes,
    ):
        keys = nodes[0][0].keys
        before = snapshot(nodes)

        rogue = member_info("rogue", (ipaddress.ip_address("192.0.2.200"),))
        template = json.loads(
            encode_record(
                sign_record(MemberRecord(rogue, (), 1, 1 << 39), private_key(rogue), bytes(64))
            )
        )

        def sealed_as(affiliate: str, plain: bytes) -> Stored:
            # Sealed with the cluster's keys and signed with the rogue's own key (a member
            # gone rogue), so that what is refused is the content.
            return Stored(blob(keys.seal_data(affiliate, plain, os.urandom(24))), [])

        junk = {
            "garbage": Stored(blob(os.urandom(300)), [blob(os.urandom(59))]),
            # The rogue's genuine record, listed as another node's: the ids do not match.
            keys.affiliate_id("victim"): sealed_as(
                keys.affiliate_id("victim"), resign(template, private_key(rogue))
            ),
        }
        for name, field, value in (
            ("rogue1", "node_id", "\ud800"),
            ("rogue2", "hostname", "\u001b[2J"),
            ("rogue3", "addresses", [[[[[[]]]]]]),
            ("rogue4", "version", 1.5),
        ):
            affiliate = keys.affiliate_id(name)
            plain = resign({**template, field: value}, private_key(rogue))
            junk[affiliate] = sealed_as(affiliate, plain)

        def malformed(h: Hostile) -> Answer:
            body = json.loads(h.honest_body({**h.current, **junk}))
            body["affiliates"].append({"id": "bad id\n", "data": "!!"})
            body["affiliates"].append(["not", "an", "object"])
            return Answer(body=json.dumps(body).encode())

        hostile.serve(malformed)
        took_listing(nodes)
        assert snapshot(nodes) == before
        assert all(threads_alive(a) for a, _ in nodes)
        summaries = [
            r.getMessage() for r in caplog.records if "listed items refused" in r.getMessage()
        ]
        assert summaries and all(" 8 listed items refused" in m for m in summaries), summaries
        hostile.serve(malformed)
        took_listing(nodes)
        # One summary line a minute per service, however the refused items vary.
        assert len([r for r in caplog.records if "listed items refused" in r.getMessage()]) == len(
            summaries
        )
    no_tracebacks(caplog)
