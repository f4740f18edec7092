"""The typed machine config: frozen values the rest of kubespan reads."""

from __future__ import annotations

from dataclasses import dataclass, field

from kubespan.netaddr import Endpoint, IPNetwork

DEFAULT_MTU = 1420
DEFAULT_ENDPOINT_TRIAL_SECONDS = 5
DEFAULT_LISTEN_PORT = 51820
# Below the ephemeral range (32768-60999) and Kubernetes' node ports (30000-32767).
DEFAULT_RELAY_PORTS = (29100, 256)  # (first, count): 128 pairs


@dataclass(frozen=True)
class EndpointFilter:
    """One entry of `filters.endpoints`: a prefix that keeps (or, negated, removes) endpoints."""

    network: IPNetwork
    negate: bool


@dataclass(frozen=True)
class KubeSpanConfig:
    enabled: bool = False
    advertise_kubernetes_networks: bool = False
    allow_down_peer_bypass: bool = False
    harvest_extra_endpoints: bool = False
    mtu: int = DEFAULT_MTU
    listen_port: int = DEFAULT_LISTEN_PORT
    endpoint_filters: tuple[EndpointFilter, ...] = ()
    exclude_advertised_networks: tuple[IPNetwork, ...] = ()
    extra_announced_endpoints: tuple[Endpoint, ...] = ()
    endpoint_trial_seconds: int = DEFAULT_ENDPOINT_TRIAL_SECONDS
    stun_servers: tuple[tuple[str, int], ...] = ()  # (host, port) beside discovery's own
    metrics_listen: Endpoint | None = None  # where /metrics is served; None: off
    relay: bool = False  # offer this node as a relay (relay/)
    relay_ports: tuple[int, int] = DEFAULT_RELAY_PORTS  # (first, count)


@dataclass(frozen=True)
class DiscoveryConfig:
    enabled: bool = False
    service_endpoints: tuple[str, ...] = ()
    service_disabled: bool = False


@dataclass(frozen=True)
class ClusterConfig:
    id: str = ""
    secret: bytes = field(default=b"", repr=False)
    discovery: DiscoveryConfig = DiscoveryConfig()
    pod_subnets: tuple[IPNetwork, ...] = ()
    node_subnets: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class MachineConfig:
    kubespan: KubeSpanConfig = KubeSpanConfig()
    cluster: ClusterConfig = ClusterConfig()
