"""Machine config: load YAML with line marks, validate, check semantics, build the model."""

from __future__ import annotations

from pathlib import Path

from kubespan.config.interpret import interpret
from kubespan.config.model import (
    ClusterConfig,
    DiscoveryConfig,
    EndpointFilter,
    KubeSpanConfig,
    MachineConfig,
)
from kubespan.config.schema import machineconfig_schema, schema_problems
from kubespan.config.yamlsource import YamlProblem, load_document
from kubespan.errors import ConfigError, Problem

__all__ = [
    "ClusterConfig",
    "DiscoveryConfig",
    "EndpointFilter",
    "KubeSpanConfig",
    "MachineConfig",
    "load_config",
    "machineconfig_schema",
    "parse_config",
]


def parse_config(raw: bytes, file: str) -> MachineConfig:
    """Parse and validate a machine config; ConfigError lists every problem, sorted by line."""
    try:
        document = load_document(raw, file)
    except YamlProblem as error:
        raise ConfigError([error.problem]) from None
    problems = schema_problems(document, file)
    config, semantic = interpret(document, file)
    seen = {(p.line, p.path) for p in problems}
    problems.extend(p for p in semantic if (p.line, p.path) not in seen)
    if problems:
        problems.sort(key=lambda p: (p.line or 0, p.path))
        raise ConfigError(problems)
    return config


def load_config(path: Path) -> MachineConfig:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(
            [Problem(str(path), None, "", f"cannot read: {error.strerror}")]
        ) from None
    return parse_config(raw, str(path))
