"""Apply / destroy orchestration: spec -> plan -> provision -> bootstrap -> verify -> state.

State is written the moment something exists (providers journal their resources before and after
each call), so a killed run resumes and `destroy` finds everything.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcx import access
from dcx.bootstrap.engines import ClusterEngine, NodeHealth, get_engine
from dcx.bootstrap.phases import Host, Phase, Reporter, RunContext, run_phases
from dcx.bootstrap.runtime import GatherFacts, InstallRuntime, RemoveDcxFiles, SetHostname, StartRuntime
from dcx.bootstrap.ssh import HostKeyStore, Sessions, Target, connect_with_retry
from dcx.errors import DcxError, InputError, OperationFailed
from dcx.log import log, start_run_log, stop_run_log
from dcx.plan import Plan, make_plan, validate_provider_settings
from dcx.providers.base import FoundCluster, Node, NodeRequest, Provider, ProviderContext
from dcx.providers.registry import provider_class
from dcx.spec import ClusterSpec
from dcx.state import ClusterDir, ClusterState, StateStore, new_cluster_id, now_iso


@dataclass
class Options:
    parallel: int = 10
    ssh_timeout: float = 300.0
    provision_only: bool = False
    purge: bool = False
    reporter: Reporter | None = None
    become_password: str | None = field(default=None, repr=False)
    key_passphrase: str | None = field(default=None, repr=False)


class Session:
    """One command's hold on one cluster: its directory, lock, state, log and providers."""

    def __init__(self, store: StateStore, name: str, command: str, reporter: Reporter) -> None:
        self.cdir: ClusterDir = store.cluster(name)
        self.name = name
        self.command = command
        self.reporter = reporter
        self.state: ClusterState | None = None
        self._providers: dict[str, Provider] = {}
        self.key_path: Path | None = None
        self.public_key = ""

    # state ---------------------------------------------------------------------------------------

    def load_or_new(self, spec: ClusterSpec | None) -> ClusterState:
        if self.cdir.exists():
            self.state = self.cdir.load()
        else:
            engine = spec.spec.engine.type if spec else "swarm"
            self.state = ClusterState(name=self.name, id=new_cluster_id(), engine=engine)
        if spec is not None:
            self.state.spec_file = str(Path(spec.file).resolve()) if spec.file else ""
            self.state.engine = spec.spec.engine.type
            self.state.spec = spec.model_dump(mode="json")
        return self.state

    def save(self) -> None:
        assert self.state is not None
        self.cdir.save(self.state)

    def journal(self, key: str, value: Any) -> None:
        assert self.state is not None
        if value is None:
            self.state.resources.pop(key, None)
        else:
            self.state.resources[key] = value
        self.save()

    def record_node(self, node: Node) -> None:
        assert self.state is not None
        self.state.nodes[node.name] = node.to_dict()
        self.save()

    def forget_node(self, name: str) -> None:
        assert self.state is not None
        self.state.nodes.pop(name, None)
        self.state.resources.pop(f"mesh/address/{name}", None)
        if self.state.host_keys.pop(name, None) is not None:
            access.write_known_hosts(self.cdir, self.state.host_keys)
        self.save()

    # providers -----------------------------------------------------------------------------------

    def provider(self, name: str, spec: ClusterSpec | None) -> Provider:
        if name not in self._providers:
            assert self.state is not None
            cls = provider_class(name)
            ctx = ProviderContext(
                cluster_name=self.name, cluster_id=self.state.id, ssh_public_key=self.public_key,
                ssh_private_key_path=self.key_path or self.cdir.private_key, workdir=self.cdir.provider_dir(name),
                journal=self.journal, resources=self.state.resources, log=log,
                network=spec.spec.network if spec else None, spec=spec,
                ssh_user=spec.spec.ssh.user if spec else "root")
            provider = cls(ctx)
            provider.check_prerequisites()
            self._providers[name] = provider
        return self._providers[name]

    def loaded_provider(self, name: str) -> Provider | None:
        """The provider if this run has used it already (status and node commands load none)."""
        return self._providers.get(name)

    def named_requests(self, spec: ClusterSpec) -> dict[str, list[NodeRequest]]:
        """Pools whose provider names the nodes itself (inventories)."""
        out = {}
        for pool in spec.spec.pools:
            requests = self.provider(pool.provider, spec).node_requests(pool)
            if requests is not None:
                out[pool.name] = requests
        return out

    def existing_nodes(self, spec: ClusterSpec, forget: bool = True) -> list[Node]:
        """What exists now, asked of the providers (not taken from state)."""
        assert self.state is not None
        out: list[Node] = []
        for name, pools in pools_by_provider(spec).items():
            out.extend(self.provider(name, spec).list_nodes(pools))
        reported = {n.name for n in out}
        # Nodes of pools no longer in the spec are not asked about: they exist until removed (the plan
        # removes them), not forgotten with their machines still running.
        pools = {p.name for p in spec.spec.pools}
        for name, data in self.state.nodes.items():
            if name not in reported and data.get("pool") not in pools:
                out.append(Node.from_dict(data))
                reported.add(name)
        # Nodes recorded but no longer reported are gone: forget them (and their host keys).
        for gone in [n for n in self.state.nodes if n not in reported and forget]:
            log.info("%s is recorded but no longer exists; forgetting it", gone)
            self.forget_node(gone)
        return out


