"""Relays for mesh pairs with no direct path: which node relays which pair, and the WireGuard
AllowedIPs (and forwarding hooks) that result on every node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dcx import spec as spec_module
from dcx.bootstrap.mesh import render_public_conf, wanted_link
from dcx.bootstrap.phases import Host, NullReporter, RunContext
from dcx.bootstrap.relay import (
    Candidate,
    MeshRelays,
    allowed_ips,
    choose_routes,
    decide,
    forwarding_ok,
    handshakes_made,
    load_routes,
    pair,
    peer_paths,
    retry_direct_command,
    routes_from_resources,
)
from dcx.errors import SpecError
from dcx.providers.base import Node
from dcx.spec import ClusterSpec

# Four sites: c1 in a cloud (public), a1 in a data centre (forwarded mesh port), b1 and d1 behind NAT
# with no inbound path: b1 and d1 reach everyone but each other.
SITES = [Candidate("a1", control=True, endpoint=True), Candidate("c1", control=False, endpoint=True),
         Candidate("b1"), Candidate("d1")]


def everyone_but(nodes: list[str], *missing: tuple[str, str]) -> set[tuple[str, str]]:
    gone = {pair(a, b) for a, b in missing}
    return {pair(a, b) for a in nodes for b in nodes if a < b} - gone


NAMES = ["a1", "b1", "c1", "d1"]


def test_a_pair_without_a_direct_path_goes_through_a_control_node_with_an_endpoint() -> None:
    routes, unroutable = choose_routes(SITES, everyone_but(NAMES, ("b1", "d1")), "auto", {})
    assert routes == {("b1", "d1"): "a1"} and unroutable == []


def test_a_relay_must_reach_both_ends_directly() -> None:
    # a1 does not reach d1: only c1 can relay b1-d1 (and a1-d1 itself).
    direct = everyone_but(NAMES, ("b1", "d1"), ("a1", "d1"))
    routes, _ = choose_routes(SITES, direct, "auto", {})
    assert routes == {("b1", "d1"): "c1", ("a1", "d1"): "c1"}


def test_pairs_spread_over_the_relays() -> None:
    # Two control nodes with endpoints (a1, a2) and four no-inbound nodes: six pairs, three each.
    nodes = [Candidate("a1", True, True), Candidate("a2", True, True)] + [Candidate(f"n{i}") for i in range(4)]
    names = [n.name for n in nodes]
    edge = [f"n{i}" for i in range(4)]
    missing = [(x, y) for x in edge for y in edge if x < y]
    routes, unroutable = choose_routes(nodes, everyone_but(names, *missing), "auto", {})
    assert set(routes) == {pair(x, y) for x, y in missing} and unroutable == []
    assert sorted(routes.values()) == ["a1"] * 3 + ["a2"] * 3


def test_preference_control_then_endpoint_then_name() -> None:
    nodes = [Candidate("w1", False, True), Candidate("k2", True, False), Candidate("k9", True, True),
             Candidate("x"), Candidate("y")]
    names = [n.name for n in nodes]
    routes, _ = choose_routes(nodes, everyone_but(names, ("x", "y")), "auto", {})
    assert routes == {("x", "y"): "k9"}
    nodes = [Candidate("w1", False, True), Candidate("k2", True, False), Candidate("x"), Candidate("y")]
    routes, _ = choose_routes(nodes, everyone_but([n.name for n in nodes], ("x", "y")), "auto", {})
    assert routes == {("x", "y"): "k2"}  # a control node without endpoint before a worker with one


def test_none_relays_nothing() -> None:
    routes, unroutable = choose_routes(SITES, everyone_but(NAMES, ("b1", "d1")), "none", {("b1", "d1"): "a1"})
    assert routes == {} and unroutable == [("b1", "d1")]


def test_an_explicit_list_is_the_only_choice() -> None:
    direct = everyone_but(NAMES, ("b1", "d1"))
    assert choose_routes(SITES, direct, ["c1"], {})[0] == {("b1", "d1"): "c1"}
    # Named, but not reaching both ends: the pairs stay unrouted (a1 would reach both, but is not named).
    direct = everyone_but(NAMES, ("b1", "d1"), ("c1", "d1"))
    assert choose_routes(SITES, direct, ["c1"], {}) == ({}, [("b1", "d1"), ("c1", "d1")])
    assert choose_routes(SITES, direct, "auto", {})[0] == {("b1", "d1"): "a1", ("c1", "d1"): "a1"}


def test_recorded_routes_stay_while_their_relay_reaches_both_ends() -> None:
    # c1 would not be the first choice now, but it was recorded and still works: no change.
    direct = everyone_but(NAMES, ("b1", "d1"))
    assert choose_routes(SITES, direct, "auto", {("b1", "d1"): "c1"})[0] == {("b1", "d1"): "c1"}


def test_a_lost_relay_is_replaced() -> None:
    # The recorded relay left the cluster ...
    nodes = [n for n in SITES if n.name != "a1"]
    direct = everyone_but(["b1", "c1", "d1"], ("b1", "d1"))
    assert choose_routes(nodes, direct, "auto", {("b1", "d1"): "a1"})[0] == {("b1", "d1"): "c1"}
    # ... or stays, but no longer reaches the ends: they reroute through c1, and so does a1 itself.
    direct = everyone_but(NAMES, ("b1", "d1"), ("a1", "b1"), ("a1", "d1"))
    routes, unroutable = choose_routes(SITES, direct, "auto", {("b1", "d1"): "a1"})
    assert routes == {("b1", "d1"): "c1", ("a1", "b1"): "c1", ("a1", "d1"): "c1"} and unroutable == []


def test_nothing_to_relay_when_every_pair_answers() -> None:
    assert choose_routes(SITES, everyone_but(NAMES), "auto", {("b1", "d1"): "a1"}) == ({}, [])


ADDRESSES = {"a1": "100.96.0.1", "b1": "100.96.0.2", "c1": "100.96.0.3", "d1": "100.96.0.4"}


def test_allowed_ips_on_the_ends_and_on_the_relay() -> None:
    routes = {("b1", "d1"): "a1"}
    # b1: d1's address moves to a1's entry; d1's entry carries nothing.
    assert allowed_ips("b1", ADDRESSES, routes) == {"a1": ["100.96.0.1", "100.96.0.4"], "c1": ["100.96.0.3"],
                                                   "d1": []}
    assert allowed_ips("d1", ADDRESSES, routes) == {"a1": ["100.96.0.1", "100.96.0.2"], "b1": [],
                                                   "c1": ["100.96.0.3"]}
    # The relay and the others keep every peer direct.
    assert allowed_ips("a1", ADDRESSES, routes) == {p: [a] for p, a in ADDRESSES.items() if p != "a1"}
    assert allowed_ips("c1", ADDRESSES, routes) == {p: [a] for p, a in ADDRESSES.items() if p != "c1"}


def test_status_paths_and_recorded_routes() -> None:
    resources = {"mesh/relay/b1,d1": "a1", "mesh/address/b1": "100.96.0.2", "local/x": "y"}
    routes = routes_from_resources(resources)
    assert routes == {("b1", "d1"): "a1"}
    assert peer_paths("d1", ["a1", "b1", "c1"], routes) == {"direct": ["a1", "c1"], "relayed": {"b1": "a1"}}
    assert peer_paths("a1", ["b1", "c1", "d1"], routes) == {"direct": ["b1", "c1", "d1"], "relayed": {}}


def test_forwarding_facts() -> None:
    assert forwarding_ok("forward=1\nrule=yes", relay=True)
    assert forwarding_ok("forward=1\nrule=none", relay=True)  # no iptables: nothing filters FORWARD
    assert not forwarding_ok("forward=0\nrule=yes", relay=True)
    assert not forwarding_ok("forward=1\nrule=no", relay=True)
    assert forwarding_ok("forward=1\nrule=no", relay=False)
    assert not forwarding_ok("forward=1\nrule=yes", relay=False)  # a former relay's rule goes


# --- the configs that result -----------------------------------------------------------------------

def cluster(relays: Any = "auto") -> ClusterSpec:
    pools = [{"name": "control", "role": "control", "count": 1, "provider": "local"}]
    return ClusterSpec.model_validate({"apiVersion": "dcx/v1", "kind": "Cluster", "metadata": {"name": "hy"},
                                       "spec": {"network": {"relays": relays}, "pools": pools}})


def context(relays: Any = "auto") -> RunContext:
    hosts = []
    for c in SITES:
        node = Node(name=c.name, pool="p", provider="ssh", role="control" if c.control else "worker",
                    ssh_address=f"10.0.0.{len(hosts) + 1}", network=f"site-{c.name}",
                    mesh_endpoint="198.51.100.1:51820" if c.endpoint else "")
        host = Host(node=node, target=None, conn=None)  # type: ignore[arg-type] - nothing is run
        host.data.update(mesh_address=ADDRESSES[c.name], mesh_pubkey=f"key-{c.name}")
        hosts.append(host)
    return RunContext(cluster_name="hy", spec=cluster(relays), hosts=hosts, sessions=None,  # type: ignore[arg-type]
                      reporter=NullReporter())


def test_recorded_routes_shape_the_configs_and_only_the_relay_forwards() -> None:
    ctx = context()
    journal: dict[str, Any] = {}
    load_routes(ctx, {"mesh/relay/b1,d1": "a1"}, journal.__setitem__, "abc123")
    b1 = wanted_link(render_public_conf(ctx, ctx.host("b1")), "key-b1")
    assert b1["peers"] == {"key-a1": ("100.96.0.1/32,100.96.0.4/32", "25"), "key-c1": ("100.96.0.3/32", "25"),
                           "key-d1": ("(none)", "25")}  # as `wg show dcx0 dump` prints an entry without IPs
    relay = render_public_conf(ctx, ctx.host("a1"))
    assert "PostUp = sysctl -q -w net.ipv4.ip_forward=1" in relay
    assert "--comment 'dcx relay hy abc123' -j ACCEPT" in relay and "PostDown = " in relay
    assert "PostUp" not in render_public_conf(ctx, ctx.host("b1"))
    assert journal == {}


def test_routes_whose_relay_left_or_is_not_allowed_are_forgotten() -> None:
    for relays, resources in (("auto", {"mesh/relay/b1,d1": "gone"}), ("none", {"mesh/relay/b1,d1": "a1"}),
                              (["c1"], {"mesh/relay/b1,d1": "a1"})):
        ctx = context(relays)
        journal: dict[str, Any] = {}
        load_routes(ctx, resources, journal.__setitem__, "abc123")
        assert ctx.shared["mesh_routes"] == {} and journal == {"mesh/relay/b1,d1": None}, relays


def test_the_run_decides_from_what_answered_and_records_it() -> None:
    ctx = context()
    journal: dict[str, Any] = {}
    load_routes(ctx, {}, journal.__setitem__, "abc123")
    ctx.shared["mesh_answered"] = {"a1": {"b1", "c1", "d1"}, "c1": {"a1", "b1", "d1"}, "b1": {"a1", "c1"},
                                   "d1": {"a1", "c1"}}
    assert decide(ctx) == ({("b1", "d1"): "a1"}, [])
    MeshRelays().prepare(ctx)
    assert journal == {"mesh/relay/b1,d1": "a1"} and ctx.shared["mesh_routes"] == {("b1", "d1"): "a1"}
    # Next run: b1 and d1 answer each other through a1, and a1 both: nothing changes.
    journal.clear()
    ctx.shared["mesh_answered"] = {"a1": {"b1", "c1", "d1"}, "c1": {"a1", "b1", "d1"}, "b1": {"a1", "c1", "d1"},
                                   "d1": {"a1", "b1", "c1"}}
    MeshRelays().prepare(ctx)
    assert journal == {} and ctx.shared["mesh_routes"] == {("b1", "d1"): "a1"}


class Notes(NullReporter):
    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)


def test_a_relayed_pair_that_handshakes_directly_again_goes_direct() -> None:
    ctx = context()
    ctx.reporter = Notes()
    journal: dict[str, Any] = {}
    load_routes(ctx, {"mesh/relay/b1,d1": "a1", "mesh/relay/a1,c1": "b1"}, journal.__setitem__, "abc123")
    everyone = {n: {m for m in ADDRESSES if m != n} for n in ADDRESSES}
    ctx.shared["mesh_answered"] = everyone
    # a1 and c1 (relayed, say, after an outage) handshake directly again; b1 and d1 still never do.
    ctx.shared["mesh_direct_again"] = {"a1": {"c1"}, "c1": set(), "b1": set(), "d1": set()}
    MeshRelays().prepare(ctx)
    assert ctx.shared["mesh_routes"] == {("b1", "d1"): "a1"}
    assert journal == {"mesh/relay/a1,c1": None}
    assert ctx.reporter.notes == ["mesh: a1 and c1 reach each other directly again; no longer relayed"]


def test_a_re_created_entry_counts_once_it_has_handshaken() -> None:
    keys = {"K-a1": "a1", "K-b1": "b1", "K-c1": "c1"}
    text = "K-a1\t999900\nK-b1\t0\nK-other\t999999\n"
    assert handshakes_made(text, keys) == {"a1"}  # b1: never since it was re-created; c1: not there; other: not asked


def test_re_creating_an_entry_keeps_its_endpoint_and_keepalive() -> None:
    command = retry_direct_command(["k+/=1", "odd key"])
    assert "wg set dcx0 peer k+/=1 remove" in command and "wg set dcx0 peer 'odd key' remove" in command
    assert "allowed-ips ''" in command and "persistent-keepalive \"$ka\"" in command and "echo reset k+/=1" in command
    import subprocess

    assert subprocess.run(["sh", "-n", "-c", command]).returncode == 0


# --- the spec field --------------------------------------------------------------------------------

SPEC = """\
apiVersion: dcx/v1
kind: Cluster
metadata: {{name: demo}}
spec:
  network:
    relays: {value}
  pools:
    - {{name: control, role: control, count: 1, provider: local}}
