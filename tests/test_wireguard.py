"""Our WireGuard dump parser (apply/wireguard.py): messages pyroute2 encoded as the kernel sends
them, hand-made ones (peers split across messages, no endpoint), and malformed bytes, refused
with a NetlinkFormatError."""

from __future__ import annotations

import base64
import errno
import ipaddress
import socket
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink.generic.wireguard import wgmsg

from kubespan.apply.netlink import (
    HEADER,
    Message,
    NetlinkFormatError,
    attributes,
    encode_attribute,
)
from kubespan.apply.wireguard import (
    CTRL_ATTR_FAMILY_ID,
    GENL_ID_CTRL,
    WG_CMD_SET_DEVICE,
    WGALLOWEDIP_A_CIDR_MASK,
    WGALLOWEDIP_A_FAMILY,
    WGALLOWEDIP_A_IPADDR,
    WGDEVICE_A_FWMARK,
    WGDEVICE_A_LISTEN_PORT,
    WGDEVICE_A_PEERS,
    WGDEVICE_A_PRIVATE_KEY,
    WGPEER_A_ALLOWEDIPS,
    WGPEER_A_ENDPOINT,
    WGPEER_A_LAST_HANDSHAKE_TIME,
    WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL,
    WGPEER_A_PRESHARED_KEY,
    WGPEER_A_PUBLIC_KEY,
    WGPEER_A_RX_BYTES,
    WGPEER_A_TX_BYTES,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    WGPEER_F_UPDATE_ONLY,
    DeviceInfo,
    DeviceParser,
    WireGuardNetlink,
    genl_payload,
    parse_endpoint,
    set_device_request,
    set_peer_request,
    set_peer_requests,
)
from kubespan.netaddr import Endpoint, network_sort_key

NESTED = 0x8000


def nest(kind: int, parts: list[bytes]) -> bytes:
    return encode_attribute(kind | NESTED, b"".join(parts))


def endpoint(text: str | None) -> bytes:
    if text is None:
        return struct.pack("=H", socket.AF_UNSPEC) + bytes(14)
    address, port = text.rsplit(":", 1)
    ip = ipaddress.ip_address(address.strip("[]"))
    if ip.version == 4:
        return (
            struct.pack("=H", socket.AF_INET) + struct.pack("!H", int(port)) + ip.packed + bytes(8)
        )
    return (
        struct.pack("=H", socket.AF_INET6)
        + struct.pack("!HI", int(port), 0)
        + ip.packed
        + struct.pack("=I", 0)
    )


def allowed(network: str) -> bytes:
    net = ipaddress.ip_network(network)
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    return nest(
        0,
        [
            encode_attribute(WGALLOWEDIP_A_FAMILY, struct.pack("=H", family)),
            encode_attribute(WGALLOWEDIP_A_IPADDR, net.network_address.packed),
            encode_attribute(WGALLOWEDIP_A_CIDR_MASK, bytes([net.prefixlen])),
        ],
    )


def peer(
    key: int,
    *,
    full: bool = True,
    psk: bytes = bytes(32),
    at: str | None = "192.0.2.7:51820",
    handshake: int = 0,
    networks: tuple[str, ...] = ("fd00::1/128",),
    rx: int = 12345,
    tx: int = 1 << 40,
    keepalive: int = 25,
    omit: tuple[int, ...] = (),
    reverse: bool = False,
) -> bytes:
    """A peer's dump; `omit`: attribute types left out; `reverse`: the attributes after the
    public key in the reverse order (the kernel's order is not a contract)."""
    parts = []
    if full:
        parts += [
            encode_attribute(WGPEER_A_PRESHARED_KEY, psk),
            encode_attribute(WGPEER_A_LAST_HANDSHAKE_TIME, struct.pack("=qq", handshake, 5000)),
            encode_attribute(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, struct.pack("=H", keepalive)),
            encode_attribute(WGPEER_A_TX_BYTES, struct.pack("=Q", tx)),
            encode_attribute(WGPEER_A_RX_BYTES, struct.pack("=Q", rx)),
            encode_attribute(WGPEER_A_ENDPOINT, endpoint(at)),
        ]
    parts.append(nest(WGPEER_A_ALLOWEDIPS, [allowed(n) for n in networks]))
    parts = [part for part in parts if struct.unpack_from("=H", part, 2)[0] not in omit]
    if reverse:
        parts.reverse()
    return nest(0, [encode_attribute(WGPEER_A_PUBLIC_KEY, bytes([key]) * 32), *parts])


