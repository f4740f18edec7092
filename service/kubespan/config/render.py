"""Machine configs as documents: the effective config (defaults filled in) and new configs."""

from __future__ import annotations

import base64
from typing import Any

import yaml

from kubespan.config.model import MachineConfig

REDACTED = "(redacted)"


def effective_document(config: MachineConfig, show_secret: bool = False) -> dict[str, Any]:
    """The config as kubespan runs it, in the machine config's own shape."""
    kubespan = config.kubespan
    discovery = config.cluster.discovery
    secret = base64.b64encode(config.cluster.secret).decode() if show_secret else REDACTED
    return {
        "version": "v1alpha1",
        "machine": {
            "network": {
                "kubespan": {
                    "enabled": kubespan.enabled,
                    "advertiseKubernetesNetworks": kubespan.advertise_kubernetes_networks,
                    "allowDownPeerBypass": kubespan.allow_down_peer_bypass,
                    "harvestExtraEndpoints": kubespan.harvest_extra_endpoints,
                    "mtu": kubespan.mtu,
                    "listenPort": kubespan.listen_port,
                    "filters": {
                        "endpoints": [
                            ("!" if f.negate else "") + str(f.network)
                            for f in kubespan.endpoint_filters
                        ],
                        "excludeAdvertisedNetworks": [
                            str(n) for n in kubespan.exclude_advertised_networks
                        ],
                    },
                    "extraAnnouncedEndpoints": [str(e) for e in kubespan.extra_announced_endpoints],
                    "endpointTrialSeconds": kubespan.endpoint_trial_seconds,
                    "stunServers": [
                        f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in kubespan.stun_servers
                    ],
                    "metricsListen": (
                        str(kubespan.metrics_listen) if kubespan.metrics_listen else None
                    ),
                }
            }
        },
        "cluster": {
            "id": config.cluster.id,
            "secret": secret if config.cluster.secret else None,
            "network": {
                "podSubnets": [str(n) for n in config.cluster.pod_subnets],
                "nodeSubnets": [str(n) for n in config.cluster.node_subnets],
            },
            "discovery": {
                "enabled": discovery.enabled,
                "registries": {
                    "service": {
                        "endpoints": list(discovery.service_endpoints),
                        "disabled": discovery.service_disabled,
                    },
                    "kubernetes": {"disabled": True},
                },
            },
        },
    }


def new_config_document(discovery_url: str, cluster_id: str, secret: str) -> dict[str, Any]:
    """The smallest config that turns kubespan on."""
    return {
        "version": "v1alpha1",
        "machine": {"network": {"kubespan": {"enabled": True}}},
        "cluster": {
            "id": cluster_id,
            "secret": secret,
            "discovery": {
                "enabled": True,
                "registries": {"service": {"endpoint": discovery_url}},
            },
        },
    }


def to_yaml(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False)
