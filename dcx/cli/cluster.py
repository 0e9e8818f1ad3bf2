"""`dcx cluster ...`: create, plan, status, list, destroy, env, kubeconfig."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from dcx.cli.common import ASK_BECOME, SKIP_UNREACHABLE, become_password, key_passphrase, options, out

if TYPE_CHECKING:
    from dcx.cli.output import Output
    from dcx.lifecycle.apply import ApplyResult

app = typer.Typer(help="Create, inspect and destroy clusters.", no_args_is_help=True)

FILE = typer.Option(None, "--file", "-f", help="The cluster spec (cluster.yaml).", dir_okay=False)


@app.command()
def create(
    ctx: typer.Context,
    file: Path = typer.Option(..., "--file", "-f", help="The cluster spec (cluster.yaml).", dir_okay=False),
    provision_only: bool = typer.Option(False, "--provision-only", help="Make and record the machines, then stop."),
    parallel: int = typer.Option(10, "--parallel", min=1, max=200, help="Hosts worked on at once."),
    ssh_timeout: float = typer.Option(300.0, "--ssh-timeout", min=1, help="Seconds to wait for a machine's SSH."),
    ask_become_pass: bool = ASK_BECOME,
    max_unavailable: int = typer.Option(1, "--max-unavailable", min=1,
                                        help="Replaced worker nodes that leave at once (control nodes: one)."),
    restore: Path = typer.Option(None, "--restore", dir_okay=False,
                                 help="Build the cluster from a `dcx cluster backup` archive (new machines)."),
    skip_unreachable: bool = SKIP_UNREACHABLE,
) -> None:
    """Create the cluster in FILE, or converge it to FILE (idempotent: re-run to resume)."""
    from dcx import spec
    from dcx.lifecycle.apply import apply

    o = out(ctx)
    cluster_spec = spec.load(file)
    result = apply(cluster_spec, options(ctx, parallel=parallel, ssh_timeout=ssh_timeout,
                                                provision_only=provision_only,
                                                become_password=become_password(ask_become_pass),
                                                key_passphrase=key_passphrase(), max_unavailable=max_unavailable,
                                                restore=str(restore) if restore else None,
                                                skip_unreachable=skip_unreachable))
    show_result(o, cluster_spec.name, result)


@app.command()
def backup(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Cluster name."),
    output_file: Path = typer.Option(None, "-o", "--output-file", dir_okay=False, help="Where to write the archive "
                                     "(default: dcx-NAME-backup-TIMESTAMP.tar.gz here); `-o json` is the format."),
    ssh_timeout: float = typer.Option(60.0, "--ssh-timeout", min=1, help="Seconds to wait for a node's SSH."),
    ask_become_pass: bool = ASK_BECOME,
) -> None:
    """Write one archive (0600) of the control plane's state, for `dcx cluster create -f SPEC --restore FILE`."""
    from dcx.lifecycle.backup import backup_cluster

    o = out(ctx)
    r = backup_cluster(name, output_file, options(ctx, ssh_timeout=ssh_timeout,
                                                  become_password=become_password(ask_become_pass),
                                                  key_passphrase=key_passphrase()))
    if o.json:
        o.data({"cluster": name, "archive": str(r.path), "engine": r.engine, "source_node": r.source,
                "bytes": r.size, "seconds": round(r.seconds, 2), "images": r.images, "members": r.members})
        return
    o.info(f"wrote {r.path} ({r.size} bytes, 0600; {r.engine} state from {r.source}"
           + (f", {r.images} image(s)" if r.images else "") + f", {r.seconds:.1f}s)")
    o.info(f"  restore on new machines: dcx cluster create -f SPEC --restore {r.path}")


