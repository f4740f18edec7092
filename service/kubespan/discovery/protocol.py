"""The discovery wire protocol (HTTP/JSON, version 1): request parsing and response shapes.

Every /v1 request is signed for its cluster (see signing.py). `{cluster}` is the cluster's
public key (base64url), `{id}` an opaque affiliate id; the service sees nothing else.

  GET    /v1/clusters/{cluster}/hello                    -> {"client_address": "203.0.113.9"}
  GET    /v1/clusters/{cluster}/affiliates               -> Listing (reset: the whole cluster)
         ?since=REV&wait=SECONDS                         long poll: what changed after REV
  PUT    /v1/clusters/{cluster}/affiliates/{id}          <- {"data", "endpoints", "ttl"}
  POST   /v1/clusters/{cluster}/affiliates/{id}/endpoints <- {"endpoints", "ttl"} (harvested)
  DELETE /v1/clusters/{cluster}/affiliates/{id}
  GET    /openapi.json
  GET    /healthz, /readyz, /metrics                     on the --metrics-listen address only

A Listing is {"revision", "reset", "affiliates": [{"id", "data", "endpoints", "ttl"}],
"removed": [id]}: with reset true it is the whole cluster, otherwise the affiliates that
changed (in full) and the ids that left since the revision asked for. Blobs travel as
standard base64. Errors are 4xx with {"error": {"field": ..., "message": ...}} (507 when the
service is full). Everything the server reads is parsed strictly: ASCII digits for numbers,
whole-string matches for ids, bounded JSON (size, depth, integer digits).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

from kubespan import boundedjson
from kubespan.discovery import limits

API_PREFIX = "/v1"
_ID_PATTERN = re.compile(rf"[A-Za-z0-9_-]{{1,{limits.MAX_ID_LENGTH}}}", re.ASCII)
_QUERY_WORD = re.compile(r"[A-Za-z0-9._-]{1,32}", re.ASCII)
_REVISION = re.compile(r"[0-9]{1,18}", re.ASCII)
_SECONDS = re.compile(r"[0-9]{1,3}(\.[0-9]{1,6})?", re.ASCII)


class BadRequest(Exception):
    """A request the server refuses; `field` names what was wrong."""

    def __init__(
        self, field: str, message: str, status: int = 400, retry: int = 0, allow: str = ""
    ) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status
        self.retry = retry
        self.allow = allow

    def body(self) -> dict[str, Any]:
        return {"error": {"field": self.field, "message": self.message}}


@dataclass(frozen=True)
class PutAffiliate:
    data: bytes
    endpoints: tuple[bytes, ...]
    ttl: int


@dataclass(frozen=True)
class WireAffiliate:
    id: str
    data: bytes
    endpoints: tuple[bytes, ...]
    ttl: float


@dataclass(frozen=True)
class PostEndpoints:
    endpoints: tuple[bytes, ...]
    ttl: int


@dataclass(frozen=True)
class Listing:
    revision: int
    affiliates: tuple[WireAffiliate, ...]
    removed: tuple[str, ...] = ()
    reset: bool = True


def check_id(field: str, value: str) -> str:
    if not _ID_PATTERN.fullmatch(value):
        raise BadRequest(field, f"must be 1 to {limits.MAX_ID_LENGTH} characters of [A-Za-z0-9_-]")
    return value


def _blob(field: str, value: Any, max_bytes: int) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(field, "must be a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(field, "must be standard base64") from None
    if not raw:
        raise BadRequest(field, "must not be empty")
    if len(raw) > max_bytes:
        raise BadRequest(field, f"must be at most {max_bytes} bytes", status=413)
    return raw


def _object(body: Any, fields: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("body", "must be a JSON object")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise BadRequest(unknown[0], "unknown field")
    return body


def _endpoints(body: dict[str, Any]) -> tuple[bytes, ...]:
    endpoints_value = body.get("endpoints", [])
    if not isinstance(endpoints_value, list):
        raise BadRequest("endpoints", "must be a list of base64 strings")
    if len(endpoints_value) > limits.MAX_ENDPOINTS_PER_AFFILIATE:
        raise BadRequest(
            "endpoints", f"must hold at most {limits.MAX_ENDPOINTS_PER_AFFILIATE} entries"
        )
    return tuple(
        _blob(f"endpoints[{i}]", e, limits.MAX_ENDPOINT_BYTES)
        for i, e in enumerate(endpoints_value)
    )


def _ttl(body: dict[str, Any]) -> int:
    ttl = body.get("ttl")
    if isinstance(ttl, bool) or not isinstance(ttl, int):
        raise BadRequest("ttl", "must be an integer number of seconds")
    if not limits.MIN_TTL_SECONDS <= ttl <= limits.MAX_TTL_SECONDS:
        raise BadRequest(
            "ttl", f"must be between {limits.MIN_TTL_SECONDS} and {limits.MAX_TTL_SECONDS}"
        )
    return ttl


def parse_put(body: Any) -> PutAffiliate:
    fields = _object(body, {"data", "endpoints", "ttl"})
    data = _blob("data", fields.get("data"), limits.MAX_DATA_BYTES)
    return PutAffiliate(data, _endpoints(fields), _ttl(fields))


def parse_post_endpoints(body: Any) -> PostEndpoints:
    fields = _object(body, {"endpoints", "ttl"})
    endpoints = _endpoints(fields)
    if not endpoints:
        raise BadRequest("endpoints", "must hold at least one endpoint")
    return PostEndpoints(endpoints, _ttl(fields))


def parse_body(body: bytes) -> Any:
    """A request body as JSON, bounded in size, depth and integer digits."""
    try:
        return boundedjson.loads(body, limits.MAX_BODY_BYTES, limits.MAX_BODY_DEPTH)
    except ValueError as error:
        raise BadRequest("body", f"must be valid JSON: {error}") from None


def parse_query(query: str) -> dict[str, str]:
    """`a=1&b=2` of plain words only: nothing our clients send needs percent-encoding, so
    anything else is refused rather than decoded."""
    if not query:
        return {}
    pairs = query.split("&", limits.MAX_QUERY_PARAMETERS)
    if len(pairs) > limits.MAX_QUERY_PARAMETERS:
        raise BadRequest("query", f"at most {limits.MAX_QUERY_PARAMETERS} parameters")
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not _QUERY_WORD.fullmatch(name):
            raise BadRequest("query", "parameter names are plain words")
        if not sep or not _QUERY_WORD.fullmatch(value):
            raise BadRequest(name, "must be a plain value (digits, letters, '.', '_', '-')")
        if name in out:
            raise BadRequest(name, "is given more than once")
        out[name] = value
    return out


def parse_watch(query: dict[str, str]) -> tuple[int | None, float]:
    unknown = sorted(set(query) - {"since", "wait"})
    if unknown:
        raise BadRequest(unknown[0], "unknown query parameter")
    since: int | None = None
    wait = 0.0
    if "since" in query:
        text = query["since"]
        if not _REVISION.fullmatch(text):
            raise BadRequest("since", "must be a non-negative integer revision (ASCII digits)")
        since = int(text)
    if "wait" in query:
        text = query["wait"]
        if not _SECONDS.fullmatch(text):
            raise BadRequest("wait", "must be a decimal number of seconds (ASCII digits)")
        wait = float(text)
        if wait > limits.MAX_WAIT_SECONDS:
            raise BadRequest("wait", f"must be between 0 and {limits.MAX_WAIT_SECONDS:g}")
    return since, wait


def encode_blob(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def listing_body(listing: Listing) -> dict[str, Any]:
    return {
        "revision": listing.revision,
        "reset": listing.reset,
        "removed": list(listing.removed),
        "affiliates": [
            {
                "id": a.id,
                "data": encode_blob(a.data),
                "endpoints": [encode_blob(e) for e in a.endpoints],
                "ttl": round(a.ttl, 3),
            }
            for a in listing.affiliates
        ],
    }


def parse_listing(body: Any) -> Listing:
    """Client side: parse a listing, refusing anything malformed."""
    if not isinstance(body, dict) or not isinstance(body.get("revision"), int):
        raise ValueError("listing has no integer revision")
    raw_affiliates = body.get("affiliates")
    if not isinstance(raw_affiliates, list):
        raise ValueError("listing has no affiliates list")
    out = []
    for index, item in enumerate(raw_affiliates):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise ValueError(f"affiliates[{index}] is malformed")
        endpoints = item.get("endpoints", [])
        if not isinstance(endpoints, list):
            raise ValueError(f"affiliates[{index}].endpoints is not a list")
        try:
            out.append(
                WireAffiliate(
                    id=item["id"],
                    data=base64.b64decode(str(item.get("data", "")), validate=True),
                    endpoints=tuple(base64.b64decode(str(e), validate=True) for e in endpoints),
                    ttl=float(item.get("ttl", 0)),
                )
            )
        except (binascii.Error, ValueError, TypeError):
            raise ValueError(f"affiliates[{index}] holds invalid base64") from None
    removed = body.get("removed", [])
    if not isinstance(removed, list) or not all(isinstance(r, str) for r in removed):
        raise ValueError("listing's removed is not a list of ids")
    reset = body.get("reset", True)
    if not isinstance(reset, bool):
        raise ValueError("listing's reset is not a boolean")
    return Listing(body["revision"], tuple(out), tuple(removed), reset)


def route(path: str, method: str) -> tuple[str, str, str | None]:
    """(route name, cluster, affiliate) of a /v1 path; 404/405 otherwise."""
    if not path.startswith(API_PREFIX + "/"):
        raise BadRequest("path", "not found", status=404)
    parts = path[len(API_PREFIX) + 1 :].split("/")
    if len(parts) < 3 or parts[0] != "clusters":
        raise BadRequest("path", "not found", status=404)
    cluster = check_id("cluster", parts[1])
    rest = parts[2:]
    if rest == ["hello"]:
        allow(method, "GET")
        return "hello", cluster, None
    if rest == ["affiliates"]:
        allow(method, "GET")
        return "list", cluster, None
    if len(rest) == 2 and rest[0] == "affiliates":
        affiliate = check_id("affiliate", rest[1])
        allow(method, "PUT", "DELETE")
        return ("put" if method == "PUT" else "delete"), cluster, affiliate
    if len(rest) == 3 and rest[0] == "affiliates" and rest[2] == "endpoints":
        allow(method, "POST")
        return "endpoints", cluster, check_id("affiliate", rest[1])
    raise BadRequest("path", "not found", status=404)


def allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise BadRequest(
            "method", f"{method} is not allowed here", status=405, allow=", ".join(allowed)
        )
