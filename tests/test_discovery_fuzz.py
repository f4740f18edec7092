"""Fuzzing the live service from its own OpenAPI document (schemathesis): whatever arrives,
the answer is never a 5xx and always matches the document (the service's log then holds no
"internal error" and no traceback). Each generated request is sent
twice: as generated (mostly unsigned: the signature checks answer) and signed for a real
cluster, so the fuzzer also reaches the handlers behind the signature."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case as _Case
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.schemas import APIOperation as _APIOperation

import kubespan
from kubespan.crypto import ClusterKeys
from kubespan.discovery.signing import sign

from served import ServedProcess, served

APIOperation = _APIOperation[Any, Any, Any, Any]
Case = _Case[Any]
KEYS = ClusterKeys.derive("fuzz-cluster", os.urandom(32))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedProcess]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    with served(tmp, "--rate-limit", "0", "--state-dir", str(tmp / "state")) as process:
        yield process


SCHEMA = schemathesis.openapi.from_path(
    str(Path(kubespan.__file__).parent / "discovery" / "openapi.json")
)
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]  # type: ignore[union-attr]
CASES = [
    (operation, mode)
    for operation in OPERATIONS
    for mode in GenerationMode
    # Nothing to get wrong in an operation that takes no input.
    if mode is GenerationMode.POSITIVE
    or any(map(len, (operation.path_parameters, operation.query, operation.body)))
]


def send_signed(case: Case, base_url: str, session: requests.Session) -> requests.Response:
    if "cluster" in (case.path_parameters or {}):
        case.path_parameters["cluster"] = KEYS.cluster_address
    kwargs = case.as_transport_kwargs(base_url=base_url)
    prepared = session.prepare_request(
        requests.Request(
            kwargs["method"],
            kwargs["url"],
            headers=kwargs.get("headers"),
            params=kwargs.get("params"),
            json=kwargs.get("json"),
            data=kwargs.get("data"),
        )
    )
    body = prepared.body if isinstance(prepared.body, bytes) else (prepared.body or "").encode()
    headers = sign(
        KEYS.signing_key,
        prepared.method or "GET",
        prepared.path_url,
        body,
        int(time.time()),
        os.urandom(16),
        service_url=base_url,
    )
    prepared.headers.update(headers.as_dict())
    return session.send(prepared, timeout=30)


@pytest.mark.parametrize(
    ("operation", "mode"), CASES, ids=[f"{o.label} {m.value}" for o, m in CASES]
)
def test_no_5xx_and_answers_match_the_document(
    operation: APIOperation, mode: GenerationMode, service: ServedProcess
) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def exchange(case: Case) -> None:
        if isinstance(case.query, dict) and "wait" in case.query:
            case.query["wait"] = 0  # a fuzzed long poll would only slow the run down
        with requests.Session() as session:
            response = case.call(base_url=service.url, session=session, timeout=30)
            case.validate_response(response, checks=CHECKS)
            signed = send_signed(case, service.url, session)
            case.validate_response(signed, checks=CHECKS)

    exchange()
    log = service.log.read_text()
    assert "internal error" not in log
    assert "Traceback" not in log