def show_result(o: Output, name: str, result: ApplyResult) -> None:
    """What create (and roll, node replace) made: the nodes, and how to reach the cluster."""
    if o.json:
        o.data({"cluster": name, "plan": result.plan.to_dict(),
                "provisioned_only": result.provisioned_only,
                "nodes": [{"name": n.name, "pool": n.pool, "role": n.role, "address": n.ssh_address,
                           "ready": bool(result.health.get(n.name) and result.health[n.name].ready)}
                          for n in result.nodes],
                "access": result.access})
        return
    if result.provisioned_only:
        return
    o.table(None, ["node", "pool", "role", "address", "ready"],
            [[n.name, n.pool, n.role, n.ssh_address,
              "yes" if result.health.get(n.name) and result.health[n.name].ready else "no"] for n in result.nodes])
    o.info(f"cluster {name} is ready.")
    if result.access.get("docker_context"):
        o.info(f"  docker --context {result.access['docker_context']} node ls")
    if result.access.get("kube_context"):
        o.info(f"  kubectl --context {result.access['kube_context']} get nodes"
               + ("" if result.access.get("kubeconfig") else f"  (dcx cluster kubeconfig {name} > kubeconfig)"))
    o.info(f"  dcx node ssh {name} {result.nodes[0].name}" if result.nodes else "")
    o.info(f"  dcx cluster destroy {name}")


@app.command()
def plan(ctx: typer.Context, file: Path = typer.Option(..., "--file", "-f", dir_okay=False)) -> None:
    """Show what `create` would change. An unchanged, healthy cluster has an empty plan."""
    from dcx import spec
    from dcx.lifecycle import preview

    o = out(ctx)
    p = preview.plan(spec.load(file))
    if o.json:
        o.data(p.to_dict())
        return
    if p.empty:
        o.info(f"cluster {p.cluster}: no changes; the cluster matches the spec and is healthy.")
        return
    rows = [["+ create", r.name, r.pool, r.role] for r in p.create]
    rows += [["-/+ replace", r.old.name, r.old.pool, r.old.role, f"by {r.new.name}: {r.reason}"] for r in p.replace]
    rows = [row + [""] * (5 - len(row)) for row in rows]
    rows += [["- remove", n.name, n.pool, n.role, "after the new nodes are Ready" if n.name in p.retire else ""]
             for n in p.remove]
    rows += [["~ converge", name, "", "", ""] for name in p.converge]
    o.table(f"plan for {p.cluster}", ["action", "node", "pool", "role", "why"], rows)


@app.command()
def roll(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Cluster name."),
    pool: list[str] = typer.Option([], "--pool", help="Only this pool (repeat for several; default: every pool)."),
    max_unavailable: int = typer.Option(1, "--max-unavailable", min=1,
                                        help="Old worker nodes that leave at once (control nodes: one)."),
    parallel: int = typer.Option(10, "--parallel", min=1, max=200, help="Hosts worked on at once."),
    ssh_timeout: float = typer.Option(300.0, "--ssh-timeout", min=1, help="Seconds to wait for a machine's SSH."),
    file: Path = typer.Option(None, "--file", "-f", dir_okay=False,
                              help="The cluster spec (default: the one recorded at the last create)."),
    ask_become_pass: bool = ASK_BECOME,
) -> None:
    """Replace every node of the pools with a new machine of the same spec, surge first: new nodes join
    and are Ready, then old ones are drained and removed, each batch after a health gate."""
    from dcx.lifecycle.replace import roll as roll_pools

    o = out(ctx)
    what = f"pool{'s' if len(pool) != 1 else ''} {', '.join(pool)}" if pool else "every pool"
    if not o.confirm(f"replace every node of {what} of cluster {name} with a new machine?"):
        raise typer.Exit(1)
    result = roll_pools(name, pool, options(ctx, parallel=parallel, ssh_timeout=ssh_timeout,
                                            max_unavailable=max_unavailable, key_passphrase=key_passphrase(),
                                            become_password=become_password(ask_become_pass)),
                        file=str(file) if file else None)
    show_result(o, name, result)