"""


@pytest.mark.parametrize(("value", "problem"), [
    ("sometimes", "must be auto, none or a list of node names"),
    ("[]", "must name at least one node (or be auto or none)"),
    ("[a1, a1]", "names a node twice"),
    ("[5]", "'5' is not a node name"),
    ("['a;b']", "'a;b' is not a host name (letters, digits, '-' and '.'; at most 63 between dots)"),
])
def test_bad_relays_name_file_line_and_field(tmp_path: Path, value: str, problem: str) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(SPEC.format(value=value))
    with pytest.raises(SpecError) as info:
        spec_module.load(path)
    assert info.value.message == f"{path}:6: spec.network.relays: {problem}"


@pytest.mark.parametrize(("value", "loaded"), [("auto", "auto"), ("none", "none"), ("[a1, c1]", ["a1", "c1"])])
def test_relays_load(tmp_path: Path, value: str, loaded: Any) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(SPEC.format(value=value))
    assert spec_module.load(path).spec.network.relays == loaded


def test_the_schema_has_relays() -> None:
    network = spec_module.json_schema()["$defs"]["NetworkSpec"]["properties"]
    assert "relays" in network


def test_the_status_cell_says_which_peers_go_through_which_relay() -> None:
    from dcx.cli.cluster import mesh_cell
    from dcx.lifecycle.status import mesh_paths

    row = {"address": "100.96.0.2", "link": "up", "peers_up": 3, "peers_expected": 4, "peers_down": ["e1"]}
    row.update(mesh_paths({"mesh/relay/b1,d1": "a1", "mesh/relay/b1,e1": "c1", "mesh/relay/b1,f1": "a1"}, "b1",
                          ["a1", "c1", "d1", "e1", "f1"]))
    assert row["direct"] == ["a1", "c1"] and row["relayed"] == {"d1": "a1", "e1": "c1", "f1": "a1"}
    assert mesh_cell(row) == "100.96.0.2 3/4 peers, relayed: d1 f1 via a1, e1 via c1, down: e1"


def test_diagnose_does_not_report_the_direct_entry_of_a_relayed_pair() -> None:
    from dcx import diagnose

    # On b1: a1's entry carries d1's address too; d1's own entry none (never handshakes, by design).
    wg = ("interface\tPUB1=\t51820\npeer\tPUBA=\t10.0.0.1:51820\t100.96.0.1/32,100.96.0.4/32\t1000\t1\t1\t25\n"
          "peer\tPUBD=\t10.0.0.4:51820\t(none)\t0\t0\t0\t25\n"
          "peer\tPUBC=\t10.0.0.3:51820\t100.96.0.3/32\t0\t0\t0\t25\nnow=1100\n")
    reports = [diagnose.NodeReport("b1", "worker", reachable=True, facts={"docker_running": True},
                                   sections={"mesh": wg})]
    mesh = {"b1": "100.96.0.2", "a1": "100.96.0.1", "c1": "100.96.0.3", "d1": "100.96.0.4"}
    assert diagnose.findings(reports, {"b1": {"ready": True}}, mesh, "swarm") == [
        "b1: mesh peer c1 (100.96.0.3): last handshake never"]


@pytest.mark.parametrize(("relays", "advice"), [
    ("none", "; or let dcx route such pairs through a node both reach: spec.network.relays: auto"),
    ("auto", "; no node allowed by spec.network.relays reaches both directly"),
])
def test_a_pair_left_unanswered_fails_the_verify_naming_it(monkeypatch: pytest.MonkeyPatch, relays: str,
                                                           advice: str) -> None:
    from dcx.bootstrap import mesh

    monkeypatch.setattr(mesh, "link_up", lambda host: True)  # both interfaces up: the path is suspected
    ctx = context(relays)
    why = mesh.MeshVerify()._why(ctx, ctx.host("b1"), [ctx.host("d1")])
    assert why == ("no answer over the mesh from d1 after 60s: check that UDP 51820 reaches those nodes "
                   "(firewall, NAT port forward, or set their mesh endpoint: inventory "
                   "dcx_mesh_endpoint=HOST:PORT)" + advice)


def test_with_relays_none_there_is_no_reach_phase_and_former_relays_stop_forwarding() -> None:
    from dcx.bootstrap.relay import relay_phases

    assert [type(p).__name__ for p in relay_phases(context("none"))] == ["MeshRelays"]
    assert [type(p).__name__ for p in relay_phases(context("auto"))] == ["MeshReach", "MeshRelays"]
    ctx = context("none")
    load_routes(ctx, {"mesh/relay/b1,d1": "a1"}, lambda k, v: None, "abc123")
    assert decide(ctx) == ({}, [])
    assert "PostUp" not in render_public_conf(ctx, ctx.host("a1"))
