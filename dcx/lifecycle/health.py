"""How every node of a cluster is: asked of the node (SSH, runtime, mesh) and of the engine."""

from __future__ import annotations

from typing import Any

from dcx.bootstrap.engines import NodeHealth, get_engine
from dcx.bootstrap.phases import RunContext
from dcx.errors import DcxError
from dcx.lifecycle.session import (
    Options,
    Session,
    build_context,
    spec_stub,
)
from dcx.providers.base import Node
from dcx.spec import ClusterSpec


def cluster_health(session: Session, spec: ClusterSpec | None, nodes: list[Node], options: Options,
                   with_mesh: bool = False) -> tuple[dict[str, NodeHealth], dict[str, dict[str, Any]]]:
    """How every node is: asked of the node itself (SSH, its container runtime answering, and with_mesh
    its mesh peers answering now) and of the engine (through a control node that answered), over one set
    of connections. A node is ready only when both say so."""
    from dcx.hostcheck import probe_nodes

    assert session.state is not None
    engine_type = spec.spec.engine.type if spec else session.state.engine
    engine = get_engine(engine_type)
    ctx = build_context(session, spec or spec_stub(session.state), nodes, options)
    try:
        addresses = mesh_addresses(session, ctx) if with_mesh else {}
        probes = probe_nodes(ctx.hosts, ctx.parallel, engine.uses_docker, addresses)
        try:
            health = engine.health(answered_context(ctx, probes))
        except DcxError as exc:
            health = {n.name: NodeHealth(n.name, False, state="unknown", detail=exc.message) for n in nodes}
        for name, probe in probes.items():
            health[name] = merge_probe(health.get(name) or NodeHealth(name, False, state="absent"), probe)
        mesh = {name: probe["mesh"] for name, probe in probes.items() if "mesh" in probe}
        return health, mesh
    finally:
        ctx.sessions.close()


def answered_context(ctx: RunContext, probes: dict[str, dict[str, Any]]) -> RunContext:
    """The engine is asked through control nodes that answered: one that did not would only make it wait
    for SSH again. The others stay in the context (the engine reports on them by name) as non-control."""
    import dataclasses

    hosts = [h if probes.get(h.name, {}).get("ssh") == "ok" or h.node.role != "control"
             else dataclasses.replace(h, node=dataclasses.replace(h.node, role="worker")) for h in ctx.hosts]
    return dataclasses.replace(ctx, hosts=hosts)


def merge_probe(health: NodeHealth, probe: dict[str, Any]) -> NodeHealth:
    """The engine's view of a node, overruled by what the node itself said."""
    engine_view = f"{health.state or 'unknown'}{': ' + health.detail if health.detail else ''}"
    if probe.get("ssh") != "ok":
        health.ready, health.state, health.detail = False, "unreachable", f"{probe.get('ssh')} (engine: {engine_view})"
    elif probe.get("runtime") == "down":
        health.ready, health.state = False, "runtime down"
        health.detail = f"docker does not answer on its socket (engine: {engine_view})"
    health.extra["probe"] = {k: v for k, v in probe.items() if k != "mesh"}
    return health


def mesh_addresses(session: Session, ctx: RunContext) -> dict[str, str]:
    """The cluster's mesh addresses (recorded in state when it has a mesh) of the nodes in ctx."""
    assert session.state is not None
    prefix = "mesh/address/"
    names = {h.name for h in ctx.hosts}
    return {k[len(prefix):]: v for k, v in session.state.resources.items()
            if k.startswith(prefix) and k[len(prefix):] in names}