@app.command()
def status(ctx: typer.Context, name: str = typer.Argument(..., help="Cluster name.")) -> None:
    """Ask the cluster itself how every node is."""
    from dcx.lifecycle.status import status as cluster_status

    o = out(ctx)
    st = cluster_status(name)
    if o.json:
        o.data(st)
    else:
        o.info(f"cluster {st['name']} ({st['engine']}, id {st['id']}): "
               + ("healthy" if st["healthy"] else f"NOT healthy ({st['status']})"))
        columns = ["node", "pool", "role", "provider", "address", "ready", "state"] + (["mesh"] if st["mesh"] else [])
        o.table(None, columns,
                [[n["name"], n["pool"], n["role"] + (" (leader)" if n["leader"] else ""), n["provider"],
                  n["address"], "yes" if n["ready"] else "no", n["state"] + (f": {n['detail']}" if n["detail"] else "")]
                 + ([mesh_cell(n["mesh"])] if st["mesh"] else []) for n in st["nodes"]])
    if not st["healthy"]:
        raise typer.Exit(1)


def mesh_cell(mesh: dict) -> str:
    """`100.96.0.1 2/3 peers, relayed: d1 via a1, down: b1` (peers answering over the mesh now, out of
    expected; which go through a relay; which do not answer), `dcx0 down`, or why it could not be read."""
    if mesh.get("error"):
        return f"unknown: {mesh['error']}"
    cell = f"{mesh.get('address', '')} {mesh.get('peers_up', 0)}/{mesh.get('peers_expected', 0)} peers"
    if mesh.get("link") not in (None, "up"):
        cell += ", dcx0 " + ("missing" if mesh["link"] == "absent" else "down")
    if mesh.get("relayed"):
        through: dict[str, list[str]] = {}
        for peer, relay in sorted(mesh["relayed"].items()):
            through.setdefault(relay, []).append(peer)
        cell += ", relayed: " + ", ".join(f"{' '.join(peers)} via {relay}" for relay, peers in sorted(through.items()))
    if mesh.get("peers_down"):
        cell += ", down: " + " ".join(mesh["peers_down"])
    return cell


@app.command("list")
def list_(ctx: typer.Context) -> None:
    """The clusters recorded on this machine."""
    from dcx.lifecycle.status import list_clusters

    o = out(ctx)
    rows = list_clusters()
    if o.json:
        o.data(rows)
        return
    o.table(None, ["name", "engine", "status", "nodes", "providers", "updated"],
            [[r["name"], r.get("engine", ""), r.get("status", r.get("error", "")), r.get("nodes", ""),
              ",".join(r.get("providers", [])), r.get("updated_at", "")] for r in rows])


@app.command()
def destroy(
    ctx: typer.Context,
    name: str = typer.Argument(None, help="Cluster name (or give -f FILE)."),
    file: Path = FILE,
    purge: bool = typer.Option(False, "--purge", help="ssh pools: also remove the container runtime."),
    cluster_id: str = typer.Option("", "--cluster-id", help="With -f and no local state: which cluster of "
                                   "that name (when several exist; destroy lists them)."),
    ask_become_pass: bool = ASK_BECOME,
    ssh_timeout: float = typer.Option(60.0, "--ssh-timeout", min=1,
                                      help="ssh pools: seconds to wait for a machine's SSH before giving up on it."),
    skip_unreachable: bool = SKIP_UNREACHABLE,
) -> None:
    """Remove every machine and resource of the cluster (ssh pools: reset the machines)."""
    from dataclasses import asdict

    from dcx import spec
    from dcx.errors import EXIT_BAD_INPUT
    from dcx.lifecycle.destroy import SeveralClusters, destroy_cluster
    from dcx.state import StateStore

    o = out(ctx)
    cluster_spec = spec.load(file) if file else None
    if not name and cluster_spec is None:
        raise typer.BadParameter("give a cluster NAME or -f FILE")
    target = name or cluster_spec.name  # type: ignore[union-attr]
    if not o.confirm(f"destroy cluster {target} and everything dcx made for it?"):
        raise typer.Exit(1)
    had_state = StateStore().cluster(target).exists()
    try:
        settings = options(ctx, purge=purge, ssh_timeout=ssh_timeout, skip_unreachable=skip_unreachable,
                           become_password=become_password(ask_become_pass), key_passphrase=key_passphrase())
        removed = destroy_cluster(name, cluster_spec, settings, cluster_id=cluster_id)
    except SeveralClusters as exc:
        # Several clusters share the name (a colleague's, say): list them, destroy none.
        o.error(exc.message, exc.hint)
        if o.json:
            o.data({"cluster": target, "removed": [], "clusters": [asdict(c) for c in exc.found]})
        else:
            o.table(None, ["id", "created", "by", "where"],
                    [[c.id, c.created, c.created_by, c.where] for c in exc.found])
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if o.json:
        o.data({"cluster": target, "removed": removed})
    elif not had_state and not removed:
        o.info(f"nothing named {target} was found (0 resources removed).")
    else:
        o.info(f"cluster {target} destroyed ({len(removed)} resources removed).")