def pools_by_provider(spec: ClusterSpec) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for pool in spec.spec.pools:
        out.setdefault(pool.provider, []).append(pool)
    return out


@contextlib.contextmanager
def open_session(store: StateStore, name: str, command: str, reporter: Reporter) -> Iterator[Session]:
    session = Session(store, name, command, reporter)
    with session.cdir.lock(command):
        handler = start_run_log(session.cdir.logs_dir / f"{now_iso().replace(':', '')}-{command.split()[0]}.log")
        log.info("dcx %s on cluster %s", command, name)
        try:
            yield session
        except DcxError as exc:
            log.error("failed: %s", exc.message)
            raise
        except BaseException:
            log.exception("internal error")
            raise
        finally:
            stop_run_log(handler)


# --- bootstrap ------------------------------------------------------------------------------------


def target_for(node: Node, session: Session, options: Options) -> Target:
    """How to reach a node. Machines dcx made take the cluster key; machines it was given (ssh pools)
    take their inventory's or ~/.ssh/config's keys, the agent and OpenSSH's default identities."""
    # A password the inventory gives for this host wins over -K's, as a host variable does in Ansible.
    provider = session.loaded_provider(node.provider)
    password = (provider.become_password(node) if provider else None) or options.become_password
    become = password if node.ssh_user != "root" else None
    if node.extra.get("endpoint"):
        from dcx.sshconfig import Endpoint

        return target_for_endpoint(node.name, Endpoint.from_dict(node.extra["endpoint"]), password)
    return Target(name=node.name, host=node.ssh_address, port=node.ssh_port, user=node.ssh_user,
                  key_files=[node.ssh_key or str(session.cdir.private_key)], become_password=become)


def target_for_endpoint(name: str, ep: Any, become_password: str | None) -> Target:
    """A machine dcx was given (inventory, ~/.ssh/config): its keys, the agent, OpenSSH's defaults, jumps."""
    jump = None
    for hop in ep.jumps:  # outermost first: each hop is reached through the one before
        # A hop also offers the destination's keys: bastions usually take the same operator key.
        jump = Target(name=f"jump-{hop.host}-{hop.port}", host=hop.host, port=hop.port, user=hop.user,
                      key_files=hop.key_files + [k for k in ep.key_files if k not in hop.key_files], jump=jump,
                      default_keys=True, booting=False)
    return Target(name=name, host=ep.host, port=ep.port, user=ep.user, key_files=ep.key_files, jump=jump,
                  default_keys=True, become_password=become_password if ep.user != "root" else None, booting=False)


