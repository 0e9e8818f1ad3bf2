"""`dcx cluster destroy`: every node and resource of a cluster goes, found from state or, without it,
by the providers' tags."""

from __future__ import annotations

from dcx import access
from dcx.bootstrap.engines import get_engine
from dcx.bootstrap.phases import run_phases
from dcx.bootstrap.runtime import RemoveDcxFiles
from dcx.errors import InputError, OperationFailed
from dcx.lifecycle.session import (
    Options,
    Session,
    build_context,
    connect_for_reset,
    null_reporter,
    open_session,
    pools_by_provider,
    recorded_providers,
    spec_stub,
)
from dcx.plan import validate_provider_settings
from dcx.providers.base import FoundCluster, Node, Provider
from dcx.spec import ClusterSpec
from dcx.state import ClusterState, StateStore


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


def destroy_cluster(name: str | None, spec: ClusterSpec | None, options: Options, store: StateStore | None = None,
            cluster_id: str = "") -> list[str]:
    """Remove every node and resource of the cluster. With a spec and no state, the cluster is found
    by the providers' tags (find_clusters) and destroyed by its id; several of the name: SeveralClusters,
    unless `cluster_id` picks one."""
    store = store or StateStore()
    reporter = options.reporter or null_reporter()
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
                spec = spec_stub(state)
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
        failed: list[tuple[str, OperationFailed]] = []
        for pname, pools in groups.items():
            if only is not None and pname not in only:
                continue
            try:
                removed += destroy_provider(session, spec, pname, pools, options)
            except OperationFailed as exc:
                # One provider that cannot finish (a bare-metal host that is down, a cloud API refusing)
                # must not leave the others' machines running: go on, keep the state, say what is left.
                failed.append((pname, exc))
                reporter.note(f"{pname}: could not finish; going on with the other providers")
        if failed:
            session.state.status = "destroy-failed"
            if session.cdir.path.exists():  # a destroy by the spec alone keeps no state
                session.save()
            what = "; ".join(f"{pname}: {' '.join(exc.message.split())[:300]}" for pname, exc in failed)
            hints = list(dict.fromkeys(exc.hint for _, exc in failed if exc.hint))
            raise OperationFailed(f"destroy of {name} did not finish ({what}); the state keeps what is left",
                                  hint="; ".join(hints) or f"re-run `dcx cluster destroy {name}` once it can finish")
        if spec.file and not stateless:
            warn_of_namesakes(session, spec, name)
        access.teardown(session.cdir, name)
        # Under the lock, as one sequence with its release: a bucket store's objects go now, the lock
        # object right after them (no other run can take the lock in between); the directory on release.
        session.cdir.remove()
    return removed


def destroy_provider(session: Session, spec: ClusterSpec, pname: str, pools: list, options: Options) -> list[str]:
    """Everything one provider holds of the cluster: machines it keeps are reset first, then deleted."""
    assert session.state is not None
    provider = session.provider(pname, spec)
    session.reporter.note(f"destroying {pname} resources")
    nodes = provider.list_nodes(pools) if session.state.id else []
    recorded = [Node.from_dict(d) for d in session.state.nodes.values() if d.get("provider") == pname]
    known = {n.name: n for n in recorded + nodes}
    removed: list[str] = []
    if provider.resets_machines:
        reset_hosts(session, spec, list(known.values()), options)
    if known:
        provider.delete_nodes(pools, list(known.values()))
        removed += [f"node {n}" for n in sorted(known)]
    return removed + provider.sweep(pools)


def warn_of_namesakes(session: Session, spec: ClusterSpec, name: str) -> None:
    """After destroying the cluster this state knows: another cluster of the same name that the
    providers still see (made after its state was lost, or from another machine) is named, with the
    command that removes it, so `destroy -f` never ends silently while nodes of that name run."""
    others: list[FoundCluster] = []
    for pname, pools in pools_by_provider(spec).items():
        provider = session.provider(pname, spec)
        if type(provider).find_clusters is not Provider.find_clusters:
            others += [c for c in provider.find_clusters(pools) if c.id != session.state.id]
    for c in others:
        session.reporter.note(
            f"warning: another cluster named '{name}' remains (id {c.id}, {c.where}, created {c.created or '?'} "
            f"by {c.created_by or '?'}); its state is not here: remove it with "
            f"`dcx cluster destroy -f {spec.file} --cluster-id {c.id}`")


def reset_hosts(session: Session, spec: ClusterSpec, nodes: list[Node], options: Options) -> None:
    """For machines that stay (ssh pools): leave the cluster and remove what dcx put there."""
    if not nodes:
        return
    ctx = build_context(session, spec, nodes, options)
    try:
        engine = get_engine(spec.spec.engine.type)
        from dcx.bootstrap.mesh import mesh_reset_phases

        connect_for_reset(session, ctx, options)
        run_phases(ctx, engine.reset_phases(ctx, options.purge) + mesh_reset_phases(ctx)
                   + [RemoveDcxFiles(options.purge)])
    finally:
        ctx.sessions.close()

