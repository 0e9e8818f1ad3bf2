"""The mesh is "configured" when the interface itself says so: facts read on the node, compared with the
config dcx renders. Cases are tables of what the node prints (the output format of FACTS_COMMAND and
probe_command; `wg show dcx0 dump` columns per wg(8))."""

from __future__ import annotations

import pytest

from dcx.bootstrap.mesh import link_differences, parse_link_facts, parse_probe, wanted_link

CONF = """Address = 100.96.0.1/16
ListenPort = 51820
MTU = 1420
Table = off

# b1
[Peer]
PublicKey = PEER_B
AllowedIPs = 100.96.0.2/32
Endpoint = 10.0.2.1:51820
PersistentKeepalive = 25

# c1
[Peer]
PublicKey = PEER_C
AllowedIPs = 100.96.0.3/32
Endpoint = 10.0.1.3:51820
"""

# As the node prints it when dcx0 holds CONF (the endpoint of b1 learned from its traffic: NAT).
GOOD = """link=POINTOPOINT,NOARP,UP,LOWER_UP 1420
addr=100.96.0.1/16
self=SELF 51820
peer=PEER_B 100.96.0.2/32 25
peer=PEER_C 100.96.0.3/32 off
conf=abc
"""


def facts(text: str) -> dict:
    return parse_link_facts(text)


def test_an_interface_holding_the_config_needs_nothing() -> None:
    assert link_differences(facts(GOOD), wanted_link(CONF, "SELF")) == ([], [])
    assert facts(GOOD)["conf"] == "abc"


@pytest.mark.parametrize(("what", "text", "restart", "sync"), [
    ("no interface at all", "conf=abc\n", ["dcx0 is missing"], ["2 peer(s) to set, 0 to change or remove"]),
    ("link without a WireGuard device (wg-quick killed half-way)",
     "link=POINTOPOINT,NOARP 1420\nconf=abc\n", ["dcx0 has no WireGuard device behind it", "dcx0 is down",
                                                  "dcx0 has address none, not 100.96.0.1/16"],
     ["2 peer(s) to set, 0 to change or remove"]),
    ("taken down (ip link set dcx0 down)", GOOD.replace(",UP,LOWER_UP", ""), ["dcx0 is down"], []),
    ("another address", GOOD.replace("addr=100.96.0.1/16", "addr=100.96.0.9/16"),
     ["dcx0 has address 100.96.0.9/16, not 100.96.0.1/16"], []),
    ("another MTU", GOOD.replace(" 1420", " 1500"), ["dcx0 has MTU 1500, not 1420"], []),
    ("another key (the key file was replaced)", GOOD.replace("self=SELF", "self=OTHER"),
     ["dcx0 has another key or port"], []),
    ("a peer missing", GOOD.replace("peer=PEER_C 100.96.0.3/32 off\n", ""), [],
     ["1 peer(s) to set, 0 to change or remove"]),
    ("a stale peer", GOOD + "peer=PEER_GONE 100.96.0.4/32 off\n", [], ["0 peer(s) to set, 1 to change or remove"]),
    ("a peer without its keepalive", GOOD.replace("100.96.0.2/32 25", "100.96.0.2/32 off"), [],
     ["1 peer(s) to set, 1 to change or remove"]),
])
def test_what_differs_decides_how_it_is_applied(what: str, text: str, restart: list[str], sync: list[str]) -> None:
    assert link_differences(facts(text), wanted_link(CONF, "SELF")) == (restart, sync), what


def test_status_counts_a_peer_only_when_it_answers_now() -> None:
    text = "link=POINTOPOINT,NOARP,UP,LOWER_UP\naddr=100.96.0.1/16\nup 100.96.0.2\ndown 100.96.0.3\n"
    row = parse_probe(text, "100.96.0.1", {"b1": "100.96.0.2", "c1": "100.96.0.3"})
    assert row == {"address": "100.96.0.1", "link": "up", "peers_expected": 2, "peers_up": 1, "peers_down": ["c1"]}


@pytest.mark.parametrize(("text", "link"), [
    ("link=POINTOPOINT,NOARP\naddr=100.96.0.1/16\n", "down"),
    ("", "absent"),
    ("link=POINTOPOINT,NOARP,UP,LOWER_UP\n", "down"),  # up without its address: not the mesh
])
def test_status_says_when_the_interface_is_not_up(text: str, link: str) -> None:
    row = parse_probe(text + "down 100.96.0.2\n", "100.96.0.1", {"b1": "100.96.0.2"})
    assert (row["link"], row["peers_down"]) == (link, ["b1"])