class Connect(Phase):
    title = "Connect over SSH"
    read_only = True

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def run(self, ctx: RunContext, host: Host) -> None:
        connect_with_retry(host.conn, self.timeout)


def build_context(session: Session, spec: ClusterSpec, nodes: list[Node], options: Options) -> RunContext:
    assert session.state is not None
    keys = HostKeyStore(session.state.host_keys, on_change=lambda: _host_keys_changed(session))
    sessions = Sessions(keys, options.key_passphrase)
    hosts = []
    for node in sorted(nodes, key=lambda n: (n.role != "control", n.pool, n.name)):
        target = target_for(node, session, options)
        hosts.append(Host(node=node, target=target, conn=sessions.get(target)))
    return RunContext(cluster_name=spec.name, spec=spec, hosts=hosts, sessions=sessions,
                      reporter=session.reporter, parallel=options.parallel, secrets_dir=session.cdir)


def _host_keys_changed(session: Session) -> None:
    assert session.state is not None
    session.save()
    access.write_known_hosts(session.cdir, session.state.host_keys)


def base_phases(options: Options, engine: ClusterEngine) -> list[Phase]:
    from dcx.bootstrap.preflight import Preflight

    phases: list[Phase] = [Connect(options.ssh_timeout), SetHostname(), GatherFacts(), Preflight()]
    # k3s brings its own containerd: Docker is installed only for the engines that run on it.
    return phases + ([InstallRuntime(), StartRuntime()] if engine.uses_docker else [])


# --- commands ---------------------------------------------------------------------------------------


@dataclass
class ApplyResult:
    plan: Plan
    nodes: list[Node]
    provisioned_only: bool = False
    health: dict[str, NodeHealth] = field(default_factory=dict)
    access: dict[str, str] = field(default_factory=dict)


def apply(spec: ClusterSpec, options: Options, store: StateStore | None = None) -> ApplyResult:
    store = store or StateStore()
    reporter = options.reporter or _null_reporter()
    validate_provider_settings(spec)
    with open_session(store, spec.name, "create", reporter) as session:
        session.load_or_new(spec)
        assert session.state is not None
        session.save()  # write-ahead: the cluster exists (with its id) before any resource does
        session.key_path, session.public_key = session.cdir.ensure_ssh_key()
        existing = session.existing_nodes(spec)
        plan = make_plan(spec, existing, None, new_cluster=not existing, named=session.named_requests(spec))
        nodes = provision(session, spec, plan)
        if options.provision_only:
            session.state.status = "provisioned"
            session.save()
            reporter.note(f"provisioned {len(nodes)} nodes; `dcx cluster create -f {spec.file}` continues")
            return ApplyResult(plan, nodes, provisioned_only=True)
        ctx = build_context(session, spec, nodes, options)
        try:
            engine = get_engine(spec.spec.engine.type)
            assign_mesh(session, spec, ctx)
            from dcx.bootstrap.mesh import mesh_phases

            run_phases(ctx, base_phases(options, engine) + mesh_phases(ctx) + engine.phases(ctx))
            if plan.remove:
                remove_nodes(session, spec, ctx, plan.remove, options)
            sweep_dropped_providers(session, spec)
            health = engine.health(ctx)
            access_info = access.setup(session.cdir, spec, ctx, session.state)
            session.state.status = "ready"
            session.save()
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
    session.save()
    wanted = {r.name for r in plan.create} | {n.name for n in plan.keep}
    current = [nodes[name] for name in sorted(nodes) if name in wanted]
    open_mesh_between_providers(session, spec, current)
    return current


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


