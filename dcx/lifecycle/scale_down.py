"""Nodes leaving a running cluster (a pool scaled down, a pool dropped): the engine takes them out
(drained, control nodes demoted first), then their machines go, and the nodes that stay drop them from
the mesh (delete_machines: every removal, also a move's, `cluster roll`'s and `node remove`'s, ends there)."""

from __future__ import annotations

import contextlib
import dataclasses

from dcx.bootstrap.engines import get_engine
from dcx.bootstrap.phases import RunContext, run_phases
from dcx.bootstrap.runtime import GatherFacts, RemoveDcxFiles
from dcx.bootstrap.ssh import connect_with_retry
from dcx.lifecycle.session import (
    Connect,
    Options,
    Session,
    build_context,
    connect_for_reset,
    pools_by_provider,
)
from dcx.providers.base import Node
from dcx.spec import ClusterSpec


def remove_nodes(session: Session, spec: ClusterSpec, ctx: RunContext, leaving: list[Node], options: Options) -> None:
    """Scale down: nodes leave the cluster (control nodes the control plane first), then machines go."""
    leaving_ctx = build_context(session, spec, leaving, options)
    try:
        for h in leaving_ctx.hosts:
            with contextlib.suppress(Exception):
                connect_with_retry(h.conn, 10)
        engine = get_engine(spec.spec.engine.type)
        engine.remove_nodes(RunContext(ctx.cluster_name, spec, ctx.hosts + leaving_ctx.hosts, ctx.sessions,
                                       ctx.reporter, ctx.parallel), leaving_ctx.hosts)
    finally:
        leaving_ctx.sessions.close()
    delete_machines(session, spec, leaving, options, ctx)


def delete_machines(session: Session, spec: ClusterSpec, leaving: list[Node], options: Options,
                    staying: RunContext) -> None:
    """Nodes that have left the cluster: their machines go (given machines are reset), state forgets them
    (with the relay routes to or through them), and the nodes in `staying` narrow the mesh to themselves."""
    by_provider: dict[str, list[Node]] = {}
    for n in leaving:
        by_provider.setdefault(n.provider, []).append(n)
    for name, nodes in by_provider.items():
        provider = session.provider(name, spec)
        if provider.resets_machines:
            reset_files(session, spec, nodes, options)
        provider.delete_nodes(pools_by_provider(spec).get(name, []), nodes)
        for n in nodes:
            session.forget_node(n.name)
    narrow_mesh(session, spec, staying, options)


def narrow_mesh(session: Session, spec: ClusterSpec, ctx: RunContext, options: Options) -> None:
    """After nodes left: the providers' firewalls let in the mesh port from the nodes in `ctx` only, and
    when the cluster uses the mesh, those nodes' dcx0 is configured again with each other as the only
    peers (the create's mesh phases, on them alone: `wg syncconf`, no restart; pairs a departed relay
    served are relayed anew), so that a plain re-run after this finds nothing to change in the mesh."""
    from dcx.bootstrap.mesh import mesh_phases, mesh_wanted
    from dcx.lifecycle.apply import assign_mesh, open_mesh_between_providers

    open_mesh_between_providers(session, spec, [h.node for h in ctx.hosts])
    if not ctx.hosts or not mesh_wanted(ctx):
        return
    unseen = [h for h in ctx.hosts if h.facts is None]  # `node remove` has not connected to them yet
    if unseen:
        run_phases(dataclasses.replace(ctx, hosts=unseen), [Connect(min(options.ssh_timeout, 60)), GatherFacts()])
    ctx.shared.pop("mesh_answered", None)  # what the departed nodes saw before they left
    assign_mesh(session, spec, ctx)  # addresses as recorded; forgets routes whose ends or relay left
    run_phases(ctx, mesh_phases(ctx))


def reset_files(session: Session, spec: ClusterSpec, nodes: list[Node], options: Options) -> None:
    """After a machine that stays has left the cluster: the mesh and dcx's files go."""
    from dcx.bootstrap.mesh import mesh_reset_phases

    ctx = build_context(session, spec, nodes, options)
    try:
        connect_for_reset(session, ctx, options)
        run_phases(ctx, mesh_reset_phases(ctx) + [RemoveDcxFiles(options.purge)])
    finally:
        ctx.sessions.close()