def device_message(peers: list[bytes], first: bool = True, private: bytes = b"\x07" * 32) -> bytes:
    attrs: list[tuple[int, bytes]] = []
    if first:
        attrs += [
            (WGDEVICE_A_LISTEN_PORT, struct.pack("=H", 51820)),
            (WGDEVICE_A_FWMARK, struct.pack("=I", 0x20)),
            (WGDEVICE_A_PRIVATE_KEY, private),
        ]
    return genl_payload(0, 1, attrs) + encode_attribute(WGDEVICE_A_PEERS | NESTED, b"".join(peers))


NETS = ("10.244.1.0/24", "fd00::2/128", "192.0.2.0/25")
SPLIT = [
    device_message([peer(4, networks=("10.0.0.0/24",)), peer(5)]),
    device_message([peer(5, full=False, networks=("10.1.0.0/16", "10.2.0.0/16"))], first=False),
]


def test_hand_made_dumps_read_as_the_kernel_means_them() -> None:
    parser = DeviceParser()
    device = parser.device([device_message([peer(1, handshake=1_700_000_000)])])
    assert (device.listen_port, device.fwmark) == (51820, 0x20)
    assert device.private_key == base64.b64encode(b"\x07" * 32).decode()
    (one,) = device.peers.values()
    assert one.public_key == base64.b64encode(bytes([1]) * 32).decode()
    assert (str(one.endpoint), one.keepalive, one.preshared_key) == ("192.0.2.7:51820", 25, "")
    assert (one.rx_bytes, one.tx_bytes, one.last_handshake) == (
        12345,
        1 << 40,
        1_700_000_000.000005,
    )
    assert [str(n) for n in one.allowed_ips] == ["fd00::1/128"]

    device = parser.device(
        [device_message([peer(2, psk=b"\x09" * 32, at="[2001:db8::5]:4500", networks=NETS)])]
    )
    (two,) = device.peers.values()
    assert str(two.endpoint) == "[2001:db8::5]:4500"
    assert two.preshared_key == base64.b64encode(b"\x09" * 32).decode()
    assert [str(n) for n in two.allowed_ips] == ["10.244.1.0/24", "192.0.2.0/25", "fd00::2/128"]

    device = parser.device([device_message([peer(3, at=None)], private=bytes(32))])
    (three,) = device.peers.values()
    assert device.private_key is None
    assert (three.endpoint, three.last_handshake) == (None, None)

    assert parser.device([device_message([])]).peers == {}


def test_a_repeated_allowed_ip_list_is_parsed_once_and_still_right() -> None:
    parser = DeviceParser()
    payloads = SPLIT
    first = parser.device(payloads)
    again = parser.device(payloads)
    assert again == first
    split = first.peers[base64.b64encode(bytes([5]) * 32).decode()]
    assert [str(n) for n in split.allowed_ips] == ["10.1.0.0/16", "10.2.0.0/16", "fd00::1/128"]
    assert (split.rx_bytes, split.keepalive) == (12345, 25)  # from the first part


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00",  # shorter than the generic netlink header
        genl_payload(0, 1, [(WGDEVICE_A_LISTEN_PORT, b"\x01")]),  # a port of one byte
        device_message([nest(0, [encode_attribute(WGPEER_A_RX_BYTES, bytes(8))])]),  # no key
        device_message([nest(0, [encode_attribute(WGPEER_A_PUBLIC_KEY, bytes(31))])]),
        device_message(
            [
                nest(
                    0,
                    [
                        encode_attribute(WGPEER_A_PUBLIC_KEY, bytes(32)),
                        nest(WGPEER_A_ALLOWEDIPS, [nest(0, [])]),  # an allowed IP of nothing
                    ],
                )
            ]
        ),
        genl_payload(0, 1, []) + b"\xff\xff\x08\x00",  # an attribute longer than the message
    ],
)
def test_malformed_dumps_are_refused_as_such(payload: bytes) -> None:
    with pytest.raises(NetlinkFormatError):
        DeviceParser().device([payload])


def test_an_endpoint_of_port_zero_or_unknown_family_is_no_endpoint() -> None:
    assert parse_endpoint(endpoint("192.0.2.1:0")) is None
    assert parse_endpoint(struct.pack("=H", 99) + bytes(14)) is None
    with pytest.raises(NetlinkFormatError):
        parse_endpoint(b"\x02")


