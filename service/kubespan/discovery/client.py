"""HTTP client of the discovery service (requests). One instance per thread."""

from __future__ import annotations

import ipaddress
from typing import Any

import requests

from kubespan.discovery.protocol import API_PREFIX, Listing, encode_blob, parse_listing
from kubespan.errors import DiscoveryError, DiscoveryRejected
from kubespan.netaddr import IPAddress

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 10.0


class DiscoveryClient:
    def __init__(self, base_url: str, session: requests.Session | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session or requests.Session()

    def close(self) -> None:
        self.session.close()

    def hello(self) -> IPAddress | None:
        body = self._request("GET", "/hello")
        address = body.get("client_address")
        try:
            return ipaddress.ip_address(str(address)) if address else None
        except ValueError:
            raise DiscoveryError(f"{self.base_url}: hello returned {address!r}") from None

    def put(
        self, cluster: str, affiliate: str, data: bytes, endpoints: list[bytes], ttl: int
    ) -> int:
        body = self._request(
            "PUT",
            f"/clusters/{cluster}/affiliates/{affiliate}",
            json_body={
                "data": encode_blob(data),
                "endpoints": [encode_blob(e) for e in endpoints],
                "ttl": ttl,
            },
        )
        return _revision(body, self.base_url)

    def delete(self, cluster: str, affiliate: str) -> int:
        body = self._request("DELETE", f"/clusters/{cluster}/affiliates/{affiliate}")
        return _revision(body, self.base_url)

    def listing(self, cluster: str, since: int | None = None, wait: float = 0.0) -> Listing:
        params: dict[str, str] = {}
        if since is not None:
            params = {"since": str(since), "wait": f"{wait:g}"}
        body = self._request(
            "GET", f"/clusters/{cluster}/affiliates", params=params, extra_timeout=wait
        )
        try:
            return parse_listing(body)
        except ValueError as error:
            raise DiscoveryError(f"{self.base_url}: malformed listing: {error}") from None

    def _request(
        self,
        method: str,
        path: str,
        json_body: Any = None,
        params: dict[str, str] | None = None,
        extra_timeout: float = 0.0,
    ) -> dict[str, Any]:
        url = f"{self.base_url}{API_PREFIX}{path}"
        try:
            response = self.session.request(
                method,
                url,
                json=json_body,
                params=params,
                timeout=(CONNECT_TIMEOUT, READ_TIMEOUT + extra_timeout),
            )
        except requests.RequestException as error:
            raise DiscoveryError(f"{self.base_url}: {type(error).__name__}: {error}") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if 400 <= response.status_code < 500:
            detail = body.get("error", {}) if isinstance(body, dict) else {}
            raise DiscoveryRejected(
                response.status_code,
                detail.get("field") if isinstance(detail, dict) else None,
                str(detail.get("message", response.reason)) if isinstance(detail, dict) else "",
            )
        if response.status_code != 200 or not isinstance(body, dict):
            raise DiscoveryError(
                f"{self.base_url}: HTTP {response.status_code} for {method} {path}"
            )
        return body


def _revision(body: dict[str, Any], base_url: str) -> int:
    revision = body.get("revision")
    if not isinstance(revision, int):
        raise DiscoveryError(f"{base_url}: answer has no revision")
    return revision