def plan(spec: ClusterSpec, store: StateStore | None = None) -> Plan:
    """What `create` would do. Asks providers what exists and the engine how healthy it is."""
    store = store or StateStore()
    validate_provider_settings(spec)
    session = Session(store, spec.name, "plan", _null_reporter())
    state = session.load_or_new(None)  # in memory only: planning writes nothing
    named = session.named_requests(spec)
    if not session.cdir.exists():
        from dcx.plan import desired_nodes

        return Plan(cluster=spec.name, create=desired_nodes(spec, named), new_cluster=True)
    session.key_path, session.public_key = session.cdir.private_key, ""
    existing = session.existing_nodes(spec, forget=False)
    healthy: dict[str, bool] | None = None
    if existing and state.status == "ready":
        healthy = {k: v.ready for k, v in cluster_health(session, spec, existing, Options())[0].items()}
    return make_plan(spec, existing, healthy, new_cluster=not existing, named=named)


def cluster_health(session: Session, spec: ClusterSpec | None, nodes: list[Node], options: Options,
                   with_mesh: bool = False) -> tuple[dict[str, NodeHealth], dict[str, dict[str, Any]]]:
    """How every node is: asked of the node itself (SSH, its container runtime answering, and with_mesh
    its mesh peers answering now) and of the engine (through a control node that answered), over one set
    of connections. A node is ready only when both say so."""
    from dcx.hostcheck import probe_nodes

    assert session.state is not None
    engine_type = spec.spec.engine.type if spec else session.state.engine
    engine = get_engine(engine_type)
    ctx = build_context(session, spec or _spec_stub(session.state), nodes, options)
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


def _spec_stub(state: ClusterState) -> Any:
    if state.spec:
        spec = ClusterSpec.model_validate(state.spec)
        # Paths in the spec (inventories, keys) stay relative to the file it was applied from.
        spec._file = state.spec_file
        return spec
    raise OperationFailed(f"cluster {state.name} has no recorded spec")


def status(name: str, store: StateStore | None = None) -> dict[str, Any]:
    store = store or StateStore()
    session = Session(store, name, "status", _null_reporter())
    state = session.cdir.load()
    session.state = state
    nodes = [Node.from_dict(d) for d in state.nodes.values()]
    spec = _spec_stub(state) if state.spec else None
    health, mesh = cluster_health(session, spec, nodes, Options(ssh_timeout=10), with_mesh=True) if nodes else ({}, {})
    rows = []
    for n in sorted(nodes, key=lambda n: (n.role != "control", n.name)):
        h = health.get(n.name)
        row = {
            "name": n.name, "pool": n.pool, "role": n.role, "provider": n.provider, "address": n.ssh_address,
            "private_address": n.private_address, "ready": bool(h and h.ready),
            "state": h.state if h else "unknown", "detail": h.detail if h else "",
            "leader": bool(h and h.extra.get("leader")),
            "checks": h.extra.get("probe", {}) if h else {},
        }
        if mesh:
            row["mesh"] = mesh.get(n.name, {})
        rows.append(row)
    mesh_ok = all(r["mesh"].get("link") == "up" and not r["mesh"].get("peers_down") for r in rows if "mesh" in r)
    return {
        "name": state.name, "id": state.id, "engine": state.engine, "status": state.status,
        "healthy": bool(rows) and all(r["ready"] for r in rows) and mesh_ok and state.status == "ready",
        "mesh": bool(mesh),
        "nodes": rows, "context": access.context_name(state.name) if state.engine == "swarm" else "",
        "updated_at": state.updated_at,
    }


def list_clusters(store: StateStore | None = None) -> list[dict[str, Any]]:
    store = store or StateStore()
    out = []
    for name in store.names():
        try:
            st = store.cluster(name).load()
        except DcxError as exc:
            out.append({"name": name, "error": exc.message})
            continue
        providers = sorted({n.get("provider", "") for n in st.nodes.values()})
        out.append({"name": st.name, "id": st.id, "engine": st.engine, "status": st.status,
                    "nodes": len(st.nodes), "providers": providers, "updated_at": st.updated_at})
    return out