@app.command()
def env(ctx: typer.Context, name: str = typer.Argument(...)) -> None:
    """Print the shell exports that point docker at the cluster."""
    from dcx import access
    from dcx.state import StateStore

    o = out(ctx)
    cdir = StateStore().cluster(name)
    state = cdir.load()
    if cdir.mirror is not None:  # a bucket store: this machine's ssh settings and their Include, from the state
        access.ensure_ssh_access(cdir, state, o.warn)
    host = f"ssh://{access.context_name(name)}"
    if o.json:
        o.data({"DOCKER_HOST": host, "ssh_config": str(cdir.ssh_dir / "config")})
    else:
        typer.echo(f"export DOCKER_HOST={host}")
        typer.echo(f"# ssh settings for it: {cdir.ssh_dir / 'config'} (included from ~/.ssh/config)")


@app.command()
def kubeconfig(ctx: typer.Context, name: str = typer.Argument(..., help="Cluster name.")) -> None:
    """Print the kubeconfig of a k3s cluster (context dcx-NAME). It holds client keys: keep it private."""
    from dcx import access
    from dcx.errors import DcxError
    from dcx.state import StateStore

    o = out(ctx)
    cdir = StateStore().cluster(name)
    state = cdir.load()
    path = access.kubeconfig_file(cdir)
    if not path.exists():
        why = "it is a swarm cluster" if state.engine != "k3s" else "it has not been fetched yet"
        hint = f"run `dcx cluster create -f {state.spec_file or 'FILE'}`" if state.engine == "k3s" else None
        raise DcxError(f"cluster {name} has no kubeconfig: {why}", hint=hint)
    text = path.read_text()
    if o.json:
        o.data({"cluster": name, "context": access.context_name(name), "path": str(path), "kubeconfig": text})
    else:
        typer.echo(text, nl=False)


@app.command()
def diagnose(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Cluster name."),
    output_file: Path = typer.Option(None, "-o", "--output-file", dir_okay=False, help="Where to write the archive "
                                     "(default: dcx-NAME-diagnose-TIMESTAMP.tar.gz here); `-o json` is the format."),
    ask_become_pass: bool = ASK_BECOME,
) -> None:
    """Gather everything about the cluster into one tar.gz (0600, secrets redacted) and say what looks wrong."""
    from dcx.cli.node import skip_ssh_config_exec

    skip_ssh_config_exec()
    from dcx.diagnose import diagnose as run_diagnose

    o = out(ctx)
    d = run_diagnose(name, output_file, become_password=become_password(ask_become_pass),
                     key_passphrase=key_passphrase())
    if o.json:
        o.data({"cluster": name, "archive": str(d.archive), "nodes": d.nodes, "unreachable": d.unreachable,
                "findings": d.findings})
        return
    o.info(f"wrote {d.archive} ({d.nodes} nodes, {d.unreachable} unreachable)")
    if d.findings:
        o.warn("what looks wrong:")
        for line in d.findings:
            o.warn(f"  {line}")
    else:
        o.info("nothing looks wrong")
