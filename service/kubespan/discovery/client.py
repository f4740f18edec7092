"""HTTP client of the discovery service (requests): signs every request for its cluster,
retries idempotent requests with exponential backoff and jitter. One instance per thread."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import time
from collections.abc import Callable
from typing import Any

import requests

from kubespan.crypto import ClusterKeys
from kubespan.discovery.protocol import API_PREFIX, Listing, encode_blob, parse_listing
from kubespan.discovery.signing import NONCE_BYTES, sign
from kubespan.errors import DiscoveryError, DiscoveryRejected
from kubespan.netaddr import IPAddress

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 10.0
ATTEMPTS = 3


class DiscoveryClient:
    def __init__(
        self,
        base_url: str,
        keys: ClusterKeys,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
        random_bytes: Callable[[int], bytes] = os.urandom,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        verify: bool | str = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.keys = keys
        self.session = session or requests.Session()
        self.clock = clock
        self.random_bytes = random_bytes
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.verify = verify

    def close(self) -> None:
        self.session.close()

    @property
    def cluster_path(self) -> str:
        return f"{API_PREFIX}/clusters/{self.keys.cluster_address}"

    def hello(self) -> IPAddress | None:
        body = self._request("GET", f"{self.cluster_path}/hello")
        address = body.get("client_address")
        try:
            return ipaddress.ip_address(str(address)) if address else None
        except ValueError:
            raise DiscoveryError(f"{self.base_url}: hello returned {address!r}") from None

    def put(self, affiliate: str, data: bytes, endpoints: list[bytes], ttl: int) -> int:
        document = {
            "data": encode_blob(data),
            "endpoints": [encode_blob(e) for e in endpoints],
            "ttl": ttl,
        }
        body = self._request("PUT", f"{self.cluster_path}/affiliates/{affiliate}", document)
        return _revision(body, self.base_url)

    def add_endpoints(self, affiliate: str, endpoints: list[bytes], ttl: int) -> int:
        document = {"endpoints": [encode_blob(e) for e in endpoints], "ttl": ttl}
        path = f"{self.cluster_path}/affiliates/{affiliate}/endpoints"
        return _revision(self._request("POST", path, document), self.base_url)

    def delete(self, affiliate: str) -> int:
        body = self._request("DELETE", f"{self.cluster_path}/affiliates/{affiliate}")
        return _revision(body, self.base_url)

    def listing(self, since: int | None = None, wait: float = 0.0) -> Listing:
        target = f"{self.cluster_path}/affiliates"
        if since is not None:
            target += f"?since={since}&wait={wait:g}"
        body = self._request("GET", target, extra_timeout=wait)
        try:
            return parse_listing(body)
        except ValueError as error:
            raise DiscoveryError(f"{self.base_url}: malformed listing: {error}") from None

    def _request(
        self, method: str, target: str, document: Any = None, extra_timeout: float = 0.0
    ) -> dict[str, Any]:
        """Send, retrying what failed in transit (every request here is idempotent); a 4xx is
        an answer and is not retried, except 429 after the time the service asks for."""
        payload = b"" if document is None else json.dumps(document).encode()
        delay = 0.5
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return self._send(method, target, payload, extra_timeout)
            except DiscoveryRejected as error:
                if error.status != 429 or attempt == ATTEMPTS:
                    raise
                self.sleep(max(error.retry_after, delay))
            except DiscoveryError:
                if attempt == ATTEMPTS:
                    raise
                self.sleep(delay * (0.5 + self.rng.random()))
            delay *= 2
        raise AssertionError("unreachable")

    def _send(
        self, method: str, target: str, payload: bytes, extra_timeout: float
    ) -> dict[str, Any]:
        # Signed at each attempt: a fresh timestamp and nonce, never a replay of our own.
        signed = sign(
            self.keys.signing_key,
            method,
            target,
            payload,
            int(self.clock()),
            self.random_bytes(NONCE_BYTES),
            service_url=self.base_url,
        )
        headers = signed.as_dict()
        if payload:
            headers["content-type"] = "application/json"
        try:
            response = self.session.request(
                method,
                self.base_url + target,
                data=payload or None,
                headers=headers,
                timeout=(CONNECT_TIMEOUT, READ_TIMEOUT + extra_timeout),
                verify=self.verify,
            )
        except requests.RequestException as error:
            raise DiscoveryError(f"{self.base_url}: {type(error).__name__}: {error}") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if 400 <= response.status_code < 500:
            detail = body.get("error", {}) if isinstance(body, dict) else {}
            detail = detail if isinstance(detail, dict) else {}
            rejected = DiscoveryRejected(
                response.status_code,
                detail.get("field"),
                str(detail.get("message", response.reason)),
            )
            retry = response.headers.get("retry-after", "")
            rejected.retry_after = float(retry) if retry.isdigit() else 0.0
            raise rejected
        if response.status_code != 200 or not isinstance(body, dict):
            raise DiscoveryError(
                f"{self.base_url}: HTTP {response.status_code} for {method} {target}"
            )
        return body


def _revision(body: dict[str, Any], base_url: str) -> int:
    revision = body.get("revision")
    if not isinstance(revision, int):
        raise DiscoveryError(f"{base_url}: answer has no revision")
    return revision
