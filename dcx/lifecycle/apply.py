"""`dcx cluster create`: spec -> plan -> provision -> bootstrap -> verify -> state.

State is written the moment something exists (providers journal their resources before and after
each call), so a killed run resumes and `destroy` finds everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dcx import access
from dcx.bootstrap.engines import NodeHealth, get_engine
from dcx.bootstrap.phases import RunContext, run_phases
from dcx.lifecycle.scale_down import remove_nodes
from dcx.lifecycle.session import (
    Options,
    Session,
    base_phases,
    build_context,
    null_reporter,
    open_session,
    pools_by_provider,
    recorded_providers,
)
from dcx.plan import Plan, make_plan, validate_provider_settings
from dcx.providers.base import Node
from dcx.spec import ClusterSpec
from dcx.state import StateStore


@dataclass
class ApplyResult:
    plan: Plan
    nodes: list[Node]
    provisioned_only: bool = False
    health: dict[str, NodeHealth] = field(default_factory=dict)
    access: dict[str, str] = field(default_factory=dict)


def apply(spec: ClusterSpec, options: Options, store: StateStore | None = None,
          replace_nodes: dict[str, str] | None = None) -> ApplyResult:
    """`replace_nodes`: node -> why, nodes to replace with new machines of the same spec (roll, node replace)."""
    store = store or StateStore()
    reporter = options.reporter or null_reporter()
    validate_provider_settings(spec)
    from dcx.lifecycle import restore

    backup = restore.load(options.restore, spec) if options.restore else None  # checked before anything is made
    with open_session(store, spec.name, "create", reporter) as session:
        if backup is not None:
            restore.refuse_existing(session, backup)
        session.load_or_new(spec)
        assert session.state is not None
        session.save()  # write-ahead: the cluster exists (with its id) before any resource does
        if backup is not None:
            restore.begin(session, backup)
        if replace_nodes:
            from dcx.lifecycle.replace import mark_for_replacement

            for node, reason in replace_nodes.items():
                mark_for_replacement(session, [node], reason)
        session.key_path, session.public_key = session.cdir.ensure_ssh_key()
        existing = session.existing_nodes(spec)
        plan = make_plan(spec, existing, None, new_cluster=not existing, named=session.named_requests(spec),
                         resources=session.state.resources)
        if plan.moving:
            from dcx.lifecycle.replace import journal_surge

            journal_surge(session, plan)
        nodes = provision(session, spec, plan)
        if options.provision_only:
            session.state.status = "provisioned"
            session.save()
            reporter.note(f"provisioned {len(nodes)} nodes; `dcx cluster create -f {spec.file}` continues")
            if plan.remove:  # provisioning only adds: the nodes the spec dropped go with the full create
                reporter.note(f"kept {len(plan.remove)} node(s) the spec no longer has: "
                              f"{', '.join(sorted(n.name for n in plan.remove))}; "
                              f"`dcx cluster create -f {spec.file}` removes them")
            return ApplyResult(plan, nodes, provisioned_only=True)
        ctx = build_context(session, spec, nodes, options)
        try:
            engine = get_engine(spec.spec.engine.type)
            engine.restore = backup.engine if backup is not None else None
            assign_mesh(session, spec, ctx)
            from dcx.bootstrap.mesh import mesh_phases
            from dcx.images import image_phases

            # The cluster's recorded images go on every node after its runtime starts and before it joins.
            run_phases(ctx, base_phases(options, engine) + mesh_phases(ctx)
                       + image_phases(session.cdir, session.state, engine.uses_docker) + engine.phases(ctx))
            if plan.moving:  # surge first: the new nodes are Ready above; the old ones leave in gated batches
                from dcx.lifecycle.replace import retire

                retire(session, spec, ctx, plan.leaving(), options)
                nodes = [h.node for h in ctx.hosts]
            elif plan.remove:
                remove_nodes(session, spec, ctx, plan.remove, options)
            sweep_dropped_providers(session, spec)
            health = engine.health(ctx)
            access_info = access.setup(session.cdir, spec, ctx, session.state)
            session.state.status = "ready"
            session.save()
            restore.finish(session)
            return ApplyResult(plan, nodes, health=health, access=access_info)
        except BaseException:
            session.state.status = "failed"
            session.save()
            raise
        finally:
            ctx.sessions.close()


def assign_mesh(session: Session, spec: ClusterSpec, ctx: RunContext) -> None:
    """Mesh addresses are recorded (not derived) so that adding a node never renumbers the others."""
    from dcx.bootstrap.mesh import assign_addresses, mesh_wanted

    if not mesh_wanted(ctx):
        return
    assert session.state is not None
    prefix = "mesh/address/"
    taken = {k[len(prefix):]: v for k, v in session.state.resources.items() if k.startswith(prefix)}
    addresses = assign_addresses(spec.spec.network.meshCIDR, [h.name for h in ctx.hosts], taken)
    for name, address in addresses.items():
        if taken.get(name) != address:
            session.journal(prefix + name, address)
    for h in ctx.hosts:
        h.data["mesh_address"] = addresses[h.name]
    from dcx.bootstrap.relay import load_routes

    load_routes(ctx, session.state.resources, session.journal, session.state.id)  # recorded relay routes


def provision(session: Session, spec: ClusterSpec, plan: Plan) -> list[Node]:
    assert session.state is not None
    nodes: dict[str, Node] = {n.name: n for n in plan.keep}
    # Existing nodes get a chance to be repaired (a stopped sshd, a stopped instance).
    for name, pools in pools_by_provider(spec).items():
        mine = [n for n in plan.keep if n.provider == name]
        if mine:
            for n in session.provider(name, spec).repair_nodes(pools, mine):
                nodes[n.name] = n
    for pool, requests in plan.pools_to_create(spec):
        session.reporter.note(f"creating {len(requests)} node(s) in pool {pool.name} ({pool.provider})")
        made = session.provider(pool.provider, spec).create_nodes(pool, requests)
        for n in made:
            nodes[n.name] = n
    for n in nodes.values():
        n.labels = {**spec.pool(n.pool).labels, **n.labels} if n.pool in {p.name for p in spec.spec.pools} else n.labels
        session.state.nodes[n.name] = n.to_dict()
    for n in plan.remove:
        session.state.nodes.setdefault(n.name, n.to_dict())
    record_placements(session, spec, plan)
    session.save()
    wanted = {r.name for r in plan.create} | {n.name for n in plan.keep}
    if plan.moving:  # the old nodes stay in the cluster (and the mesh) until their replacements are Ready
        from dcx.lifecycle.replace import leaving_already

        for n in plan.leaving():
            if not leaving_already(session, n.name):
                nodes.setdefault(n.name, n)
                wanted.add(n.name)
    current = [nodes[name] for name in sorted(nodes) if name in wanted]
    open_mesh_between_providers(session, spec, current)
    return current


def record_placements(session: Session, spec: ClusterSpec, plan: Plan) -> None:
    """Where each node was made (plan.placement), so that a later change to its pool replaces it. Nodes
    made before placements were recorded take their pool's current one (the plan kept them)."""
    from dcx.plan import PLACEMENT_PREFIX, placement

    assert session.state is not None
    for r in plan.create:
        session.state.resources[PLACEMENT_PREFIX + r.name] = placement(spec.pool(r.pool))
    for n in plan.keep:
        session.state.resources.setdefault(PLACEMENT_PREFIX + n.name, placement(spec.pool(n.pool)))


