"""The plan's replace decisions (placement changes, marks, runs killed mid-move, names that never collide)
and the order and batching in which old nodes leave, with the health gate that stops a move."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dcx.bootstrap.engines import NodeHealth
from dcx.bootstrap.phases import Host, NullReporter, RunContext
from dcx.errors import OperationFailed
from dcx.lifecycle import replace
from dcx.lifecycle.session import Options, Session
from dcx.plan import PLACEMENT_PREFIX, REPLACE_PREFIX, make_plan, placement
from dcx.providers.base import Node
from dcx.spec import ClusterSpec
from dcx.state import ClusterState, StateStore

A, B = "10.213.231.0/24", "10.213.232.0/24"


def spec(subnet: str = A, workers: int = 2, provider: str = "local") -> ClusterSpec:
    section = {"local": {"subnet": subnet}} if provider == "local" else {"aws": {"region": "eu-west-1"}}
    return ClusterSpec.model_validate({
        "apiVersion": "dcx/v1", "kind": "Cluster", "metadata": {"name": "c"},
        "spec": {"pools": [
            {"name": "control", "role": "control", "count": 1, "provider": "local", "local": {"subnet": subnet}},
            {"name": "web", "role": "worker", "count": workers, "provider": provider, **section}]}})


def node(name: str, pool: str = "web", role: str = "worker", provider: str = "local") -> Node:
    return Node(name=name, pool=pool, provider=provider, role=role, ssh_address="10.0.0.1")


def made_at(s: ClusterSpec, nodes: list[Node]) -> dict[str, Any]:
    """The journal of a create from `s`: each node's placement as recorded when it was made."""
    return {PLACEMENT_PREFIX + n.name: placement(s.pool(n.pool)) for n in nodes}


CLUSTER = [node("c-control-1", "control", "control"), node("c-web-1"), node("c-web-2")]
ALL_READY = {n.name: True for n in CLUSTER}


def test_an_unchanged_cluster_has_an_empty_plan() -> None:
    p = make_plan(spec(), CLUSTER, ALL_READY, False, resources=made_at(spec(), CLUSTER))
    assert p.empty and not p.replace and [n.name for n in p.keep] == [n.name for n in CLUSTER]


def test_a_subnet_change_replaces_every_node_with_names_that_do_not_collide() -> None:
    p = make_plan(spec(B), CLUSTER, ALL_READY, False, resources=made_at(spec(A), CLUSTER))
    assert [(r.old.name, r.new.name) for r in p.replace] == [
        ("c-control-1", "c-control-2"), ("c-web-1", "c-web-3"), ("c-web-2", "c-web-4")]
    assert [r.name for r in p.create] == ["c-control-2", "c-web-3", "c-web-4"]
    assert all(r.reason == f"subnet {A} -> {B}" for r in p.replace)
    assert not p.keep and not p.remove and p.moving and not p.empty
    assert [n.name for n in p.leaving()] == ["c-control-1", "c-web-1", "c-web-2"]
    assert p.to_dict()["replace"][1] == {"name": "c-web-1", "pool": "web", "role": "worker", "by": "c-web-3",
                                        "reason": f"subnet {A} -> {B}"}


def test_a_provider_change_replaces_the_pool_even_without_a_recorded_placement() -> None:
    p = make_plan(spec(provider="aws"), CLUSTER, ALL_READY, False, resources={})
    assert [(r.old.name, r.reason) for r in p.replace] == [("c-web-1", "provider local -> aws"),
                                                           ("c-web-2", "provider local -> aws")]
    assert [n.name for n in p.keep] == ["c-control-1"]


def test_nodes_made_before_placements_were_recorded_stay() -> None:
    assert make_plan(spec(B), CLUSTER, ALL_READY, False, resources={}).empty


def test_settings_that_are_not_placement_do_not_replace() -> None:
    changed = spec()
    changed.spec.pools[1].settings["sshd"] = "hardened"  # applied to the machine as it is
    assert make_plan(changed, CLUSTER, ALL_READY, False, resources=made_at(spec(), CLUSTER)).empty


