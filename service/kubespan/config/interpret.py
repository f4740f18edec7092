"""Semantic checks the schema cannot express, and the typed model built from valid data."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

from kubespan.config.model import (
    DEFAULT_ENDPOINT_TRIAL_SECONDS,
    DEFAULT_LISTEN_PORT,
    DEFAULT_MTU,
    DEFAULT_RELAY_PORTS,
    ClusterConfig,
    DiscoveryConfig,
    EndpointFilter,
    KubeSpanConfig,
    MachineConfig,
)
from kubespan.config.yamlsource import LoadedDocument, PathKey, format_path
from kubespan.errors import Problem
from kubespan.netaddr import Endpoint, IPNetwork

KUBESPAN: PathKey = ("machine", "network", "kubespan")
CLUSTER: PathKey = ("cluster",)
DISCOVERY: PathKey = ("cluster", "discovery")
SERVICE: PathKey = ("cluster", "discovery", "registries", "service")

T = TypeVar("T")


class _Reader:
    """Typed access to a document that collects problems instead of raising."""

    def __init__(self, document: LoadedDocument, file: str) -> None:
        self.document = document
        self.file = file
        self.problems: list[Problem] = []

    def get(self, path: PathKey) -> Any:
        node: Any = self.document.data
        for part in path:
            if isinstance(node, dict) and isinstance(part, str):
                node = node.get(part)
            else:
                return None
        return node

    def problem(self, path: PathKey, message: str) -> None:
        line = self.document.line_of(path)
        self.problems.append(Problem(self.file, line, format_path(path), message))

    def typed(self, path: PathKey, kind: type[T], default: T) -> T:
        value = self.get(path)
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return value
        return default

    def optional(self, path: PathKey, parse: Callable[[str], T]) -> T | None:
        value = self.get(path)
        if not isinstance(value, str):
            return None
        try:
            return parse(value)
        except ValueError as error:
            self.problem(path, str(error))
            return None

    def each(self, path: PathKey, parse: Callable[[str], T]) -> tuple[T, ...]:
        items = self.get(path)
        if not isinstance(items, list):
            return ()
        out: list[T] = []
        for index, item in enumerate(items):
            if not isinstance(item, str):
                continue
            try:
                out.append(parse(item))
            except ValueError as error:
                self.problem((*path, index), str(error))
        return tuple(out)


def decode_key32(text: str) -> bytes:
    """Decode standard base64 of exactly 32 bytes; ValueError naming the mistake otherwise."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be standard base64 (generate with `kubespan gen cluster`)") from None
    if len(raw) != 32:
        raise ValueError(f"must be base64 of 32 bytes, not {len(raw)} bytes")
    return raw


def parse_prefix(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as error:
        if "host bits set" in str(error):
            raise ValueError(f"{text!r} has host bits set") from None
        raise ValueError(f"{text!r} is not a CIDR prefix or IP address") from None


def parse_endpoint_filter(text: str) -> EndpointFilter:
    negate = text.startswith("!")
    return EndpointFilter(parse_prefix(text[1:] if negate else text), negate)


def parse_service_url(text: str) -> str:
    parsed = urllib.parse.urlsplit(text.strip())
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"{text!r} must start with http:// or https://")
    if not parsed.hostname:
        raise ValueError(f"{text!r} has no host")
    try:
        _ = parsed.port
    except ValueError:
        raise ValueError(f"{text!r} has an invalid port") from None
    return text.strip().rstrip("/")


def parse_host_port(text: str) -> tuple[str, int]:
    """`host:port` or `[IPv6]:port`, the host a DNS name or an IP address."""
    host, separator, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    elif not host or ":" in host or not separator:
        raise ValueError(f"{text!r} is not HOST:PORT (IPv6 as [ADDRESS]:PORT)")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from 1 to 65535")
    return host, int(port)


def parse_port_range(text: str) -> tuple[int, int]:
    """`FIRST-LAST`, both included, an even count: (first, count)."""
    first, separator, last = text.strip().partition("-")
    if not (separator and first.isdigit() and last.isdigit()):
        raise ValueError(f"{text!r} is not FIRST-LAST")
    low, high = int(first), int(last)
    if not 1 <= low < high <= 65535:
        raise ValueError(f"{text!r}: ports from 1 to 65535, the first below the last")
    if (high - low + 1) % 2:
        raise ValueError(f"{text!r} holds {high - low + 1} ports: two per pair, an even count")
    return low, high - low + 1