class SeveralClusters(InputError):
    """`destroy -f` without state found more than one cluster of the name: one is chosen by id."""

    def __init__(self, name: str, found: list[FoundCluster]) -> None:
        ids = sorted({c.id for c in found})
        super().__init__(f"{len(ids)} clusters named '{name}' exist and there is no local state to tell which",
                         hint="pass --cluster-id ID with one of the ids listed")
        self.found = found


def choose_cluster(session: Session, spec: ClusterSpec, name: str, cluster_id: str) -> tuple[str, list[str]] | None:
    """Without state: the id of the one cluster of this name the spec's providers see (or the one
    given), and the providers to destroy with it. Providers that cannot list clusters (no
    find_clusters) sweep by name only when no provider found any cluster. None: nothing found."""
    found: list[FoundCluster] = []
    blind: list[str] = []
    groups = pools_by_provider(spec)
    for pname, pools in groups.items():
        provider = session.provider(pname, spec)
        if type(provider).find_clusters is Provider.find_clusters:
            blind.append(pname)
        else:
            found += provider.find_clusters(pools)
    ids = sorted({c.id for c in found})
    if cluster_id:
        if ids and cluster_id not in ids:
            raise InputError(f"no cluster named '{name}' with id {cluster_id} found (found: {', '.join(ids)})")
        if not ids and not blind:
            return None
        return cluster_id, sorted(groups)
    if len(ids) > 1:
        raise SeveralClusters(name, found)
    if ids:
        return ids[0], sorted(groups)
    return ("", blind) if blind else None


def destroy(name: str | None, spec: ClusterSpec | None, options: Options, store: StateStore | None = None,
            cluster_id: str = "") -> list[str]:
    """Remove every node and resource of the cluster. With a spec and no state, the cluster is found
    by the providers' tags (find_clusters) and destroyed by its id; several of the name: SeveralClusters,
    unless `cluster_id` picks one."""
    store = store or StateStore()
    reporter = options.reporter or _null_reporter()
    name = name or (spec.name if spec else None)
    assert name is not None
    if spec is not None:
        validate_provider_settings(spec)
    removed: list[str] = []
    with open_session(store, name, "destroy", reporter) as session:
        if spec is not None and (aside := session.cdir.set_aside_if_damaged()):  # the spec alone suffices
            reporter.note(f"warning: the state was damaged (moved to {aside}); destroying from the spec")
        if session.cdir.exists():
            state = session.load_or_new(None)
            if spec is None:
                spec = _spec_stub(state)
        else:
            if spec is None:
                raise InputError(f"no cluster named '{name}' (pass -f FILE to sweep by name without local state)")
            # No state: the id comes from what the providers find (choose_cluster, below).
            session.state = ClusterState(name=name, id="", engine=spec.spec.engine.type)
        assert session.state is not None and spec is not None
        stateless = not session.state.id
        if cluster_id and not stateless and cluster_id != session.state.id:
            raise InputError(f"the local state of '{name}' is cluster {session.state.id}, not {cluster_id}",
                             hint="destroy it by name, or use another DCX_HOME for the other cluster")
        session.state.status = "destroying"
        if session.cdir.path.exists():
            session.save()
        session.key_path, session.public_key = session.cdir.ensure_ssh_key()
        only: list[str] | None = None
        if stateless:
            chosen = choose_cluster(session, spec, name, cluster_id)
            if chosen is None:
                reporter.note(f"no cluster named '{name}' found in the spec's providers")
                only = []
            else:
                session.state.id, only = chosen
                for pname in only:  # providers made while looking now act on that id
                    session.provider(pname, spec).ctx.cluster_id = session.state.id
        groups = pools_by_provider(spec)
        # Providers the spec no longer names may still hold nodes or resources of this cluster.
        for pname in recorded_providers(session.state):
            groups.setdefault(pname, [])
        for pname, pools in groups.items():
            if only is not None and pname not in only:
                continue
            provider = session.provider(pname, spec)
            reporter.note(f"destroying {pname} resources")
            nodes = provider.list_nodes(pools) if session.state.id else []
            recorded = [Node.from_dict(d) for d in session.state.nodes.values() if d.get("provider") == pname]
            known = {n.name: n for n in recorded + nodes}
            if provider.resets_machines:
                reset_hosts(session, spec, list(known.values()), options)
            if known:
                provider.delete_nodes(pools, list(known.values()))
                removed += [f"node {n}" for n in sorted(known)]
            removed += provider.sweep(pools)
        access.teardown(session.cdir, name)
    # The cluster's directory goes last, after the lock is released.
    import shutil

    if session.cdir.path.exists():
        shutil.rmtree(session.cdir.path)
    return removed