# --- messages pyroute2 encoded, as the kernel sends them ------------------------------------

PRIVATE = base64.b64encode(bytes([1]) * 32)
PEER = base64.b64encode(bytes([2]) * 32)
PSK = base64.b64encode(bytes([3]) * 32)
ZERO = base64.b64encode(bytes(32))


def nla_ip(family: int, address: str, mask: int) -> dict[str, Any]:
    return {
        "attrs": [
            ["WGALLOWEDIP_A_FAMILY", family],
            ["WGALLOWEDIP_A_IPADDR", socket.inet_pton(family, address)],
            ["WGALLOWEDIP_A_CIDR_MASK", mask],
        ]
    }


def dump(device_attrs: list[Any], peers: list[list[Any]]) -> bytes:
    """A device message encoded as the kernel would send it: its generic netlink payload."""
    msg = wgmsg()
    msg["cmd"] = 0
    msg["version"] = 1
    msg["header"]["type"] = 20
    msg["attrs"] = [["WGDEVICE_A_IFNAME", "kubespan"], *device_attrs]
    if peers:
        msg["attrs"].append(["WGDEVICE_A_PEERS", [{"attrs": p} for p in peers]])
    msg.encode()
    return bytes(msg.data)[HEADER.size :]


def parse_pyroute2_dump(payloads: list[bytes]) -> DeviceInfo:
    return DeviceParser().device(payloads)


def peer_attrs(extra_ips: list[dict[str, Any]], psk: bytes = PSK) -> list[Any]:
    return [
        ["WGPEER_A_PUBLIC_KEY", PEER],
        ["WGPEER_A_PRESHARED_KEY", psk],
        ["WGPEER_A_ENDPOINT", {"addr": "2001:db8::5", "port": 51820}],
        ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 25],
        ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 1_700_000_000, "tv_nsec": 500_000_000}],
        ["WGPEER_A_RX_BYTES", 100],
        ["WGPEER_A_TX_BYTES", 200],
        ["WGPEER_A_ALLOWEDIPS", extra_ips],
    ]


def test_device_and_peer_fields() -> None:
    message = dump(
        [
            ["WGDEVICE_A_PRIVATE_KEY", PRIVATE],
            ["WGDEVICE_A_LISTEN_PORT", 51820],
            ["WGDEVICE_A_FWMARK", 0x20],
        ],
        [
            peer_attrs(
                [
                    nla_ip(socket.AF_INET, "192.0.2.5", 32),
                    nla_ip(socket.AF_INET6, "fd00::5", 128),
                ]
            )
        ],
    )
    device = parse_pyroute2_dump([message])
    assert device.private_key == PRIVATE.decode()
    assert device.listen_port == 51820
    assert device.fwmark == 0x20
    (peer,) = device.peers.values()
    assert peer.public_key == PEER.decode()
    assert peer.preshared_key == PSK.decode()
    assert str(peer.endpoint) == "[2001:db8::5]:51820"
    assert peer.keepalive == 25
    assert peer.last_handshake == 1_700_000_000.5
    assert (peer.rx_bytes, peer.tx_bytes) == (100, 200)
    assert [str(n) for n in peer.allowed_ips] == ["192.0.2.5/32", "fd00::5/128"]


