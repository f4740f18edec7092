"""HTTP client of the discovery service: signs every request for its cluster and for the
service's own URL, retries idempotent requests with exponential backoff and jitter. One
instance per thread.

The service (or anyone on an http:// path to it) may be hostile, so every answer is bounded
(transport.py): a hard deadline per exchange, redirects never followed (they would carry the
signed headers elsewhere), bodies read up to a cap and parsed with bounded nesting, no cookie
kept, and a Retry-After believed only as a short run of ASCII digits, capped. Every wait goes
through `sleep`, which the caller makes interruptible so that stopping never waits on a
server's say-so.
"""

from __future__ import annotations

import email.utils
import json
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubespan import boundedjson
from kubespan.crypto import ClusterKeys
from kubespan.discovery.listing import parse_listing_answer
from kubespan.discovery.payload import parse_address
from kubespan.discovery.protocol import API_PREFIX, Listing, encode_blob
from kubespan.discovery.signing import NONCE_BYTES, sign
from kubespan.discovery.transport import Transport
from kubespan.errors import DiscoveryError, DiscoveryRejected
from kubespan.netaddr import Endpoint, IPAddress, reachable_unicast

# A whole exchange, from connecting to the last byte of the answer (a long poll adds its wait).
EXCHANGE_DEADLINE = 15.0
ATTEMPTS = 3
# The largest honest answer is a listing of 1,024 members at 4 KiB each, base64, with
# harvested endpoints: well under this.
MAX_ANSWER_BYTES = 16 * 1024 * 1024
MAX_ANSWER_DEPTH = 6
MAX_RETRY_AFTER = 60.0
MAX_STUN_REFLECTORS = 8
# An HTTP date is 29 characters (IMF-fixdate); anything much longer is not one.
MAX_DATE_LENGTH = 64


@dataclass(frozen=True)
class StunReflector:
    """A STUN reflector the service names: at `address`, or (None) at the service's own
    address as this node reaches it."""

    address: IPAddress | None
    port: int


@dataclass(frozen=True)
class Hello:
    client_address: IPAddress | None
    stun: tuple[StunReflector, ...]
    # The service's address this answer came from (resolves reflectors without address).
    service_address: IPAddress | None = None
    # Why the service's `stun` list was refused (then `stun` is empty): a bad list costs the
    # reflectors, never the address or the registration that follows.
    stun_problem: str | None = None

    def reflectors(self, service_addresses: Sequence[IPAddress]) -> tuple[Endpoint, ...]:
        """The reflectors as endpoints, those without address at each service address."""
        found: dict[Endpoint, None] = {}
        for reflector in self.stun:
            if reflector.address is not None:
                found[Endpoint(reflector.address, reflector.port)] = None
                continue
            for address in service_addresses:
                found[Endpoint(address, reflector.port)] = None
        return tuple(found)


