"""Identity: generated once, persisted privately and atomically, ULA derived as documented."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import stat
import subprocess
from pathlib import Path

import pytest

from kubespan.errors import StateFileError
from kubespan.identity import (
    IDENTITY_FILE,
    LinkHardware,
    eui64_interface_id,
    first_physical_mac,
    load_or_create_identity,
    node_ula,
    parse_mac,
    ula_prefix,
)


def test_identity_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = load_or_create_identity(state)
    path = state / IDENTITY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    second = load_or_create_identity(state)
    assert second == first
    assert len(base64.b64decode(first.public_key_b64)) == 32
    assert first.private_key_b64 not in repr(first)


def test_private_key_is_stored_clamped(tmp_path: Path) -> None:
    identity = load_or_create_identity(tmp_path, random_bytes=lambda n: b"\xff" * n)
    key = identity.private_key
    assert key[0] & 7 == 0
    assert key[31] & 0x80 == 0
    assert key[31] & 0x40


def test_public_key_matches_wg_pubkey(tmp_path: Path) -> None:
    wg = subprocess.run(["which", "wg"], capture_output=True, check=False)
    if wg.returncode != 0:
        pytest.fail("wireguard-tools (wg) is required for this test; run .ci/run's installs")
    identity = load_or_create_identity(tmp_path)
    out = subprocess.run(
        ["wg", "pubkey"], input=identity.private_key_b64.encode(), capture_output=True, check=True
    )
    assert out.stdout.decode().strip() == identity.public_key_b64


def test_loose_mode_is_tightened(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path)
    (tmp_path / IDENTITY_FILE).chmod(0o644)
    load_or_create_identity(tmp_path)
    assert stat.S_IMODE((tmp_path / IDENTITY_FILE).stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"{not json", "corrupt identity file"),
        (b"", "corrupt identity file"),
        (b'{"version": 2}', "version 1 expected"),
        (b'{"version": 1, "node_id": "", "private_key": "x"}', "node_id"),
        (b'{"version": 1, "node_id": "abc", "private_key": "c2hvcnQ="}', "private_key"),
    ],
)
def test_corrupt_identity_is_refused_not_replaced(
    tmp_path: Path, content: bytes, fragment: str
) -> None:
    path = tmp_path / IDENTITY_FILE
    path.write_bytes(content)
    with pytest.raises(StateFileError) as caught:
        load_or_create_identity(tmp_path)
    assert str(path) in str(caught.value)
    assert fragment in str(caught.value)
    assert path.read_bytes() == content


def test_identity_file_is_json_with_version(tmp_path: Path) -> None:
    identity = load_or_create_identity(tmp_path)
    document = json.loads((tmp_path / IDENTITY_FILE).read_text())
    assert document["version"] == 1
    assert document["node_id"] == identity.node_id


def test_ula_prefix_follows_the_reference_derivation() -> None:
    cluster_id = "Yk8qw1zP2eJZyrI8WFKAbcXY3+1Xj1nyGiurxQkZW1Q="
    digest = hashlib.sha256(cluster_id.encode()).digest()
    prefix = ula_prefix(cluster_id)
    packed = prefix.network_address.packed
    assert prefix.prefixlen == 64
    assert packed[0] == 0xFD
    assert packed[7] == 0x02
    assert packed[1:7] == digest[17:23]
    assert packed[8:] == bytes(8)


def test_eui64_of_the_rfc_4291_example() -> None:
    # RFC 4291 appendix A: 34-56-78-9A-BC-DE -> 3656:78ff:fe9a:bcde
    assert eui64_interface_id(parse_mac("34:56:78:9a:bc:de")).hex() == "365678fffe9abcde"


def test_node_ula_combines_prefix_and_mac() -> None:
    address = node_ula("cluster", parse_mac("52:54:00:12:34:56"))
    assert address in ula_prefix("cluster")
    assert address.packed[8:].hex() == "505400fffe123456"
    assert isinstance(address, ipaddress.IPv6Address)


def test_first_physical_interface_by_name() -> None:
    links = (
        LinkHardware("lo", "00:00:00:00:00:00", False),
        LinkHardware("kubespan", "", False),
        LinkHardware("ens4", "52:54:00:00:00:02", True),
        LinkHardware("ens3", "52:54:00:00:00:01", True),
        LinkHardware("br0", "52:54:00:00:00:09", False),
    )
    assert first_physical_mac(links) == parse_mac("52:54:00:00:00:01")
    assert first_physical_mac(links[:2]) is None


def test_the_node_id_is_derived_from_the_wireguard_key(tmp_path: Path) -> None:
    from kubespan.identity import node_id_for

    identity = load_or_create_identity(tmp_path)
    assert identity.node_id == node_id_for(identity.public_key)
    assert identity.node_id.isalnum() and len(identity.node_id) <= 64
    # A file written before, with a random node id, is rewritten with the derived one.
    path = tmp_path / "identity.json"
    document = json.loads(path.read_text())
    document["node_id"] = "RandomOldNodeId42"
    path.write_text(json.dumps(document))
    again = load_or_create_identity(tmp_path)
    assert again == identity
    assert json.loads(path.read_text())["node_id"] == identity.node_id