def test_marked_nodes_are_replaced_with_the_marks_reason() -> None:
    marks = {**made_at(spec(), CLUSTER), REPLACE_PREFIX + "c-web-2": {"reason": "roll"}}
    p = make_plan(spec(), CLUSTER, ALL_READY, False, resources=marks)
    assert [(r.old.name, r.new.name, r.reason) for r in p.replace] == [("c-web-2", "c-web-3", "roll")]
    assert [n.name for n in p.keep] == ["c-control-1", "c-web-1"]


def test_a_run_killed_mid_move_plans_the_rest_of_the_same_move() -> None:
    # c-web-3 was made at the new subnet (and perhaps never joined); c-web-1 and -2 are still at the old one.
    existing = CLUSTER + [node("c-web-3")]
    journal = {**made_at(spec(A), CLUSTER), **made_at(spec(B), [node("c-web-3")])}
    p = make_plan(spec(B), existing, {**ALL_READY, "c-web-3": False}, False, resources=journal)
    assert [n.name for n in p.keep] == ["c-web-3"] and p.converge == ["c-web-3"]  # joins this time
    assert [(r.old.name, r.new.name) for r in p.replace] == [("c-control-1", "c-control-2"), ("c-web-1", "c-web-4")]
    assert [n.name for n in p.remove] == ["c-web-2"] and p.retire == ["c-web-2"]  # leaves after the surge
    assert [n.name for n in p.leaving()] == ["c-control-1", "c-web-1", "c-web-2"]


def test_a_pool_that_shrinks_while_it_moves() -> None:
    p = make_plan(spec(B, workers=1), CLUSTER, ALL_READY, False, resources=made_at(spec(A), CLUSTER))
    assert [(r.old.name, r.new.name) for r in p.replace if r.old.pool == "web"] == [("c-web-1", "c-web-3")]
    assert p.retire == ["c-web-2"]


def test_scale_up_and_down_keep_the_lowest_indexes() -> None:
    moved = [node("c-control-2", "control", "control"), node("c-web-3"), node("c-web-4")]
    journal = made_at(spec(), moved)
    up = make_plan(spec(workers=3), moved, None, False, resources=journal)
    assert [r.name for r in up.create] == ["c-web-1"]  # the lowest free index
    down = make_plan(spec(workers=1), moved, None, False, resources=journal)
    assert [n.name for n in down.remove] == ["c-web-4"] and not down.retire and not down.moving


def test_batches_take_workers_by_max_unavailable_then_control_nodes_one_at_a_time() -> None:
    leaving = [node("m1", "control", "control"), node("w1"), node("m2", "control", "control"), node("w2"),
               node("w3")]
    names = [[n.name for n in b] for b in replace.batches(leaving, 2)]
    assert names == [["w1", "w2"], ["w3"], ["m1"], ["m2"]]
    assert [[n.name for n in b] for b in replace.batches(leaving, 0)][:3] == [["w1"], ["w2"], ["w3"]]


# --- retire: the order of the steps, and the gate -------------------------------------------------


class Engine:
    """The steps of ClusterEngine.remove_nodes (dcx/bootstrap/engines.py), recorded in order."""

    control_noun = "managers"

    def __init__(self, members: set[str]) -> None:
        self.members = set(members)
        self.calls: list[tuple[str, str]] = []

    def control_host(self, ctx: RunContext, exclude: list[Host]) -> Host:
        return next(h for h in ctx.hosts if h.node.role == "control" and h not in exclude)

    def control_members(self, ctx: RunContext, api: Host) -> set[str]:
        return set(self.members)

    def drain(self, ctx: RunContext, api: Host, host: Host) -> None:
        self.calls.append(("drain", host.name))

    def demote(self, ctx: RunContext, api: Host, host: Host) -> None:
        assert host.name in self.members and api.name != host.name
        self.members.discard(host.name)
        self.calls.append(("demote", host.name))

    def remove(self, ctx: RunContext, api: Host, host: Host) -> None:
        self.calls.append(("remove", host.name))


