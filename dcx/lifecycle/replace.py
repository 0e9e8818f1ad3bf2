"""Replacing nodes in a running cluster (a pool moved to another subnet, zone, provider or image; `cluster
roll`; `node replace`; `node remove`), surge first: the new nodes are made, joined and Ready (apply does
that, with the old nodes still in the cluster), then the old ones leave in batches of --max-unavailable,
each batch only after a health gate passes. Control nodes leave one at a time, each after every
remaining control node is Ready, so raft keeps its quorum and the cluster its identity.

Every step is journaled (state resources `move/NODE`: the node that takes its place, why, and the step
reached), and every decision is recomputed from what exists: a run killed mid-move re-plans the same
move (the old nodes still have their old placement or their mark) and goes on from where it stopped.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dcx import access
from dcx.bootstrap.engines import get_engine
from dcx.bootstrap.phases import Host, RunContext, kill_point
from dcx.errors import OperationFailed
from dcx.lifecycle.session import Options, Session
from dcx.log import log
from dcx.plan import Plan
from dcx.providers.base import Node
from dcx.spec import ClusterSpec

MOVE_PREFIX = "move/"  # state resources: move/NODE = {"by": NEW, "reason": ..., "step": surge|leaving}


def batches(leaving: list[Node], max_unavailable: int) -> list[list[Node]]:
    """The order old nodes leave in: workers first, `max_unavailable` at a time, then control nodes one
    at a time (each raft/etcd membership change alone), so the control plane shrinks last."""
    size = max(1, max_unavailable)
    workers = [n for n in leaving if n.role != "control"]
    control = [n for n in leaving if n.role == "control"]
    return [workers[i:i + size] for i in range(0, len(workers), size)] + [[n] for n in control]


def journal_surge(session: Session, plan: Plan) -> None:
    """Before anything is made: which old node each new node replaces (read by status and the log). An old
    node whose SSH port does not answer (a dead machine being replaced) is unavailable already: it takes
    no part in the surge's bootstrap or the gates, and leaves first."""
    down = set(unanswering(plan.leaving()))
    for r in plan.replace:
        previous = (session.state.resources.get(MOVE_PREFIX + r.old.name) if session.state else None) or {}
        step = "leaving" if r.old.name in down else previous.get("step", "surge")
        session.journal(MOVE_PREFIX + r.old.name, {"by": r.new.name, "reason": r.reason, "step": step})
    for name in plan.retire:
        previous = (session.state.resources.get(MOVE_PREFIX + name) if session.state else None) or {}
        step = "leaving" if name in down else previous.get("step", "surge")
        session.journal(MOVE_PREFIX + name, {**previous, "step": step})
    for name in sorted(down):
        session.reporter.note(f"{name} does not answer on its SSH port: it leaves first, without a drain of its own")


def unanswering(nodes: list[Node], timeout: float = 5.0) -> list[str]:
    """Nodes whose SSH port refuses or times out a TCP connection (nodes behind jump hosts are not probed)."""
    import socket

    def answers(n: Node) -> bool:
        if n.extra.get("endpoint"):
            return True
        try:
            socket.create_connection((n.ssh_address, n.ssh_port), timeout=timeout).close()
            return True
        except OSError:
            return False

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(nodes)))) as pool:
        return [n.name for n, ok in zip(nodes, pool.map(answers, nodes), strict=True) if not ok]


def leaving_already(session: Session, name: str) -> bool:
    """The node's batch had started to leave when a run stopped (it may be drained, demoted or out of the
    swarm already): it takes no part in the next run's bootstrap (a drained node is not Ready, a node out of
    the swarm must not join again) and is removed first."""
    step = session.state.resources.get(MOVE_PREFIX + name) if session.state else None
    return bool(step and step.get("step") == "leaving")