def recorded_providers(state: ClusterState) -> list[str]:
    """Providers with nodes or journaled resources in the state (keys are `provider/...`)."""
    from dcx.providers.registry import available

    installed = set(available())
    names = {d.get("provider", "") for d in state.nodes.values()} | {k.split("/", 1)[0] for k in state.resources}
    return sorted(names & installed)


def sweep_dropped_providers(session: Session, spec: ClusterSpec) -> None:
    """A provider the spec no longer uses loses everything it made for the cluster (its nodes left
    the cluster already), as a resource dropped from a Terraform configuration is destroyed."""
    assert session.state is not None
    for pname in recorded_providers(session.state):
        if pname not in pools_by_provider(spec):
            removed = session.provider(pname, spec).sweep([])
            if removed:
                session.reporter.note(f"{pname} is no longer in the spec: removed {len(removed)} resource(s)")


def reset_files(session: Session, spec: ClusterSpec, nodes: list[Node], options: Options) -> None:
    """After a machine that stays has left the cluster: the mesh and dcx's files go."""
    from dcx.bootstrap.mesh import mesh_reset_phases

    ctx = build_context(session, spec, nodes, options)
    try:
        run_phases(ctx, [Connect(min(options.ssh_timeout, 60))] + mesh_reset_phases(ctx)
                   + [RemoveDcxFiles(options.purge)])
    finally:
        ctx.sessions.close()


def reset_hosts(session: Session, spec: ClusterSpec, nodes: list[Node], options: Options) -> None:
    """For machines that stay (ssh pools): leave the cluster and remove what dcx put there."""
    if not nodes:
        return
    ctx = build_context(session, spec, nodes, options)
    try:
        engine = get_engine(spec.spec.engine.type)
        from dcx.bootstrap.mesh import mesh_reset_phases

        run_phases(ctx, [Connect(min(options.ssh_timeout, 60))] + engine.reset_phases(ctx, options.purge)
                   + mesh_reset_phases(ctx) + [RemoveDcxFiles(options.purge)])
    finally:
        ctx.sessions.close()


def _null_reporter() -> Reporter:
    from dcx.bootstrap.phases import NullReporter

    return NullReporter()


logging.getLogger("dcx").addHandler(logging.NullHandler())


def run_on_nodes(name: str, command: str, stdin: bytes | None = None, nodes: list[str] | None = None,
                 options: Options | None = None, store: StateStore | None = None) -> list[tuple[str, int, str]]:
    """Run one command (as root) on every node of a recorded cluster (or the named ones), in parallel,
    through the fleet code `dcx node run` uses. Returns (node, exit code, last output lines) per node;
    raises when a node cannot be reached or the command does not finish."""
    from dcx import fleet
    from dcx.bootstrap.ssh import Result

    options = options or Options(ssh_timeout=30)
    with fleet.connections(name, fleet.Selection(nodes=list(nodes or [])), parallel=options.parallel,
                           become_password=options.become_password, key_passphrase=options.key_passphrase,
                           store=store) as ctx:
        results = fleet.run_command(ctx, command, sudo=True, timeout=600, connect_timeout=options.ssh_timeout,
                                    stdin=stdin)
    for r in results:
        if r.exit_code is None:
            raise OperationFailed(f"{r.node}: {r.error}")
    return [(r.node, r.exit_code or 0, Result(r.exit_code or 0, r.stdout, r.stderr).tail()) for r in results]