def host(n: Node) -> Host:
    return Host(node=n, target=None, conn=None)  # type: ignore[arg-type]


@pytest.fixture
def session(tmp_path: Path) -> Session:
    s = Session(StateStore(tmp_path), "c", "test", NullReporter())
    s.state = ClusterState(name="c", id="id1")
    return s


def run_retire(monkeypatch: pytest.MonkeyPatch, session: Session, hosts: list[Host], leaving: list[Node],
               engine: Engine, not_ready: dict[int, str], max_unavailable: int = 1) -> list[Any]:
    events: list[Any] = []
    gates = iter(range(100))

    def health(sess: Session, spec: Any, nodes: list[Node], options: Options) -> tuple[dict[str, NodeHealth], dict]:
        i = next(gates)
        events.append(("gate", sorted(n.name for n in nodes)))
        return {n.name: NodeHealth(n.name, not_ready.get(i) != n.name, state="down") for n in nodes}, {}

    monkeypatch.setattr("dcx.lifecycle.health.cluster_health", health)
    monkeypatch.setattr(replace, "GATE_SETTLE", 0.0)  # each gate asks once (settling: its own test)
    monkeypatch.setattr(replace, "get_engine", lambda kind: engine)
    monkeypatch.setattr(replace, "point_access_at", lambda *a: events.append(("access",)))
    monkeypatch.setattr("dcx.lifecycle.scale_down.delete_machines",
                        lambda sess, spec, nodes, options, staying: events.append(
                            ("delete", [n.name for n in nodes], sorted(h.name for h in staying.hosts))))
    ctx = RunContext("c", spec(), hosts, None, NullReporter(), 4)  # type: ignore[arg-type]
    replace.retire(session, spec(), ctx, leaving, Options(max_unavailable=max_unavailable))
    events.append(("staying", [h.name for h in ctx.hosts]))
    return events


OLD = [node("c-control-1", "control", "control"), node("c-web-1"), node("c-web-2")]
NEW = [node("c-control-2", "control", "control"), node("c-web-3"), node("c-web-4")]


def test_old_nodes_leave_after_gates_workers_first_and_the_old_manager_last(monkeypatch: pytest.MonkeyPatch,
                                                                            session: Session) -> None:
    engine = Engine({"c-control-1", "c-control-2"})
    events = run_retire(monkeypatch, session, [host(n) for n in OLD + NEW], OLD, engine, {}, max_unavailable=2)
    assert [e[0] for e in events] == ["access", "gate", "delete", "gate", "delete", "gate", "staying"]
    # Each batch's machines go and the mesh narrows to the nodes still in the cluster at that moment.
    assert events[2] == ("delete", ["c-web-1", "c-web-2"], ["c-control-1", "c-control-2", "c-web-3", "c-web-4"])
    assert events[4] == ("delete", ["c-control-1"], ["c-control-2", "c-web-3", "c-web-4"])
    assert "c-control-1" in events[3][1]  # the manager's gate counts it (it still serves)
    assert events[-1] == ("staying", ["c-control-2", "c-web-3", "c-web-4"])
    # Two managers -> one: the old one is demoted (driven from the new one) and only then removed.
    assert engine.calls == [("drain", "c-web-1"), ("drain", "c-web-2"), ("remove", "c-web-1"), ("remove", "c-web-2"),
                            ("drain", "c-control-1"), ("demote", "c-control-1"), ("remove", "c-control-1")]
    assert session.state is not None and session.state.resources["move/c-control-1"]["step"] == "leaving"


def test_a_failed_gate_stops_the_move_with_the_old_nodes_serving(monkeypatch: pytest.MonkeyPatch,
                                                                 session: Session) -> None:
    engine = Engine({"c-control-1", "c-control-2"})
    with pytest.raises(OperationFailed) as err:
        run_retire(monkeypatch, session, [host(n) for n in OLD + NEW], OLD, engine, {1: "c-web-3"})
    assert engine.calls == [("drain", "c-web-1"), ("remove", "c-web-1")]  # the first batch only
    message = err.value.message
    assert message.startswith("stopped before removing c-web-2: not Ready: c-web-3 (down)"), message
    assert "re-run the same command" in (err.value.hint or "")