def retire(session: Session, spec: ClusterSpec, ctx: RunContext, leaving: list[Node], options: Options) -> None:
    """The new nodes are Ready (apply verified them): the old ones leave, batch by batch, each batch after
    a health gate over every node that stays in the cluster at that moment. `ctx` holds every host, old
    and new, but those that had started to leave in a killed run; on return it holds only the hosts
    that stay."""
    from dcx.lifecycle.session import build_context

    engine = get_engine(spec.spec.engine.type)
    gone = {n.name for n in leaving}
    staying = [h for h in ctx.hosts if h.name not in gone]
    point_access_at(session, spec, ctx, staying)
    # Nodes a killed run had started to take out first, then the rest in order.
    resumed = [n for n in leaving if leaving_already(session, n.name)]
    plan_batches = ([resumed] if resumed else []) + batches([n for n in leaving if n not in resumed],
                                                            options.max_unavailable)
    extra = build_context(session, spec, [n for n in leaving if n.name not in {h.name for h in ctx.hosts}], options)
    remaining = list(ctx.hosts)
    try:
        for i, batch in enumerate(plan_batches, start=1):
            names = [n.name for n in batch]
            gate(session, spec, [h for h in remaining if not leaving_already(session, h.name)], options,
                 before=names)
            session.reporter.note(f"removing {', '.join(names)} ({i}/{len(plan_batches)})")
            kill_point("replace:before-leave")
            for n in batch:
                step = session.state.resources.get(MOVE_PREFIX + n.name) if session.state else None
                session.journal(MOVE_PREFIX + n.name, {**(step or {}), "step": "leaving"})
            hosts = [h for h in remaining + extra.hosts if h.name in names]
            leave_cluster(engine, dataclasses.replace(ctx, hosts=remaining + extra.hosts), hosts)
            kill_point("replace:after-leave")
            from dcx.lifecycle.scale_down import delete_machines

            remaining = [h for h in remaining if h.name not in names]
            # The nodes that stay drop the batch from their mesh now: a pair it relayed gets another relay
            # before the next gate.
            delete_machines(session, spec, batch, options, dataclasses.replace(ctx, hosts=remaining))
    finally:
        extra.sessions.close()
    ctx.hosts[:] = remaining
    if plan_batches:
        gate(session, spec, remaining, options, before=[])


def leave_cluster(engine: Any, ctx: RunContext, hosts: list[Host]) -> None:
    """One batch leaves: drained together (their work runs elsewhere), then each demoted (a control node:
    alone in its batch) and removed. Driven from a control node that stays."""
    api = engine.control_host(ctx, exclude=hosts)
    members = engine.control_members(ctx, api)
    leaving_members = [h for h in hosts if h.name in members]
    if leaving_members and len(members) - len(leaving_members) < 1:
        raise OperationFailed(f"removing {', '.join(h.name for h in leaving_members)} would leave no "
                              f"{engine.control_noun}", hint="add a control node first (raise the pool's count)")
    with ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
        list(pool.map(lambda h: engine.drain(ctx, api, h), hosts))
    for h in hosts:
        if h.name in members:
            engine.demote(ctx, api, h)
        engine.remove(ctx, api, h)


GATE_SETTLE = 60.0  # seconds a node may take to show Ready again before a gate fails
GATE_POLL = 2.0


def gate(session: Session, spec: ClusterSpec, hosts: list[Host], options: Options, before: list[str]) -> None:
    """Every node that is in the cluster now is Ready (health.cluster_health: asked of the node and of the
    engine). A gate that fails stops the move with every old node that has not left yet still serving."""
    from dcx.lifecycle.health import cluster_health

    # A membership change settles over a few seconds (a manager that left moves the raft leadership, and
    # the new leader shows the workers as "unknown" until they report again), as kOps' rolling update
    # validates a cluster over a window: the gate fails only when a node stays not Ready for GATE_SETTLE.
    deadline = time.monotonic() + GATE_SETTLE
    while True:
        health, _ = cluster_health(session, spec, [h.node for h in hosts], options)
        bad = sorted(name for name, h in health.items() if not h.ready)
        if not bad:
            return
        if time.monotonic() >= deadline:
            break
        log.info("health gate: waiting for %s to be Ready", ", ".join(bad))
        time.sleep(GATE_POLL)
    detail = ", ".join(f"{n} ({health[n].state}{': ' + health[n].detail if health[n].detail else ''})" for n in bad)
    what = f"before removing {', '.join(before)}" if before else "after the last removal"
    log.error("health gate failed %s: %s", what, detail)
    raise OperationFailed(f"stopped {what}: not Ready: {detail}; the cluster still serves on the nodes it has",
                          hint=f"bring {', '.join(bad)} back (`dcx cluster status {session.name}`), then re-run "
                               f"the same command: the move goes on from here")