def open_mesh_between_providers(session: Session, spec: ClusterSpec, nodes: list[Node]) -> None:
    """Each provider's firewall lets in the mesh port from exactly the peers `mesh_peers` names. Called
    with no peers too: a cluster that no longer spans networks closes what it opened."""
    peers = mesh_peers(spec, nodes)
    for name, pools in pools_by_provider(spec).items():
        session.provider(name, spec).allow_mesh_peers(pools, peers.get(name, []), spec.spec.network.meshPort)


def mesh_peers(spec: ClusterSpec, nodes: list[Node]) -> dict[str, list[str]]:
    """Per provider, the public addresses its firewall must let in on the mesh port: the nodes in other
    networks when the cluster spans networks (a provider with nodes in two regions or VPCs lets in its
    own too); nothing otherwise."""
    def network(n: Node) -> str:
        return n.network or f"{n.provider}:{n.name}"  # as the mesh counts networks

    if spec.spec.network.mesh == "none" or len({network(n) for n in nodes}) < 2:
        return {}
    out = {}
    for name in pools_by_provider(spec):
        own_networks = {network(n) for n in nodes if n.provider == name}
        out[name] = sorted({n.public_address or n.ssh_address for n in nodes
                            if n.provider != name or len(own_networks) > 1})
    return out


def sweep_dropped_providers(session: Session, spec: ClusterSpec) -> None:
    """A provider the spec no longer uses loses everything it made for the cluster (its nodes left
    the cluster already), as a resource dropped from a Terraform configuration is destroyed."""
    assert session.state is not None
    for pname in recorded_providers(session.state):
        if pname not in pools_by_provider(spec):
            removed = session.provider(pname, spec).sweep([])
            if removed:
                session.reporter.note(f"{pname} is no longer in the spec: removed {len(removed)} resource(s)")

