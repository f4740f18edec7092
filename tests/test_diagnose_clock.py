"""The clock skew `kubespan check` judges: the discovery service dates its answers from the
clock it checks signatures against, the client reads how far off its own clock is (from
refusals too: that is when it matters), and the session puts the figure in the status."""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import random
import time
from pathlib import Path

import jsonschema
import pytest

from kubespan import cli
from kubespan.agent.session import DiscoverySession
from kubespan.agent.status import status_document
from kubespan.crypto import ClusterKeys
from kubespan.discovery.client import DiscoveryClient, clock_skew
from kubespan.errors import DiscoveryRejected
from kubespan.model import AffiliateInfo

from servers import discovery_server

SCHEMA = json.loads((Path(cli.__file__).parent / "schema" / "status.schema.json").read_text())
NOW = 1_800_000_000.0  # Fri, 15 Jan 2027 08:00:00 GMT


@pytest.mark.parametrize(
    ("header", "skew"),
    [
        ("Fri, 15 Jan 2027 08:00:00 GMT", 0.0),
        ("Fri, 15 Jan 2027 08:02:10 GMT", 130.0),
        ("Fri, 15 Jan 2027 07:55:00 +0000", -300.0),
        ("Fri, 15 Jan 2027 08:00:00 -0000", None),  # no time zone known
        (None, None),
        ("", None),
        ("yesterday", None),
        ("Fri, 15 Jan 2027 08:00:00 GMT" + " " * 64, None),
        ("Fri, 15 Jan 2027 08:00:00 GMT\u00a0", None),
        ("Fri, 15 Jan 99999 08:00:00 GMT", None),
        ("Fri, 45 Jan 2027 08:00:00 GMT", None),
    ],
)
def test_the_skew_from_a_date_header(header: str | None, skew: float | None) -> None:
    assert clock_skew(header, NOW) == skew


def test_a_refused_request_still_tells_how_far_off_the_clock_is() -> None:
    keys = ClusterKeys.derive("cluster", os.urandom(32))
    seen: list[float] = []
    with discovery_server() as server:
        late = DiscoveryClient(
            server.url, keys, clock=lambda: time.time() - 200, on_clock_skew=seen.append
        )
        with pytest.raises(DiscoveryRejected, match="stale"):
            late.hello_info()
        late.close()
        assert seen and 198 < seen[-1] < 202  # the service is 200 s ahead of this clock
        seen.clear()
        right = DiscoveryClient(server.url, keys, on_clock_skew=seen.append)
        right.hello_info()
        right.close()
        assert seen and abs(seen[-1]) < 2  # whole seconds in the header, and the trip


def test_the_session_reports_the_skew_in_the_status() -> None:
    keys = ClusterKeys.derive("cluster", os.urandom(32))
    with discovery_server() as server:
        session = DiscoverySession(server.url, keys, queue.Queue(), random.Random(1), os.urandom)
        assert session.status()["clock_skew_s"] is None  # before any answer
        client = session._client()
        client.clock = lambda: time.time() + 300
        with pytest.raises(DiscoveryRejected):
            session._hello(client)
        client.close()
    entry = session.status()
    assert -302 < entry["clock_skew_s"] < -298 and entry["clock_skew_s"] == round(
        entry["clock_skew_s"], 1
    )
    info = AffiliateInfo("a", "n", "A" * 43 + "=", ipaddress.IPv6Address("fd00::1"), ())
    document = status_document(info, (), (), [entry], True, NOW)
    jsonschema.Draft202012Validator(SCHEMA).validate(json.loads(json.dumps(document)))