def test_the_last_manager_never_leaves(monkeypatch: pytest.MonkeyPatch, session: Session) -> None:
    engine = Engine({"c-control-1"})
    hosts = [host(n) for n in OLD] + [host(node("c-control-2", "control", "control"))]  # never became a manager
    with pytest.raises(OperationFailed, match="would leave no managers"):
        run_retire(monkeypatch, session, hosts, OLD[:1], engine, {})
    assert engine.calls == []


def test_a_batch_a_killed_run_had_started_goes_first_and_out_of_the_gates(monkeypatch: pytest.MonkeyPatch,
                                                                         session: Session) -> None:
    session.journal("move/c-web-2", {"by": "c-web-4", "reason": "roll", "step": "leaving"})  # drained, perhaps
    engine = Engine({"c-control-1", "c-control-2"})
    hosts = [host(n) for n in OLD[:2] + NEW] + [host(OLD[2])]
    events = run_retire(monkeypatch, session, hosts, OLD, engine, {})
    assert events[1] == ("gate", ["c-control-1", "c-control-2", "c-web-1", "c-web-3", "c-web-4"])  # not c-web-2
    assert [e[1] for e in events if e[0] == "delete"] == [["c-web-2"], ["c-web-1"], ["c-control-1"]]


def test_an_old_node_that_does_not_answer_leaves_first(session: Session) -> None:
    import socket

    from dcx.plan import Plan, Replacement
    from dcx.providers.base import NodeRequest

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    try:
        up = Node("c-web-1", "web", "local", "worker", "127.0.0.1", ssh_port=listening.getsockname()[1])
        down = Node("c-web-2", "web", "local", "worker", "127.0.0.1", ssh_port=closed.getsockname()[1])
        plan = Plan("c", replace=[Replacement(up, NodeRequest("c-web-3", "web", "worker", 3), "roll"),
                                  Replacement(down, NodeRequest("c-web-4", "web", "worker", 4), "roll")])
        replace.journal_surge(session, plan)
    finally:
        listening.close()
        closed.close()
    assert not replace.leaving_already(session, "c-web-1")
    assert replace.leaving_already(session, "c-web-2")
    assert session.state is not None and session.state.resources["move/c-web-2"] == {
        "by": "c-web-4", "reason": "roll", "step": "leaving"}


# --- after nodes leave: state, firewalls and the mesh of the nodes that stay --------------------------


def mesh_spec() -> ClusterSpec:
    s = spec().model_dump(mode="json", by_alias=True, exclude_none=True)
    s["spec"]["network"] = {"mesh": "wireguard"}
    return ClusterSpec.model_validate(s)


def test_forgetting_a_node_forgets_the_relay_routes_to_and_through_it(session: Session) -> None:
    for k, relay in {"mesh/relay/a,b": "r", "mesh/relay/a,gone": "r", "mesh/relay/c,d": "gone",
                     "mesh/relay/b,c": "a"}.items():
        session.journal(k, relay)
    session.journal("mesh/address/gone", "100.96.0.9")
    session.forget_node("gone")
    assert session.state is not None
    assert {k: v for k, v in session.state.resources.items() if k.startswith("mesh/")} == {
        "mesh/relay/a,b": "r", "mesh/relay/b,c": "a"}
    assert session.cdir.load().resources == session.state.resources  # saved


def mesh_host(name: str, address: str, key: str, facts: bool = True) -> Host:
    n = Node(name=name, pool="web", provider="local", role="worker", ssh_address=address,
             private_address=address, public_address=address)
    h = Host(node=n, target=None, conn=None)  # type: ignore[arg-type]
    h.facts = object() if facts else None
    h.data.update(mesh_pubkey=key)
    return h