def point_access_at(session: Session, spec: ClusterSpec, ctx: RunContext, staying: list[Host]) -> None:
    """Before any old control node goes: the docker context and ssh alias name a control node that stays."""
    control = [h for h in staying if h.node.role == "control"]
    if not control or spec.spec.engine.type != "swarm":
        return
    ctx.shared["swarm_manager"] = control[0].name
    assert session.state is not None
    access.setup(session.cdir, spec, dataclasses.replace(ctx, hosts=staying), session.state)


def mark_for_replacement(session: Session, names: list[str], reason: str) -> None:
    """`cluster roll`, `node replace`: these nodes get new machines with the same spec (the mark stays
    until the node has left, so a killed run goes on replacing them)."""
    from dcx.plan import REPLACE_PREFIX

    for name in names:
        session.journal(REPLACE_PREFIX + name, {"reason": reason})


# --- commands -------------------------------------------------------------------------------------


def recorded_spec(store: Any, name: str, file: str | None = None) -> tuple[Any, ClusterSpec]:
    """The cluster's state and its spec: the file given (it must name this cluster), else the one it was
    last created from as recorded in state (which has its secrets, such as a proxy password, masked)."""
    from dcx.errors import InputError
    from dcx.lifecycle.session import spec_stub

    state = store.cluster(name).load()
    if file is None:
        recorded = spec_stub(state)
        proxies = [recorded.spec.network.proxy] + [p.proxy for p in recorded.spec.pools]
        if any(px.password_masked for px in proxies if px):
            # state.json keeps no secret: new machines would get `***` as the proxy password.
            raise InputError(f"cluster {name}'s proxy password is not in dcx's state: give the spec file "
                             "with -f FILE (the one `dcx cluster create` was run with)")
        return state, recorded
    from dcx import spec as spec_module

    given = spec_module.load(file)
    if given.name != name:
        raise given.error(("metadata", "name"), f"is {given.name}, not cluster {name}")
    return state, given


def is_made_machine(node: dict[str, Any]) -> bool:
    """A machine dcx made (and can make anew), not one it was given (an ssh pool's host)."""
    from dcx.plan import PLACEMENT_KEYS
    from dcx.providers.registry import provider_class

    return not provider_class(node["provider"]).resets_machines and node["provider"] in PLACEMENT_KEYS


def replaceable(spec: ClusterSpec, node: dict[str, Any]) -> None:
    """Only machines dcx makes can be replaced by new ones: a given machine (ssh pool) is the same host."""
    from dcx.errors import InputError

    if not is_made_machine(node):
        raise InputError(f"{node['name']} is a machine dcx was given (pool {node['pool']}, {node['provider']}): "
                              "it has no new machine to be replaced by",
                              hint="to rebuild it, reset it (`dcx node remove`), then re-run `dcx cluster create`")
    if node["pool"] not in {p.name for p in spec.spec.pools}:
        raise InputError(f"{node['name']}'s pool {node['pool']} is no longer in the spec",
                              hint="`dcx cluster create -f FILE` removes it")


