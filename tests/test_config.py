"""Machine config loading: valid configs build the model; every mistake is named with its line."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from kubespan.config import load_config, parse_config
from kubespan.errors import ConfigError

ID = base64.b64encode(bytes(range(32))).decode()
SECRET = base64.b64encode(bytes(range(32, 64))).decode()

VALID = f"""\
version: v1alpha1
machine:
  install: {{disk: /dev/sda}}
  network:
    hostname: node1
    kubespan:
      enabled: true
      mtu: 1400
      listenPort: 51821
      filters:
        endpoints: ["0.0.0.0/0", "!192.168.0.0/16", "::/0"]
      extraAnnouncedEndpoints: ["203.0.113.7:51820", "[2001:db8::7]:51820"]
cluster:
  id: {ID}
  secret: {SECRET}
  discovery:
    enabled: true
    registries:
      service:
        endpoint: https://discovery.example.net:3000/
        endpoints: [http://192.0.2.1:3000]
"""


def problems_of(text: str | bytes) -> list[tuple[int | None, str, str]]:
    raw = text.encode() if isinstance(text, str) else text
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, "cfg.yaml")
    return [(p.line, p.path, p.message) for p in caught.value.problems]


def test_valid_config_builds_the_model() -> None:
    config = parse_config(VALID.encode(), "cfg.yaml")
    assert config.kubespan.enabled
    assert config.kubespan.mtu == 1400
    assert config.kubespan.listen_port == 51821
    assert [str(f.network) for f in config.kubespan.endpoint_filters] == [
        "0.0.0.0/0",
        "192.168.0.0/16",
        "::/0",
    ]
    assert [f.negate for f in config.kubespan.endpoint_filters] == [False, True, False]
    assert [str(e) for e in config.kubespan.extra_announced_endpoints] == [
        "203.0.113.7:51820",
        "[2001:db8::7]:51820",
    ]
    assert config.cluster.id == ID
    assert config.cluster.secret == bytes(range(32, 64))
    assert config.cluster.discovery.service_endpoints == (
        "https://discovery.example.net:3000",
        "http://192.0.2.1:3000",
    )


def test_defaults_apply_when_fields_are_absent() -> None:
    config = parse_config(b"machine: {network: {kubespan: {enabled: false}}}\n", "cfg.yaml")
    assert not config.kubespan.enabled
    assert config.kubespan.mtu == 1420
    assert config.kubespan.listen_port == 51820


def test_secret_is_not_in_the_repr() -> None:
    config = parse_config(VALID.encode(), "cfg.yaml")
    assert SECRET not in repr(config)
    assert repr(bytes(range(32, 64))) not in repr(config)


@pytest.mark.parametrize(
    ("replace", "by", "line", "path", "fragment"),
    [
        ("mtu: 1400", "mtu: 1000", 8, "machine.network.kubespan.mtu", "at least 1280"),
        ("mtu: 1400", "mtu: big", 8, "machine.network.kubespan.mtu", "must be an integer"),
        (
            "enabled: true\n      mtu",
            "enabld: true\n      mtu",
            7,
            "machine.network.kubespan.enabld",
            "unknown key",
        ),
        (
            "listenPort: 51821",
            "listenPort: 0",
            9,
            "machine.network.kubespan.listenPort",
            "at least 1",
        ),
        (
            '"!192.168.0.0/16"',
            '"!192.168.0.300/16"',
            11,
            "machine.network.kubespan.filters.endpoints[1]",
            "not a CIDR",
        ),
        (
            '"203.0.113.7:51820"',
            '"203.0.113.7"',
            12,
            "machine.network.kubespan.extraAnnouncedEndpoints[0]",
            "ip:port",
        ),
        (f"id: {ID}", "id: not-base64!", 14, "cluster.id", "base64"),
        (f"secret: {SECRET}", "secret: c2hvcnQ=", 15, "cluster.secret", "32 bytes, not 5"),
        (
            "https://discovery.example.net:3000/",
            "discovery.example.net",
            20,
            "cluster.discovery.registries.service.endpoint",
            "http:// or https://",
        ),
        (
            "    enabled: true\n    registries",
            "    enabled: false\n    registries",
            17,
            "cluster.discovery.enabled",
            "must be true when kubespan is enabled",
        ),
        (
            "        endpoints: [http://192.0.2.1:3000]\n",
            "        endpoints: [http://192.0.2.1:3000]\n        port: 3\n",
            22,
            "cluster.discovery.registries.service.port",
            "unknown key",
        ),
    ],
)
def test_each_mistake_is_reported_with_its_line_and_path(
    replace: str, by: str, line: int, path: str, fragment: str
) -> None:
    assert replace in VALID
    found = problems_of(VALID.replace(replace, by, 1))
    assert any(p[0] == line and p[1] == path and fragment in p[2] for p in found), found


def test_every_problem_is_reported_at_once() -> None:
    text = VALID.replace("mtu: 1400", "mtu: 1000").replace(f"id: {ID}", "id: nope")
    found = problems_of(text)
    assert {p[1] for p in found} >= {"machine.network.kubespan.mtu", "cluster.id"}


@pytest.mark.parametrize(
    ("raw", "line", "fragment"),
    [
        (b"", None, "empty"),
        (b"   \n# only a comment\n", None, "empty"),
        (b"- a\n- b\n", 1, "must be a mapping"),
        (b"a: 1\n---\nb: 2\n", 2, "more than one YAML document"),
        (b"machine:\n  network: {}\nmachine: {}\n", 3, "duplicate key"),
        (b"a: &x [1]\nb: *x\n", 2, "aliases are not supported"),
        (b"machine:\n\tnetwork: {}\n", 2, "invalid YAML"),
        (b"machine: \xff\xfe\n", 1, "not valid UTF-8"),
        (b"machine: [\n", 1, "invalid YAML"),
        (b"a: " + b"x" * (1024 * 1024 + 1), None, "larger than"),
    ],
)
def test_malformed_files_are_refused_with_a_message(
    raw: bytes, line: int | None, fragment: str
) -> None:
    found = problems_of(raw)
    assert len(found) == 1
    assert found[0][0] == line
    assert fragment in found[0][2]


def test_alias_bomb_is_refused_quickly() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for index in range(1, 10):
        refs = ", ".join([f"*a{index - 1}"] * 9)
        lines.append(f"a{index}: &a{index} [{refs}]")
    found = problems_of("\n".join(lines) + "\n")
    assert "aliases are not supported" in found[0][2]


def test_enabled_without_cluster_or_endpoint() -> None:
    found = problems_of("machine:\n  network:\n    kubespan:\n      enabled: true\n")
    paths = {p[1] for p in found}
    assert paths == {
        "cluster.id",
        "cluster.secret",
        "cluster.discovery.enabled",
        "cluster.discovery.registries.service.endpoint",
    }


def test_unreadable_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "missing.yaml")
    assert str(tmp_path / "missing.yaml") in str(caught.value)