def narrow(monkeypatch: pytest.MonkeyPatch, session: Session, s: ClusterSpec, hosts: list[Host]) -> list[Any]:
    """scale_down.narrow_mesh with the firewall call and the phase runs recorded (not run)."""
    from dcx.lifecycle import scale_down

    calls: list[Any] = []
    monkeypatch.setattr("dcx.lifecycle.apply.open_mesh_between_providers",
                        lambda sess, sp, nodes: calls.append(("firewall", sorted(n.name for n in nodes))))

    def run_phases(ctx: RunContext, phases: list[Any]) -> None:
        calls.append(("phases", sorted(h.name for h in ctx.hosts), [type(p).__name__ for p in phases], ctx))

    monkeypatch.setattr(scale_down, "run_phases", run_phases)
    ctx = RunContext("c", s, hosts, None, NullReporter(), 4)  # type: ignore[arg-type]
    ctx.shared["mesh_answered"] = {"gone": {"a", "b"}}
    scale_down.narrow_mesh(session, s, ctx, Options())
    return calls


def test_the_nodes_that_stay_narrow_firewalls_and_mesh_to_themselves(monkeypatch: pytest.MonkeyPatch,
                                                                     session: Session) -> None:
    from dcx.bootstrap.mesh import render_public_conf

    s = mesh_spec()
    for name, address in {"a": "100.96.0.1", "b": "100.96.0.2", "c": "100.96.0.3"}.items():
        session.journal(f"mesh/address/{name}", address)
    session.journal("mesh/relay/a,b", "c")  # still valid: every end stays
    session.journal("mesh/relay/a,c", "gone")  # left in state by an older dcx: its relay is gone
    hosts = [mesh_host("a", "10.0.0.1", "KA"), mesh_host("b", "10.0.0.2", "KB"),
             mesh_host("c", "10.0.0.3", "KC", facts=False)]  # `node remove`: c not connected yet
    calls = narrow(monkeypatch, session, s, hosts)
    # The firewalls first (the departed addresses lose the mesh port), then facts where missing, then
    # the create's mesh phases, on the staying nodes only.
    assert [c[:3] for c in calls] == [
        ("firewall", ["a", "b", "c"]),
        ("phases", ["c"], ["Connect", "GatherFacts"]),
        ("phases", ["a", "b", "c"], ["InstallWireGuard", "MeshKeys", "MeshConfigure", "MeshReach", "MeshRelays",
                                     "MeshVerify"])]
    ctx = calls[2][3]
    assert "mesh_answered" not in ctx.shared  # MeshReach asks again, without the departed node's answers
    assert ctx.shared["mesh_routes"] == {("a", "b"): "c"}
    assert session.state is not None and "mesh/relay/a,c" not in session.state.resources
    conf = render_public_conf(ctx, ctx.host("a"))
    assert [line for line in conf.splitlines() if line.startswith("PublicKey")] == ["PublicKey = KB",
                                                                                    "PublicKey = KC"]
    assert "AllowedIPs = 100.96.0.2/32, 100.96.0.3/32" in conf  # b through c, as recorded


def test_without_a_mesh_only_the_firewalls_narrow(monkeypatch: pytest.MonkeyPatch, session: Session) -> None:
    calls = narrow(monkeypatch, session, spec(), [mesh_host("a", "10.0.0.1", "KA")])  # one network, mesh: auto
    assert calls == [("firewall", ["a"])]


def test_scale_down_narrows_after_the_machines_are_gone(monkeypatch: pytest.MonkeyPatch, session: Session) -> None:
    """scale_down.remove_nodes (apply's scale-down, `node remove`): engine, then machines and state, then the
    mesh of the nodes that stay."""
    from dcx.lifecycle import scale_down

    events: list[Any] = []
    assert session.state is not None
    session.state.nodes = {n.name: n.to_dict() for n in OLD}

    class Provider:
        resets_machines = False

        def delete_nodes(self, pools: list[Any], nodes: list[Node]) -> None:
            events.append(("delete", [n.name for n in nodes]))

    class Removing:
        def remove_nodes(self, ctx: RunContext, leaving: list[Host]) -> None:
            events.append(("engine", sorted(h.name for h in ctx.hosts), [h.name for h in leaving]))

    monkeypatch.setattr(scale_down, "get_engine", lambda kind: Removing())
    monkeypatch.setattr(scale_down, "connect_with_retry", lambda conn, timeout: None)
    monkeypatch.setattr(Session, "provider", lambda self, name, sp: Provider())
    monkeypatch.setattr(scale_down, "narrow_mesh", lambda sess, sp, ctx, options: events.append(
        ("narrow", sorted(h.name for h in ctx.hosts), sorted(sess.state.nodes))))
    staying = RunContext("c", spec(), [host(n) for n in OLD[:2]], None, NullReporter(), 4)  # type: ignore[arg-type]
    scale_down.remove_nodes(session, spec(), staying, OLD[2:], Options())
    assert events == [("engine", ["c-control-1", "c-web-1", "c-web-2"], ["c-web-2"]),
                      ("delete", ["c-web-2"]),
                      ("narrow", ["c-control-1", "c-web-1"], ["c-control-1", "c-web-1"])]