class DiscoveryClient:
    def __init__(
        self,
        base_url: str,
        keys: ClusterKeys,
        clock: Callable[[], float] = time.time,
        random_bytes: Callable[[int], bytes] = os.urandom,
        sleep: Callable[[float], object] = time.sleep,
        rng: random.Random | None = None,
        verify: bool | str = True,
        source_address: str | None = None,
        headers: Mapping[str, str] | None = None,
        on_clock_skew: Callable[[float], object] | None = None,
    ) -> None:
        """`verify`: check the service's certificate (True), against this CA file (a path),
        or not at all (False, tests only). `source_address` and `headers` serve tests that
        play several clients or a proxy. `on_clock_skew` is told, after every answer with a
        believable Date header (refusals too), how many seconds the service's clock is ahead
        of `clock` (negative: behind): the service refuses signed requests whose timestamp
        is too far from its own clock."""
        self.base_url = base_url.rstrip("/")
        self.keys = keys
        self.transport = Transport(self.base_url, verify, source_address, headers)
        self.clock = clock
        self.random_bytes = random_bytes
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.on_clock_skew = on_clock_skew

    def close(self) -> None:
        self.transport.close()

    @property
    def cluster_path(self) -> str:
        return f"{API_PREFIX}/clusters/{self.keys.cluster_address}"

    def hello(self) -> IPAddress | None:
        """This node's address as the service sees it."""
        return self.hello_info().client_address

    def hello_info(self) -> Hello:
        """This node's address as the service sees it, and the service's STUN reflectors
        (none from a service that predates them)."""
        body = self._request("GET", f"{self.cluster_path}/hello")
        peer = self.transport.peer_address
        try:
            service_address = parse_address(peer, "peer") if peer else None
        except ValueError:
            service_address = None
        client_address = self._client_address(body.get("client_address"))
        try:
            stun = parse_stun_reflectors(body.get("stun"), self.base_url)
        except DiscoveryError as error:
            return Hello(client_address, (), service_address, str(error))
        return Hello(client_address, stun, service_address)

    def _client_address(self, address: object) -> IPAddress | None:
        if address is None:
            return None
        if not isinstance(address, str) or len(address) > 64:
            raise DiscoveryError(f"{self.base_url}: hello returned no address")
        try:
            return parse_address(address, "client_address")
        except ValueError:
            raise DiscoveryError(f"{self.base_url}: hello returned {address[:64]!r}") from None

    def put(
        self,
        affiliate: str,
        data: bytes,
        endpoints: list[bytes],
        ttl: int,
        deadline: float | None = None,
    ) -> int:
        """Store a sealed record; with `deadline`, one attempt bounded by it (for leaving
        while the service is stopping)."""
        document = {
            "data": encode_blob(data),
            "endpoints": [encode_blob(e) for e in endpoints],
            "ttl": ttl,
        }
        path = f"{self.cluster_path}/affiliates/{affiliate}"
        body = self._request("PUT", path, document, deadline=deadline)
        return _revision(body, self.base_url)

    def add_endpoints(self, affiliate: str, endpoints: list[bytes], ttl: int) -> int:
        document = {"endpoints": [encode_blob(e) for e in endpoints], "ttl": ttl}
        path = f"{self.cluster_path}/affiliates/{affiliate}/endpoints"
        return _revision(self._request("POST", path, document), self.base_url)

    def delete(self, affiliate: str) -> int:
        body = self._request("DELETE", f"{self.cluster_path}/affiliates/{affiliate}")
        return _revision(body, self.base_url)

    def listing(self, since: int | None = None, wait: float = 0.0) -> Listing:
        return self.fetch_listing(since, wait)[0]

    def fetch_listing(
        self, since: int | None = None, wait: float = 0.0
    ) -> tuple[Listing, list[str]]:
        """The listing, and a line for each listed affiliate that was malformed (left out)."""
        target = f"{self.cluster_path}/affiliates"
        if since is not None:
            target += f"?since={since}&wait={wait:g}"
        body = self._request("GET", target, extra_timeout=wait)
        try:
            return parse_listing_answer(body)
        except ValueError as error:
            raise DiscoveryError(f"{self.base_url}: malformed listing: {error}") from None

    def _request(
        self,
        method: str,
        target: str,
        document: Any = None,
        extra_timeout: float = 0.0,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        """Send, retrying what failed in transit (every request here is idempotent); a 4xx is
        an answer and is not retried, except 429 after the time the service asks for."""
        payload = b"" if document is None else json.dumps(document).encode()
        timeout, attempts = EXCHANGE_DEADLINE + extra_timeout, ATTEMPTS
        if deadline is not None:
            timeout, attempts = deadline, 1
        delay = 0.5
        for attempt in range(1, attempts + 1):
            try:
                return self._send(method, target, payload, timeout)
            except DiscoveryRejected as error:
                if error.status != 429 or attempt == attempts:
                    raise
                self.sleep(min(MAX_RETRY_AFTER, max(error.retry_after, delay)))
            except DiscoveryError:
                if attempt == attempts:
                    raise
                self.sleep(delay * (0.5 + self.rng.random()))
            delay *= 2
        raise AssertionError("unreachable")

    def _send(self, method: str, target: str, payload: bytes, deadline: float) -> dict[str, Any]:
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
        answer = self.transport.exchange(
            method, target, payload, headers, deadline, MAX_ANSWER_BYTES
        )
        skew = clock_skew(answer.headers.get("date"), self.clock())
        if skew is not None and self.on_clock_skew is not None:
            self.on_clock_skew(skew)
        status = answer.status
        if 300 <= status < 400:
            raise DiscoveryError(
                f"{self.base_url}: answered {method} {target} with a redirect (HTTP {status}); "
                "not followed: it would carry this request's signature elsewhere"
            )
        try:
            body = boundedjson.loads(answer.body, MAX_ANSWER_BYTES, MAX_ANSWER_DEPTH)
        except ValueError:
            body = None
        if 400 <= status < 500:
            detail = body.get("error", {}) if isinstance(body, dict) else {}
            detail = detail if isinstance(detail, dict) else {}
            field, message = detail.get("field"), detail.get("message", answer.reason)
            rejected = DiscoveryRejected(
                status,
                field[:64] if isinstance(field, str) else None,
                str(message)[:200],
            )
            rejected.retry_after = parse_retry_after(answer.headers.get("retry-after"))
            raise rejected
        if status != 200 or not isinstance(body, dict):
            raise DiscoveryError(f"{self.base_url}: HTTP {status} for {method} {target}")
        return body


def parse_stun_reflectors(value: object, base_url: str) -> tuple[StunReflector, ...]:
    """The `stun` list of a hello answer: at most MAX_STUN_REFLECTORS entries, each
    {"port": 1-65535} with an optional "address" (an IP literal another host could reach);
    anything else is refused whole, with a message naming what was wrong."""
    if value is None:
        return ()
    where = f"{base_url}: hello's stun"
    if not isinstance(value, list):
        raise DiscoveryError(f"{where} is not a list")
    if len(value) > MAX_STUN_REFLECTORS:
        raise DiscoveryError(
            f"{where} names {len(value)} reflectors, at most {MAX_STUN_REFLECTORS}"
        )
    reflectors: dict[StunReflector, None] = {}
    for index, entry in enumerate(value):
        if not isinstance(entry, dict) or not set(entry) <= {"address", "port"}:
            raise DiscoveryError(f"{where}[{index}] is not {{address?, port}}")
        port = entry.get("port")
        if type(port) is not int or not 1 <= port <= 65535:
            raise DiscoveryError(f"{where}[{index}].port is not a port number")
        text = entry.get("address")
        address = None
        if text is not None:
            if not isinstance(text, str) or len(text) > 64:
                raise DiscoveryError(f"{where}[{index}].address is not an IP address")
            try:
                address = parse_address(text, "address")
            except ValueError:
                raise DiscoveryError(f"{where}[{index}].address {text[:64]!r} refused") from None
            if not reachable_unicast(address):
                raise DiscoveryError(f"{where}[{index}].address {address} cannot be reached")
        reflectors[StunReflector(address, port)] = None
    return tuple(reflectors)


def clock_skew(date: str | None, now: float) -> float | None:
    """Seconds the clock that wrote an HTTP Date header is ahead of `now` (negative: behind),
    or None when there is no believable date. The header has whole seconds, written before
    the answer travelled, so the figure is good to a second or two plus the transit time:
    plenty against a bound of minutes."""
    if date is None or len(date) > MAX_DATE_LENGTH or not date.isascii():
        return None
    try:
        when = email.utils.parsedate_to_datetime(date)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": the writer did not know its time zone
        return None
    try:
        skew = when.timestamp() - now
    except (OverflowError, OSError, ValueError):
        return None
    return skew if math.isfinite(skew) else None


def parse_retry_after(value: str | None) -> float:
    """Seconds to wait from a Retry-After header: only 1 to 6 ASCII digits count (an HTTP
    date or anything else is ignored), and no more than MAX_RETRY_AFTER is believed."""
    if value is None or not 1 <= len(value) <= 6 or not value.isascii() or not value.isdigit():
        return 0.0
    return min(MAX_RETRY_AFTER, float(value))


def _revision(body: dict[str, Any], base_url: str) -> int:
    revision = body.get("revision")
    if not isinstance(revision, int):
        raise DiscoveryError(f"{base_url}: answer has no revision")
    return revision