def roll(name: str, pools: list[str], options: Options, store: Any = None, file: str | None = None) -> Any:
    """`dcx cluster roll`: every node of the pools (all pools when none named) gets a new machine with the
    same spec, surge first, as a move does."""
    from dcx.errors import InputError
    from dcx.lifecycle.apply import apply
    from dcx.state import StateStore

    store = store or StateStore()
    state, spec = recorded_spec(store, name, file)
    known = [p.name for p in spec.spec.pools]
    unknown = [p for p in pools if p not in known]
    if unknown:
        raise InputError(f"cluster {name} has no pool {', '.join(unknown)} (pools: {', '.join(known)})")
    nodes = [n for n in state.nodes.values() if not pools or n["pool"] in pools]
    if not pools:  # every pool: those of given machines (ssh) have nothing to be replaced by
        given = sorted({n["pool"] for n in nodes if not is_made_machine(n)})
        if given and options.reporter:
            options.reporter.note(f"pool{'s' if len(given) > 1 else ''} {', '.join(given)}: machines dcx was "
                                  "given are not rolled (they have no new machine to be replaced by)")
        nodes = [n for n in nodes if is_made_machine(n)]
        if not nodes:
            raise InputError(f"cluster {name} has no node on a machine dcx made: nothing to roll")
    for n in nodes:
        replaceable(spec, n)
    return apply(spec, options, store, replace_nodes={n["name"]: "roll" for n in nodes})


def replace_node(name: str, node: str, options: Options, store: Any = None, file: str | None = None) -> Any:
    """`dcx node replace`: one node gets a new machine with the same spec (made and Ready before it goes)."""
    from dcx.lifecycle.apply import apply
    from dcx.state import StateStore

    store = store or StateStore()
    state, spec = recorded_spec(store, name, file)
    replaceable(spec, known_node(state, node))
    return apply(spec, options, store, replace_nodes={node: "node replace"})


def known_node(state: Any, node: str) -> dict[str, Any]:
    from dcx.errors import InputError

    if node not in state.nodes:
        raise InputError(f"cluster {state.name} has no node {node} (nodes: {', '.join(sorted(state.nodes))})")
    return state.nodes[node]


def remove_node(name: str, node: str, options: Options, store: Any = None,
                file: str | None = None) -> dict[str, Any]:
    """`dcx node remove`: the node is drained (a control node demoted; refused when quorum would be lost) and
    leaves, its machine goes, and its pool's count in the recorded spec is lowered by one, so that plan and
    status agree; the user's file still says the old count until edited (the returned note says so)."""
    from dcx.lifecycle.scale_down import remove_nodes
    from dcx.lifecycle.session import build_context, null_reporter, open_session
    from dcx.state import StateStore

    store = store or StateStore()
    reporter = options.reporter or null_reporter()
    with open_session(store, name, "node remove", reporter) as session:
        state = session.load_or_new(None)
        spec = recorded_spec(store, name, file)[1]
        data = known_node(state, node)
        session.key_path, session.public_key = session.cdir.private_key, ""
        existing = session.existing_nodes(spec, forget=False)
        leaving = [n for n in existing if n.name == node] or [Node.from_dict(data)]
        staying = [n for n in existing if n.name != node]
        ctx = build_context(session, spec, staying, options)
        try:
            gate(session, spec, ctx.hosts, options, before=[node])
            remove_nodes(session, spec, ctx, leaving, options)
        finally:
            ctx.sessions.close()
            # Gone (its machine deleted, state forgot it) even when narrowing the mesh after it failed:
            # the count goes down with it, or the next create would make the node again.
            note = lower_count(state, data) if node not in state.nodes else ""
            session.save()
        return {"cluster": name, "removed": node, "pool": data["pool"], "note": note}


def lower_count(state: Any, data: dict[str, Any]) -> str:
    """The recorded spec's count of the removed node's pool goes down by one; returns what the user must do."""
    for pool in state.spec.get("spec", {}).get("pools", []):
        if pool.get("name") == data["pool"] and pool.get("count"):
            pool["count"] = max(0, int(pool["count"]) - 1)
            return (f"pool {data['pool']} now has count {pool['count']} in dcx's record; set the same count "
                    f"in {state.spec_file or 'the spec file'}, or the next create makes a node again")
    return f"take {data['name']} out of pool {data['pool']}'s inventory, or the next create joins it again"
