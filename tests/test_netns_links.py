"""The kernel shell's links and addresses (apply/links.py, our rtnetlink codec) against the
host kernel in a namespace the test makes, checked by `ip -j`. The host has no WireGuard:
its link is created and configured in the VM suite; here a veth pair stands in (the host has
no dummy module either)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netlab import Netns, namespaces

pytestmark = pytest.mark.netns

HELPER = str(Path(__file__).with_name("netns_links.py"))
SCOPES = {"global": 0, "site": 200, "link": 253, "host": 254}


@pytest.fixture
def ns() -> Iterator[Netns]:
    with namespaces("links") as made:
        node = made["links"]
        node.ip("link", "add", "eth9", "type", "veth", "peer", "name", "eth9p")
        node.ip("link", "set", "eth9", "address", "02:00:5e:00:00:09", "addrgenmode", "none")
        node.ip("addr", "add", "192.0.2.5/24", "dev", "eth9")
        node.ip("addr", "add", "2001:db8::5/64", "dev", "eth9", "nodad")
        node.ip("link", "set", "eth9", "up")
        yield node


def helper(ns: Netns, *args: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(ns.python(HELPER, *args))
    return result


def ip_json(ns: Netns, *args: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = json.loads(ns.ip("-j", *args))
    return result


def up(link: dict[str, Any]) -> bool:
    return "UP" in link["flags"]


def addresses_by_ip(ns: Netns) -> set[tuple[str, str, int, bool]]:
    return {
        (
            link["ifname"],
            f"{a['local']}/{a['prefixlen']}",
            SCOPES[a["scope"]],
            "UP" in link["flags"],
        )
        for link in ip_json(ns, "addr", "show")
        for a in link["addr_info"]
    }


def test_addresses_and_links_read_as_ip_shows_them(ns: Netns) -> None:
    seen = helper(ns, "observe", "eth9")
    ours = {(name, cidr, scope, up) for name, cidr, scope, up, _kind in seen["addresses"]}
    assert ours == addresses_by_ip(ns)
    assert ("eth9", "192.0.2.5/24", 0, True, "veth") in map(tuple, seen["addresses"])
    hardware = {name: mac for name, mac, _physical in seen["hardware"]}
    assert hardware["eth9"] == "02:00:5e:00:00:09"  # the node id derives from it: as before
    assert hardware["lo"] == "00:00:00:00:00:00"
    index = ip_json(ns, "link", "show", "eth9")[0]["ifindex"]
    assert seen["index"] == index
    assert seen["link"] == {
        "mtu": 1500,
        "up": True,
        "kind": "veth",
        "addresses": ["192.0.2.5/24", "2001:db8::5/64"],
    }


def test_no_such_link_is_none_not_an_error(ns: Netns) -> None:
    seen = helper(ns, "observe", "nosuch0")
    assert (seen["link"], seen["index"]) == (None, None)


def test_mtu_state_and_addresses_are_changed_as_asked(ns: Netns) -> None:
    ns.ip("link", "set", "eth9", "down")
    operations = [
        ["mtu", "eth9", 1380],
        ["up", "eth9"],
        ["add", "eth9", "fd00::1/64"],
        ["del", "eth9", "192.0.2.5/24"],
    ]
    assert helper(ns, "apply", json.dumps(operations)) == {"applied": 4}
    (link,) = ip_json(ns, "addr", "show", "eth9")
    assert link["mtu"] == 1380
    assert "UP" in link["flags"]
    # 2001:db8::5 went with the link down (the kernel drops IPv6 addresses then).
    assert {f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"]} == {"fd00::1/64"}


def test_a_refusal_names_the_operation_and_stops_the_batch(ns: Netns) -> None:
    operations = [["add", "eth9", "192.0.2.5/24"], ["mtu", "eth9", 1300]]  # the first exists
    result = helper(ns, "apply", json.dumps(operations))
    assert result["error"].startswith("ip address add 192.0.2.5/24 dev eth9: ")
    assert "File exists" in result["error"]
    assert ip_json(ns, "link", "show", "eth9")[0]["mtu"] == 1500  # not applied after it
    missing = helper(ns, "apply", json.dumps([["mtu", "nosuch0", 1300]]))
    assert "link nosuch0 does not exist" in missing["error"]


def test_our_link_is_created_as_wireguard_or_refused_by_a_kernel_without_it(ns: Netns) -> None:
    result = helper(ns, "apply", json.dumps([["create", "kubespan"]]))
    links = {link["ifname"]: link for link in ip_json(ns, "-d", "link", "show")}
    if "error" in result:  # this host's kernel: no WireGuard module
        assert result["error"].startswith("ip link add kubespan type wireguard: ")
        assert "kubespan" not in links
    else:
        assert links["kubespan"]["linkinfo"]["info_kind"] == "wireguard"


def test_another_programs_link_under_our_name_is_seen_as_foreign_and_left(ns: Netns) -> None:
    ns.ip("link", "add", "kubespan", "type", "veth", "peer", "name", "kubespanp")
    seen = helper(ns, "observe", "kubespan")
    assert seen["link"]["kind"] == "veth"
    assert "link kubespan" not in helper(ns, "teardown")["removed"]
    assert ip_json(ns, "link", "show", "kubespan")


def test_a_link_whose_name_is_not_ascii_is_read_like_any_other(ns: Netns) -> None:
    """Any byte but NUL, '/', ':' and white space makes a link name; another program's
    link named so must not stop the agent from reading the rest."""
    ns.ip("link", "add", "ethé", "type", "veth", "peer", "name", "eth\u00e9p")
    ns.ip("addr", "add", "198.51.100.7/24", "dev", "ethé")
    seen = helper(ns, "observe", "eth9")
    assert ["ethé", "198.51.100.7/24", 0, False, "veth"] in seen["addresses"]
    assert "ethé" in {name for name, _mac, _physical in seen["hardware"]}
    assert seen["link"]["kind"] == "veth"