def test_zero_keys_and_missing_handshake_mean_unset() -> None:
    attrs = [a for a in peer_attrs([], psk=ZERO) if a[0] != "WGPEER_A_LAST_HANDSHAKE_TIME"]
    attrs.append(["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 0, "tv_nsec": 0}])
    device = parse_pyroute2_dump([dump([["WGDEVICE_A_PRIVATE_KEY", ZERO]], [attrs])])
    assert device.private_key is None
    (peer,) = device.peers.values()
    assert peer.preshared_key == ""
    assert peer.last_handshake is None


def test_peer_split_across_messages_is_merged() -> None:
    first = dump(
        [["WGDEVICE_A_LISTEN_PORT", 51820]],
        [peer_attrs([nla_ip(socket.AF_INET, "10.0.0.0", 8)])],
    )
    second = dump(
        [],
        [
            [
                ["WGPEER_A_PUBLIC_KEY", PEER],
                ["WGPEER_A_ALLOWEDIPS", [nla_ip(socket.AF_INET, "192.0.2.0", 24)]],
            ]
        ],
    )
    device = parse_pyroute2_dump([first, second])
    (peer,) = device.peers.values()
    assert [str(n) for n in peer.allowed_ips] == ["10.0.0.0/8", "192.0.2.0/24"]
    assert peer.keepalive == 25


# --- set requests, decoded by pyroute2 as the kernel would read them -----------------------


def hex_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """pyroute2 shows an allowed IP's address as hex bytes, colon separated."""
    return ipaddress.ip_address(bytes.fromhex(text.replace(":", "")))


def pyroute2_decoded(payload: bytes) -> Any:
    message = wgmsg(HEADER.pack(HEADER.size + len(payload), 30, 5, 1, 0) + payload)
    message.decode()
    return message


def test_a_device_request_carries_what_is_set_and_nothing_else() -> None:
    message = pyroute2_decoded(set_device_request("kubespan", PRIVATE.decode(), 51820, 0x20))
    assert message["cmd"] == WG_CMD_SET_DEVICE
    assert message.get_attr("WGDEVICE_A_IFNAME") == "kubespan"
    assert message.get_attr("WGDEVICE_A_PRIVATE_KEY") == PRIVATE
    assert message.get_attr("WGDEVICE_A_LISTEN_PORT") == 51820
    assert message.get_attr("WGDEVICE_A_FWMARK") == 0x20
    only_port = pyroute2_decoded(set_device_request("kubespan", None, 51821, None))
    assert only_port.get_attr("WGDEVICE_A_PRIVATE_KEY") is None
    assert only_port.get_attr("WGDEVICE_A_FWMARK") is None


@pytest.mark.parametrize("at", ["192.0.2.7:51820", "[2001:db8::5]:4500"])
def test_a_peer_request_reads_back_as_asked(at: str) -> None:
    endpoint = Endpoint.parse(at)
    networks = tuple(ipaddress.ip_network(n) for n in ("10.244.1.0/24", "fd00::2/128"))
    payload = set_peer_request(
        "kubespan",
        PEER.decode(),
        preshared_key=PSK.decode(),
        endpoint=endpoint,
        keepalive=25,
        allowed_ips=networks,
    )
    (peer,) = pyroute2_decoded(payload).get_attr("WGDEVICE_A_PEERS")
    assert peer.get_attr("WGPEER_A_PUBLIC_KEY") == PEER
    assert peer.get_attr("WGPEER_A_PRESHARED_KEY") == PSK
    assert peer.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REPLACE_ALLOWEDIPS
    sockaddr = peer.get_attr("WGPEER_A_ENDPOINT")
    assert Endpoint(ipaddress.ip_address(sockaddr["addr"]), sockaddr["port"]) == endpoint
    assert peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") == 25
    allowed = [
        ipaddress.ip_network(
            (hex_address(a.get_attr("WGALLOWEDIP_A_IPADDR")), a.get_attr("WGALLOWEDIP_A_CIDR_MASK"))
        )
        for a in peer.get_attr("WGPEER_A_ALLOWEDIPS")
    ]
    assert tuple(allowed) == networks
    # And our own reader sees the same peer in it (the set and dump shapes agree).
    assert DeviceParser().peer(_peer_nest(payload)).endpoint == endpoint


def _peer_nest(payload: bytes) -> bytes:
    peers = dict(attributes(payload[4:]))[WGDEVICE_A_PEERS]
    return attributes(peers)[0][1]


def test_remove_update_only_and_no_preshared_key() -> None:
    removal = pyroute2_decoded(set_peer_request("kubespan", PEER.decode(), remove=True))
    (peer,) = removal.get_attr("WGDEVICE_A_PEERS")
    assert peer.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REMOVE_ME
    nudge = pyroute2_decoded(
        set_peer_request("kubespan", PEER.decode(), keepalive=0, update_only=True)
    )
    (peer,) = nudge.get_attr("WGDEVICE_A_PEERS")
    assert peer.get_attr("WGPEER_A_FLAGS") == WGPEER_F_UPDATE_ONLY
    assert peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") == 0
    assert peer.get_attr("WGPEER_A_ALLOWEDIPS") is None
    cleared = set_peer_request("kubespan", PEER.decode(), preshared_key="")
    assert DeviceParser().peer(_peer_nest(cleared)).preshared_key == ""  # zeros: none


def test_a_key_that_is_not_32_bytes_of_base64_is_refused() -> None:
    with pytest.raises(ValueError):
        set_peer_request("kubespan", "bm90IGEga2V5")
    with pytest.raises(ValueError):
        set_device_request("kubespan", "not base64!", None, None)


# --- limits, and a kernel that changes under us --------------------------------------------


def test_a_peer_with_more_allowed_ips_than_one_message_holds_is_set_in_several() -> None:
    networks = tuple(ipaddress.ip_network(f"fd00:{i:x}::/64") for i in range(2500))
    requests = set_peer_requests("kubespan", PEER.decode(), keepalive=25, allowed_ips=networks)
    assert len(requests) == 3
    assert all(len(r) < 65536 for r in requests)
    decoded = [pyroute2_decoded(r).get_attr("WGDEVICE_A_PEERS")[0] for r in requests]
    assert decoded[0].get_attr("WGPEER_A_FLAGS") == WGPEER_F_REPLACE_ALLOWEDIPS
    assert decoded[0].get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") == 25
    for more in decoded[1:]:  # added to the peer only if it exists, never replacing
        assert more.get_attr("WGPEER_A_FLAGS") == WGPEER_F_UPDATE_ONLY
    parser = DeviceParser()
    sent = [n for r in requests for n in parser.peer(_peer_nest(r)).allowed_ips]
    assert sorted(sent, key=network_sort_key) == sorted(networks, key=network_sort_key)
    assert len(set_peer_requests("kubespan", PEER.decode(), allowed_ips=networks[:10])) == 1
    assert len(set_peer_requests("kubespan", PEER.decode(), allowed_ips=None)) == 1


def test_an_attribute_too_long_for_netlink_is_refused_as_a_value_error() -> None:
    with pytest.raises(NetlinkFormatError):
        encode_attribute(1, bytes(65536))


def test_the_allowed_ip_lists_kept_are_only_the_last_dumps() -> None:
    parser = DeviceParser()
    parser.device(SPLIT)
    # Another handshake each time: the peer is parsed again (its bytes changed), and its
    # allowed IPs are found kept.
    parser.device([device_message([peer(7, handshake=1, networks=("10.9.0.0/16",))])])
    parser.device([device_message([peer(7, handshake=2, networks=("10.9.0.0/16",))])])
    assert len(parser._allowed) == 1


def test_a_peer_that_comes_back_byte_for_byte_is_not_parsed_again() -> None:
    """A quiet peer's dump is the same bytes at every pass; a handshake changes them."""
    parser = DeviceParser()
    first = parser.device([device_message([peer(7), peer(8)])])
    again = parser.device([device_message([peer(7), peer(8, handshake=1_700_000_000)])])
    seven, eight = (base64.b64encode(bytes([n]) * 32).decode() for n in (7, 8))
    assert again.peers[seven] is first.peers[seven]
    assert again.peers[eight] is not first.peers[eight]
    assert again.peers[eight].last_handshake == pytest.approx(1_700_000_000, abs=0.01)
    assert first.peers[eight].last_handshake is None
    parser.device([device_message([peer(8)])])
    assert len(parser._peers) == 1  # what is kept is only the last dump's


def test_a_quiet_peers_allowed_ips_stay_the_same_object_when_it_speaks_again() -> None:
    """What the planner remembers is found by identity: a peer quiet for dumps, then heard
    from, still brings the allowed-IP list parsed before."""
    parser = DeviceParser()
    seven = base64.b64encode(bytes([7]) * 32).decode()
    first = parser.device([device_message([peer(7)])]).peers[seven]
    parser.device([device_message([peer(7)])])
    parser.device([device_message([peer(7)])])
    spoke = parser.device([device_message([peer(7, handshake=1_700_000_000)])]).peers[seven]
    assert spoke is not first and spoke.allowed_ips is first.allowed_ips


class FakeGenl:
    """Stands in for the generic netlink socket: the family id changes once (the module was
    reloaded), and the old one is then refused as the kernel does (ENOENT)."""

    def __init__(self) -> None:
        self.family = 30
        self.gone = False
        self.sent: list[int] = []

    def request(self, kind: int, flags: int, payload: bytes) -> list[Message]:
        self.sent.append(kind)
        if kind == GENL_ID_CTRL:
            attrs = encode_attribute(CTRL_ATTR_FAMILY_ID, struct.pack("=H", self.family))
            return [Message(kind, 0, 1, 0, genl_payload(1, 2, []) + attrs)]
        if kind != self.family or self.gone:
            raise OSError(errno.ENOENT, "No such file or directory")
        return []

    def close(self) -> None:
        pass


def test_a_reloaded_module_is_found_again_under_its_new_family() -> None:
    netlink = WireGuardNetlink.__new__(WireGuardNetlink)
    fake = FakeGenl()
    netlink._socket, netlink._family, netlink._parser = fake, None, DeviceParser()  # type: ignore[assignment]
    netlink.set(set_device_request("kubespan", None, 51820, None))
    fake.family = 31
    netlink.set(set_device_request("kubespan", None, 51821, None))
    assert fake.sent == [GENL_ID_CTRL, 30, 30, GENL_ID_CTRL, 31]
    fake.gone = True  # the module unloaded for good: refused after one more look
    with pytest.raises(OSError):
        netlink.set(set_device_request("kubespan", None, 51822, None))
    assert fake.sent[5:] == [31, GENL_ID_CTRL, 31]


def counting_full_parses(parser: DeviceParser) -> list[bytes]:
    parsed: list[bytes] = []
    full = parser._parse_peer

    def counted(value: bytes) -> tuple[Any, bytes | None]:
        parsed.append(value)
        return full(value)

    parser._parse_peer = counted  # type: ignore[method-assign]
    return parsed


def test_a_peer_whose_counters_alone_changed_has_only_its_counters_read() -> None:
    """A peer that answers: new counters and handshake at every dump, nothing else."""
    parser = DeviceParser()
    parsed = counting_full_parses(parser)
    seven = base64.b64encode(bytes([7]) * 32).decode()
    first = parser.device([device_message([peer(7, rx=1, tx=2)])]).peers[seven]
    later = parser.device([device_message([peer(7, rx=900, tx=800, handshake=1_700_000_000)])])
    assert len(parsed) == 1
    seen = later.peers[seven]
    assert (
        seen
        == DeviceParser()
        .device([device_message([peer(7, rx=900, tx=800, handshake=1_700_000_000)])])
        .peers[seven]
    )
    assert (seen.rx_bytes, seen.tx_bytes) == (900, 800)
    assert seen.last_handshake == pytest.approx(1_700_000_000, abs=0.01)
    assert seen.allowed_ips is first.allowed_ips

    # Anything else changed (here the endpoint, the same length): parsed in full.
    moved = parser.device([device_message([peer(7, rx=901, at="192.0.2.8:51820")])])
    assert len(parsed) == 2
    assert str(moved.peers[seven].endpoint) == "192.0.2.8:51820"
    # Counters back to zero and no handshake: read as such, not as the earlier values.
    fresh = parser.device([device_message([peer(7, rx=0, tx=0, at="192.0.2.8:51820")])])
    assert len(parsed) == 2
    assert (fresh.peers[seven].rx_bytes, fresh.peers[seven].last_handshake) == (0, None)


PEER_FIELDS = st.fixed_dictionaries(
    {
        "key": st.sampled_from([1, 2]),
        "rx": st.sampled_from([0, 1, 1 << 33]),
        "tx": st.sampled_from([0, 7]),
        "handshake": st.sampled_from([0, 1_700_000_000]),
        "keepalive": st.sampled_from([0, 25]),
        "psk": st.sampled_from([bytes(32), b"\x05" * 32]),
        "at": st.sampled_from([None, "192.0.2.7:51820", "192.0.2.8:51820", "[2001:db8::1]:9"]),
        "networks": st.sampled_from([("fd00::1/128",), ("fd00::2/128",), ("10.0.0.0/8",)]),
        "omit": st.sampled_from(
            [
                (),
                (WGPEER_A_RX_BYTES,),
                (WGPEER_A_LAST_HANDSHAKE_TIME,),
                (WGPEER_A_TX_BYTES, WGPEER_A_RX_BYTES),
            ]
        ),
        "reverse": st.booleans(),
    }
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(PEER_FIELDS, max_size=3), min_size=1, max_size=6))
def test_a_parser_that_remembers_reads_every_dump_as_a_fresh_one(
    dumps: list[list[dict[str, Any]]],
) -> None:
    parser = DeviceParser()
    for fields in dumps:
        message = [device_message([peer(**f) for f in fields])]
        assert parser.device(message) == DeviceParser().device(message)
