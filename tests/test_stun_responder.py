"""The discovery service's STUN reflector on loopback: answers, refusals, metrics, the hello
advertisement and the client's reading of it, the command line."""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import random
import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from kubespan.agent.session import DiscoverySession
from kubespan.crypto import ClusterKeys
from kubespan.discovery.client import (
    DiscoveryClient,
    Hello,
    StunReflector,
    parse_stun_reflectors,
)
from kubespan.discovery.metrics import StunCounters
from kubespan.discovery.stunserver import StunResponder
from kubespan.errors import DiscoveryError
from kubespan.netaddr import Endpoint
from kubespan.stun import codec
from kubespan.stun.prober import probe

from served import KUBESPAN, served
from servers import discovery_server

WAIT = 5.0
LOOPBACK = ipaddress.ip_address("127.0.0.1")


def new_keys() -> ClusterKeys:
    return ClusterKeys.derive("cluster", os.urandom(32))


def metric(metrics_url: str, name: str) -> float:
    text = requests.get(f"{metrics_url}/metrics", timeout=WAIT).text
    found = re.search(rf"^kubespan_discovery_{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_a_binding_request_gets_its_source_back_and_garbage_gets_nothing() -> None:
    with (
        discovery_server(stun=True) as server,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        assert server.stun_port is not None
        client.bind(("127.0.0.1", 0))
        client.settimeout(WAIT)
        reflector = ("127.0.0.1", server.stun_port)
        unpadded = codec.encode(codec.BINDING_REQUEST, os.urandom(12))
        hostile = [b"", b"\0" * 20, b"GET / HTTP/1.1\r\n\r\n" * 4, unpadded, os.urandom(600)]
        for datagram in hostile:
            client.sendto(datagram, reflector)
        transaction_id = os.urandom(12)
        client.sendto(codec.binding_request(transaction_id), reflector)
        # Datagrams from one socket are handled in order: the first answer is the request's.
        answer, source = client.recvfrom(2048)
        assert source == reflector
        mapped = Endpoint(LOOPBACK, client.getsockname()[1])
        assert codec.parse_binding_response(answer) == codec.BindingAnswer(transaction_id, mapped)
        assert len(answer) <= len(codec.binding_request(transaction_id))
        client.settimeout(0.2)
        with pytest.raises(TimeoutError):
            client.recvfrom(2048)  # nothing else came, for the garbage
        assert metric(server.metrics_url, "stun_requests_total") == 6
        assert metric(server.metrics_url, "stun_answers_total") == 1
        assert metric(server.metrics_url, 'stun_refused_total{reason="malformed"}') == 4
        assert metric(server.metrics_url, 'stun_refused_total{reason="too_small"}') == 1


def test_rate_limit_per_source() -> None:
    now = [0.0]
    counters = StunCounters()
    responder = StunResponder(counters, rate=1.0, burst=3.0, clock=lambda: now[0])
    request = codec.binding_request(os.urandom(12))
    a, b = Endpoint.parse("192.0.2.1:1000"), Endpoint.parse("192.0.2.2:1000")
    assert [responder.answer(request, a) is not None for _ in range(5)] == [1, 1, 1, 0, 0]
    assert responder.answer(request, b) is not None  # another source has its own budget
    now[0] = 1.0
    assert responder.answer(request, a) is not None
    assert counters.refused["rate"] == 2 and counters.answered == 5


def test_hello_names_the_reflector_and_the_prober_uses_it() -> None:
    with discovery_server(stun=True) as server:
        hello = DiscoveryClient(server.url, new_keys()).hello_info()
        assert hello == Hello(LOOPBACK, (StunReflector(None, server.stun_port or 0),), LOOPBACK)
        reflectors = hello.reflectors([LOOPBACK])
        assert reflectors == (Endpoint(LOOPBACK, server.stun_port or 0),)
        started = time.monotonic()
        result = probe(51820, reflectors)
        elapsed = time.monotonic() - started
        assert result.ipv4 == (Endpoint(LOOPBACK, 51820),), result
        assert elapsed < 1.0


def test_session_exposes_the_reflectors() -> None:
    with discovery_server(stun=True) as server:
        session = DiscoverySession(
            server.url, new_keys(), queue.Queue(), random.Random(1), os.urandom
        )
        named: list[int] = []
        session.on_reflectors = lambda: named.append(1)  # the agent's STUN prober trigger
        client = DiscoveryClient(server.url, session.keys)
        session._hello(client)  # what the registrar does before its first put
        assert session.stun_reflectors == (Endpoint(LOOPBACK, server.stun_port or 0),)
        assert session.status()["stun_reflectors"] == [f"127.0.0.1:{server.stun_port}"]
        assert named == [1]  # told at once, from the session's own thread
        session._hello(client)
        assert named == [1]  # the same reflectors again: nothing new to ask


def test_an_older_service_names_no_reflectors() -> None:
    assert parse_stun_reflectors(None, "u") == ()
    with discovery_server() as server:  # no reflector: the list is empty
        assert DiscoveryClient(server.url, new_keys()).hello_info().stun == ()


GOOD_LISTS: list[tuple[object, tuple[StunReflector, ...]]] = [
    ([], ()),
    ([{"port": 3478}], (StunReflector(None, 3478),)),
    (
        [{"port": 3478}, {"address": "198.51.100.8", "port": 3479}, {"port": 3478}],
        (StunReflector(None, 3478), StunReflector(ipaddress.ip_address("198.51.100.8"), 3479)),
    ),
    (
        [{"address": "2001:db8::1", "port": 1}],
        (StunReflector(ipaddress.ip_address("2001:db8::1"), 1),),
    ),
]


@pytest.mark.parametrize(("value", "expected"), GOOD_LISTS)
def test_reflector_lists_read(value: object, expected: tuple[StunReflector, ...]) -> None:
    assert parse_stun_reflectors(value, "u") == expected


HOSTILE_LISTS: list[tuple[object, str]] = [
    ("3478", "is not a list"),
    ({"port": 3478}, "is not a list"),
    ([{"port": 3478}] * 9, "at most 8"),
    ([3478], "is not {address?, port}"),
    ([{"port": 3478, "extra": 1}], "is not {address?, port}"),
    ([{}], "port is not a port number"),
    ([{"port": 0}], "port is not a port number"),
    ([{"port": 65536}], "port is not a port number"),
    ([{"port": True}], "port is not a port number"),
    ([{"port": 3478.0}], "port is not a port number"),
    ([{"port": "3478"}], "port is not a port number"),
    ([{"address": 5, "port": 3478}], "is not an IP address"),
    ([{"address": "x" * 5000, "port": 3478}], "is not an IP address"),
    ([{"address": "stun.example.net", "port": 3478}], "refused"),
    ([{"address": "fe80::1%eth0", "port": 3478}], "refused"),
    ([{"address": "0.0.0.0", "port": 3478}], "cannot be reached"),  # noqa: S104 - refused
    ([{"address": "224.0.0.1", "port": 3478}], "cannot be reached"),
    ([{"address": "127.0.0.1", "port": 3478}], "cannot be reached"),
]


@pytest.mark.parametrize(("value", "why"), HOSTILE_LISTS)
def test_hostile_reflector_lists_are_refused_clearly(value: object, why: str) -> None:
    with pytest.raises(DiscoveryError, match=re.escape(why)) as refused:
        parse_stun_reflectors(value, "http://discovery")
    assert str(refused.value).startswith("http://discovery: hello's stun")
    assert len(str(refused.value)) < 200


def test_command_line_reflectors_and_ipv6(tmp_path: Path) -> None:
    args = ("--stun-listen", "[::1]:0", "--stun-listen", "127.0.0.1:0")
    with served(tmp_path, *args) as service:
        shown = re.search(r"stun reflector udp=(\S+) advertised=(\S+)", service.log.read_text())
        assert shown is not None, service.log.read_text()
        listening = [Endpoint.parse(text) for text in shown.group(1).split(",")]
        assert [e.address.version for e in listening] == [6, 4]
        answers = probe(51820, listening).answers
        assert [a.mapped for a in answers] == [
            Endpoint.parse("[::1]:51820"),
            Endpoint.parse("127.0.0.1:51820"),
        ]
        hello = DiscoveryClient(service.url, new_keys()).hello_info()
        assert {r.port for r in hello.stun} == {e.port for e in listening}
        assert metric(service.metrics_url, "stun_answers_total") == 2


def test_command_line_advertises_what_it_is_told(tmp_path: Path) -> None:
    args = ("--stun-advertise", ":3478", "--stun-advertise", "[2001:db8::7]:3479")
    with served(tmp_path, *args) as service:
        hello = DiscoveryClient(service.url, new_keys()).hello_info()
        assert hello.stun == (
            StunReflector(None, 3478),
            StunReflector(ipaddress.ip_address("2001:db8::7"), 3479),
        )
    with served(tmp_path, "--no-stun") as service:
        assert DiscoveryClient(service.url, new_keys()).hello_info().stun == ()
        assert "stun reflector udp=off advertised=none" in service.log.read_text()


NINE_ADVERTS = [item for port in range(1, 10) for item in ("--stun-advertise", f":{port}")]


@pytest.mark.parametrize(
    ("flags", "why"),
    [
        (["--no-stun", "--stun-listen", "127.0.0.1:0"], "--no-stun leaves nothing"),
        (["--stun-listen", "localhost:3478"], "is not an IP address"),
        (["--stun-advertise", "0.0.0.0:3478"], "name an address clients can reach"),
        (["--stun-advertise", ":0"], "expected :PORT with a port from 1 to 65535"),
        (["--stun-advertise", "198.51.100.1"], "expected ADDRESS:PORT"),
        (NINE_ADVERTS, "at most 8"),
    ],
)
def test_bad_stun_flags_are_refused_clearly(flags: list[str], why: str) -> None:
    argv = [str(KUBESPAN), "discovery", "serve", "--listen", "127.0.0.1:0", *flags]
    result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert why in result.stderr.strip().splitlines()[-1], result.stderr
    assert "Traceback" not in result.stderr


def test_taken_reflector_port_is_a_usage_error(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        taken = holder.getsockname()[1]
        argv: list[Any] = [KUBESPAN, "discovery", "serve", "--listen", "127.0.0.1:0"]
        argv += ["--stun-listen", f"127.0.0.1:{taken}"]
        result = subprocess.run(
            [str(a) for a in argv], check=False, capture_output=True, text=True, timeout=30
        )
    assert result.returncode == 2
    assert f"--stun-listen 127.0.0.1:{taken}: cannot listen" in result.stderr


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "[::]"])  # noqa: S104 - loopback traffic only
def test_a_wildcard_reflector_answers_from_the_address_asked(tmp_path: Path, wildcard: str) -> None:
    """A NAT drops an answer from another address than the one asked; the prober, like the
    NAT, takes answers only from the reflector it asked."""
    with served(tmp_path, "--stun-listen", f"{wildcard}:0") as service:
        shown = re.search(r"stun reflector udp=\S+:(\d+) ", service.log.read_text())
        assert shown is not None
        port = int(shown.group(1))
        reflectors = [Endpoint.parse(f"127.0.0.{n}:{port}") for n in (1, 5, 9)]
        if wildcard == "[::]":
            reflectors.append(Endpoint.parse(f"[::1]:{port}"))
        answers = probe(51820, reflectors).answers
        assert all(a.mapped is not None for a in answers), answers
        assert {a.mapped.port for a in answers if a.mapped} == {51820}


def test_a_bad_reflector_list_costs_the_reflectors_only(tmp_path: Path) -> None:
    """A service (or anyone on an http:// path) sending a hostile `stun` list: the node
    keeps its address and goes on registering; the list is refused with its reason."""
    answer = {"client_address": "192.0.2.7", "stun": [{"port": "3478"}] * 3}
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        client = DiscoveryClient(url, new_keys())
        serving = threading.Thread(target=_answer_once, args=(listener, answer), daemon=True)
        serving.start()
        hello = client.hello_info()
        serving.join(WAIT)
    assert hello.client_address == ipaddress.ip_address("192.0.2.7")
    assert hello.stun == ()
    assert hello.stun_problem is not None
    assert "hello's stun[0].port is not a port number" in hello.stun_problem


def _answer_once(listener: socket.socket, document: dict[str, Any]) -> None:
    connection, _ = listener.accept()
    with connection:
        connection.settimeout(WAIT)
        received = b""
        while b"\r\n\r\n" not in received:
            received += connection.recv(4096)
        body = json.dumps(document).encode()
        head = f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        connection.sendall(head.encode() + body)