def _kubespan(reader: _Reader) -> KubeSpanConfig:
    return KubeSpanConfig(
        enabled=reader.typed((*KUBESPAN, "enabled"), bool, False),
        advertise_kubernetes_networks=reader.typed(
            (*KUBESPAN, "advertiseKubernetesNetworks"), bool, False
        ),
        allow_down_peer_bypass=reader.typed((*KUBESPAN, "allowDownPeerBypass"), bool, False),
        harvest_extra_endpoints=reader.typed((*KUBESPAN, "harvestExtraEndpoints"), bool, False),
        mtu=reader.typed((*KUBESPAN, "mtu"), int, DEFAULT_MTU),
        listen_port=reader.typed((*KUBESPAN, "listenPort"), int, DEFAULT_LISTEN_PORT),
        endpoint_filters=reader.each((*KUBESPAN, "filters", "endpoints"), parse_endpoint_filter),
        exclude_advertised_networks=reader.each(
            (*KUBESPAN, "filters", "excludeAdvertisedNetworks"), parse_prefix
        ),
        extra_announced_endpoints=reader.each(
            (*KUBESPAN, "extraAnnouncedEndpoints"), Endpoint.parse
        ),
        endpoint_trial_seconds=reader.typed(
            (*KUBESPAN, "endpointTrialSeconds"), int, DEFAULT_ENDPOINT_TRIAL_SECONDS
        ),
        stun_servers=reader.each((*KUBESPAN, "stunServers"), parse_host_port),
        metrics_listen=reader.optional((*KUBESPAN, "metricsListen"), Endpoint.parse),
        relay=reader.typed((*KUBESPAN, "relay", "enabled"), bool, False),
        relay_ports=reader.optional((*KUBESPAN, "relay", "ports"), parse_port_range)
        or DEFAULT_RELAY_PORTS,
    )


def _discovery(reader: _Reader) -> DiscoveryConfig:
    endpoints: list[str] = []
    single = reader.get((*SERVICE, "endpoint"))
    if isinstance(single, str):
        try:
            endpoints.append(parse_service_url(single))
        except ValueError as error:
            reader.problem((*SERVICE, "endpoint"), str(error))
    for url in reader.each((*SERVICE, "endpoints"), parse_service_url):
        if url not in endpoints:
            endpoints.append(url)
    return DiscoveryConfig(
        enabled=reader.typed((*DISCOVERY, "enabled"), bool, False),
        service_endpoints=tuple(endpoints),
        service_disabled=reader.typed((*SERVICE, "disabled"), bool, False),
    )


def _cluster(reader: _Reader, discovery: DiscoveryConfig) -> ClusterConfig:
    secret = b""
    for key in ("id", "secret"):
        value = reader.get((*CLUSTER, key))
        if isinstance(value, str) and value:
            try:
                decoded = decode_key32(value)
            except ValueError as error:
                reader.problem((*CLUSTER, key), str(error))
            else:
                if key == "secret":
                    secret = decoded
    cluster_id = reader.typed((*CLUSTER, "id"), str, "").strip()
    pod_subnets = reader.each((*CLUSTER, "network", "podSubnets"), parse_prefix)
    return ClusterConfig(id=cluster_id, secret=secret, discovery=discovery, pod_subnets=pod_subnets)


def _check_enabled_needs(reader: _Reader, discovery: DiscoveryConfig) -> None:
    """kubespan on needs a cluster identity and a discovery service to find members."""
    enabled_line = reader.document.line_of((*KUBESPAN, "enabled"))
    for key in ("id", "secret"):
        if reader.get((*CLUSTER, key)) is None:
            reader.problem(
                (*CLUSTER, key),
                f"is required when kubespan is enabled (see line {enabled_line}); "
                "generate with `kubespan gen cluster`",
            )
    if not discovery.enabled:
        reader.problem(
            (*DISCOVERY, "enabled"),
            "must be true when kubespan is enabled: members are found through discovery",
        )
    if discovery.service_disabled:
        reader.problem(
            (*SERVICE, "disabled"),
            "the discovery service registry is the only registry kubespan supports; "
            "it cannot be disabled while kubespan is enabled",
        )
    elif not discovery.service_endpoints and reader.get((*SERVICE, "endpoint")) is None:
        reader.problem(
            (*SERVICE, "endpoint"),
            "is required when kubespan is enabled: the URL of your discovery service",
        )


def interpret(document: LoadedDocument, file: str) -> tuple[MachineConfig, list[Problem]]:
    """Build the typed config and list every semantic problem (empty when valid)."""
    reader = _Reader(document, file)
    kubespan = _kubespan(reader)
    discovery = _discovery(reader)
    cluster = _cluster(reader, discovery)
    if kubespan.enabled:
        _check_enabled_needs(reader, discovery)
    first, count = kubespan.relay_ports
    if kubespan.relay and first <= kubespan.listen_port < first + count:
        reader.problem(
            (*KUBESPAN, "relay", "ports"),
            f"holds listenPort {kubespan.listen_port}: WireGuard's port cannot be a relay port",
        )
    return MachineConfig(kubespan=kubespan, cluster=cluster), reader.problems