def test_roll_of_every_pool_leaves_given_machines_and_a_named_one_is_bad_input(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mixed cluster (local pool + ssh pool) rolls its made machines; ssh pools are named and left; an ssh
    pool asked for by name is refused as bad input before anything is made."""
    from dcx.errors import InputError

    mixed = ClusterSpec.model_validate({
        "apiVersion": "dcx/v1", "kind": "Cluster", "metadata": {"name": "c"},
        "spec": {"pools": [
            {"name": "control", "role": "control", "count": 1, "provider": "local", "local": {"subnet": A}},
            {"name": "metal", "role": "worker", "provider": "ssh",
             "ssh": {"hosts": [{"name": "m1", "address": "127.0.0.1"}]}}]}})
    store = StateStore(tmp_path)
    state = ClusterState(name="c", id="0123abcd", engine="swarm", spec=mixed.model_dump(mode="json"))
    for n in (node("c-control-1", "control", "control"), node("m1", "metal", provider="ssh")):
        state.nodes[n.name] = n.to_dict()
    cdir = store.cluster("c")
    cdir.create_dirs()
    cdir.save(state)
    asked: dict[str, Any] = {}
    monkeypatch.setattr("dcx.lifecycle.apply.apply",
                        lambda s, o, st, replace_nodes: asked.update(replace_nodes) or "applied")
    notes: list[str] = []
    reporter = NullReporter()
    reporter.note = notes.append  # type: ignore[method-assign]
    assert replace.roll("c", [], Options(reporter=reporter), store) == "applied"
    assert asked == {"c-control-1": "roll"}
    assert notes == ["pool metal: machines dcx was given are not rolled (they have no new machine to be replaced by)"]
    with pytest.raises(InputError, match="m1 is a machine dcx was given"):
        replace.roll("c", ["metal"], Options(), store)


def test_a_gate_waits_for_a_node_that_settles_and_fails_on_one_that_does_not(
        monkeypatch: pytest.MonkeyPatch, session: Session) -> None:
    """After a manager leaves, the new raft leader shows workers "unknown" for a few seconds: a gate asks
    again until GATE_SETTLE has passed, and fails only for a node that is still not Ready then."""
    asked: list[int] = []

    def health(sess: Session, spec_: Any, nodes: list[Node], options: Options) -> tuple[dict[str, NodeHealth], dict]:
        asked.append(1)
        settled = len(asked) >= 3
        return {n.name: NodeHealth(n.name, settled or n.name != "c-web-1", state="unknown") for n in nodes}, {}

    monkeypatch.setattr("dcx.lifecycle.health.cluster_health", health)
    monkeypatch.setattr(replace, "GATE_POLL", 0.01)
    hosts = [host(n) for n in CLUSTER]
    replace.gate(session, spec(), hosts, Options(), before=[])
    assert len(asked) == 3
    asked.clear()
    monkeypatch.setattr(replace, "GATE_SETTLE", 0.015)
    monkeypatch.setattr(replace, "GATE_POLL", 0.02)
    with pytest.raises(OperationFailed, match=r"not Ready: c-web-1 \(unknown\)"):
        replace.gate(session, spec(), hosts, Options(), before=[])
    assert len(asked) == 2
