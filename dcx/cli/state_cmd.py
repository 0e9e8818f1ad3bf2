"""State-store commands: `dcx state migrate --to URL`, and the cluster commands that move or unlock
one cluster's state (`dcx cluster unlock|export|import`, registered on the cluster group here)."""

from __future__ import annotations

from pathlib import Path

import typer

from dcx.cli import cluster
from dcx.cli.common import out

app = typer.Typer(help="Where clusters' state lives (--state URL / DCX_STATE).", no_args_is_help=True)


@app.command()
def migrate(ctx: typer.Context, to: str = typer.Option(..., "--to", metavar="URL",
                                                       help="The store to copy every cluster to.")) -> None:
    """Copy every cluster of the current store (--state / DCX_STATE / DCX_HOME) to URL; the source is kept."""
    from dcx.state import StateStore
    from dcx.stores import parse_url
    from dcx.stores.moving import migrate as copy_all

    o = out(ctx)
    parse_url(to)
    source, target = StateStore(), StateStore(url=to)
    done = copy_all(source, target)
    if o.json:
        o.data({"from": source.url, "to": target.url, "clusters": [{"name": n, "result": r} for n, r in done]})
        return
    o.table(None, ["cluster", "result"], [[n, r] for n, r in done])
    o.info(f"{sum(r == 'copied' for _, r in done)} cluster(s) copied to {target.url}; {source.url} is unchanged: "
           "use --state/DCX_STATE to work on the new copy, and remove the old one when satisfied.")


@cluster.app.command()
def unlock(ctx: typer.Context, name: str = typer.Argument(..., help="Cluster name.")) -> None:
    """Break the lock a dead dcx left on the cluster in a bucket store (shows the holder first)."""
    from dcx.state import StateStore, check_cluster_name
    from dcx.stores.moving import break_lock, lock_holder

    o = out(ctx)
    store = StateStore()
    check_cluster_name(name)
    if store.mirror is None:
        o.info(f"cluster {name} is in the directory store {store.root}: its lock is released when the process "
               "holding it exits, so there is nothing to break.")
        return
    held = lock_holder(store, name)
    if held is None:
        o.info(f"cluster {name} is not locked in {store.url}.")
        return
    info, etag, line = held
    o.info(line)
    if not o.confirm("break this lock? (only if that run is dead: a live one would go on writing)"):
        raise typer.Exit(1)
    if not break_lock(store, name, etag):
        from dcx.errors import LockHeld

        raise LockHeld(f"the lock on cluster '{name}' changed while asking (its holder renewed or released it)",
                       hint="run `dcx cluster unlock` again to see who holds it now")
    if o.json:
        o.data({"cluster": name, "unlocked": True, "holder": info})
    else:
        o.info(f"lock on cluster {name} broken.")


@cluster.app.command("export")
def export_(ctx: typer.Context, name: str = typer.Argument(..., help="Cluster name."),
            file: Path = typer.Option(..., "-o", "--out-file", help="The tar.gz to write (0600).",
                                      dir_okay=False)) -> None:
    """Write everything of the cluster (state, SSH key in clear, known_hosts, secrets, logs) to one tar.gz."""
    from dcx.state import StateStore
    from dcx.stores.moving import export_cluster

    o = out(ctx)
    count = export_cluster(StateStore(), name, file)
    if o.json:
        o.data({"cluster": name, "file": str(file), "files": count})
    else:
        o.info(f"cluster {name} exported to {file} ({count} files; it holds the cluster's private key: "
               "keep it private).")


@cluster.app.command("import")
def import_(ctx: typer.Context, file: Path = typer.Argument(..., help="A tar.gz from `dcx cluster export`.",
                                                              dir_okay=False)) -> None:
    """Add a cluster from an export to the current store (never over an existing one)."""
    from dcx.state import StateStore
    from dcx.stores.moving import import_cluster

    o = out(ctx)
    store = StateStore()
    name = import_cluster(store, file)
    if o.json:
        o.data({"cluster": name, "store": store.url})
    else:
        o.info(f"cluster {name} imported into {store.url}.")
