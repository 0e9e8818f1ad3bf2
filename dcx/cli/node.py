"""`dcx node ...`: list the nodes of a cluster, open a shell on one, run a command on many at once."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from dcx.cli.common import ASK_BECOME, SKIP_UNREACHABLE, become_password, key_passphrase, out

if TYPE_CHECKING:
    from dcx.cli.output import Output
    from dcx.fleet import NodeResult

app = typer.Typer(help="Work with a cluster's nodes.", no_args_is_help=True)


@app.command("list")
def list_(ctx: typer.Context, name: str = typer.Argument(..., help="Cluster name.")) -> None:
    """The nodes recorded for a cluster, with their addresses."""
    from dcx.state import StateStore

    o = out(ctx)
    state = StateStore().cluster(name).load()
    nodes = sorted(state.nodes.values(), key=lambda n: (n["role"] != "control", n["name"]))
    if o.json:
        o.data([{k: n.get(k) for k in ("name", "pool", "role", "provider", "ssh_address", "private_address",
                                          "public_address", "ssh_user", "ssh_port", "labels")} for n in nodes])
        return
    o.table(None, ["node", "pool", "role", "provider", "ssh address", "private address"],
            [[n["name"], n["pool"], n["role"], n["provider"], n["ssh_address"], n.get("private_address", "")]
             for n in nodes])


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ssh(ctx: typer.Context, name: str = typer.Argument(...), node: str = typer.Argument(...)) -> None:
    """Open a shell on NODE, or run `-- CMD...` there (OpenSSH, with the cluster key and host keys)."""
    from dcx.errors import InputError, PrerequisiteMissing
    from dcx.state import StateStore

    cdir = StateStore().cluster(name)
    state = cdir.load()
    if node not in state.nodes:
        raise InputError(f"cluster {name} has no node {node} (nodes: {', '.join(sorted(state.nodes))})")
    config = cdir.ssh_dir / "config"
    if cdir.mirror is not None:  # a bucket store: this machine's settings, from the state it holds
        from dcx import access

        config = access.write_ssh_files(cdir, state)
    elif not config.exists():
        raise InputError(f"no ssh settings for {name} yet", hint="run `dcx cluster create` to finish the cluster")
    ssh_bin = shutil.which("ssh")
    if not ssh_bin:
        raise PrerequisiteMissing("the ssh client is not installed", hint="apt-get install -y openssh-client")
    argv = [ssh_bin, "-F", str(config), node]
    extra = list(ctx.args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    if extra:
        argv += ["--", *extra]
    elif not os.isatty(0):
        argv.insert(1, "-T")
    os.execv(ssh_bin, argv)


@app.command("remove")
def remove(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Cluster name."),
    node: str = typer.Argument(..., help="The node to remove."),
    ssh_timeout: float = typer.Option(60.0, "--ssh-timeout", min=1, help="Seconds to wait for a machine's SSH."),
    file: Path = typer.Option(None, "--file", "-f", dir_okay=False,
                              help="The cluster spec (default: the one recorded at the last create)."),
    ask_become_pass: bool = ASK_BECOME,
    skip_unreachable: bool = SKIP_UNREACHABLE,
) -> None:
    """Drain NODE (a control node is demoted; refused when quorum would be lost), take it out of the
    cluster and delete its machine; its pool's count in dcx's record goes down by one (set the same
    count in the spec file, or the next create makes a node again)."""
    from dcx.cli.common import options
    from dcx.lifecycle.replace import remove_node

    o = out(ctx)
    if not o.confirm(f"drain {node} and remove it from cluster {name} (its machine is deleted)?"):
        raise typer.Exit(1)
    result = remove_node(name, node, options(ctx, ssh_timeout=ssh_timeout, key_passphrase=key_passphrase(),
                                             become_password=become_password(ask_become_pass),
                                             skip_unreachable=skip_unreachable),
                         file=str(file) if file else None)
    if o.json:
        o.data(result)
        return
    o.info(f"removed {node} from cluster {name}")
    o.warn(result["note"])


@app.command("replace")
def replace(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Cluster name."),
    node: str = typer.Argument(..., help="The node to replace."),
    ssh_timeout: float = typer.Option(300.0, "--ssh-timeout", min=1, help="Seconds to wait for a machine's SSH."),
    file: Path = typer.Option(None, "--file", "-f", dir_okay=False,
                              help="The cluster spec (default: the one recorded at the last create)."),
    ask_become_pass: bool = ASK_BECOME,
) -> None:
    """Replace NODE with a new machine of the same spec: the new node joins and is Ready, then NODE is
    drained (demoted first when it is a control node) and removed."""
    from dcx.cli.cluster import show_result
    from dcx.cli.common import options
    from dcx.lifecycle.replace import replace_node

    o = out(ctx)
    if not o.confirm(f"replace {node} of cluster {name} with a new machine?"):
        raise typer.Exit(1)
    result = replace_node(name, node, options(ctx, ssh_timeout=ssh_timeout, key_passphrase=key_passphrase(),
                                              become_password=become_password(ask_become_pass)),
                          file=str(file) if file else None)
    show_result(o, name, result)


@app.command("forget-key")
def forget_key(ctx: typer.Context, name: str = typer.Argument(...), node: str = typer.Argument(...)) -> None:
    """Forget NODE's recorded host key (after rebuilding the machine yourself)."""
    from dcx import access
    from dcx.state import StateStore

    cdir = StateStore().cluster(name)
    with cdir.lock("node forget-key"):
        state = cdir.load()
        state.host_keys.pop(node, None)
        cdir.save(state)
        access.write_known_hosts(cdir, state.host_keys)
    out(ctx).info(f"forgot the host key of {node}; the next connection records the new one")


@app.command("run")
def run(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Cluster name."),
    command: list[str] = typer.Argument(..., help="After `--`: a shell command line, run by `sh -c` on each node."),
    pool: list[str] = typer.Option([], "--pool", help="Only nodes of this pool (repeat for several)."),
    role: str = typer.Option(None, "--role", help="Only control or worker nodes."),
    node: list[str] = typer.Option([], "--node", help="Only this node (repeat for several)."),
    label: list[str] = typer.Option([], "--label", help="Only nodes labelled KEY=VALUE (repeat: all must match)."),
    sudo: bool = typer.Option(False, "--sudo", help="Run as root (sudo, for non-root logins)."),
    parallel: int = typer.Option(50, "--parallel", min=1, max=500, help="Nodes worked on at once."),
    timeout: float = typer.Option(600.0, "--timeout", min=0.1, help="Seconds a node's command may run."),
    fold_: bool = typer.Option(False, "--fold", help="Print identical results once, with the nodes that gave them."),
    ask_become_pass: bool = ASK_BECOME,
) -> None:
    """Run a command on every selected node at once: `dcx node run NAME [--pool P] ... -- CMD...`.

    CMD's words are joined with spaces and reach each node's shell as one command line (as with ssh):
    pipes, variables and globs work there; quote what your local shell must not expand. Exit 0 only
    when the command exited 0 on every node.
    """
    skip_ssh_config_exec()
    from dcx import fleet
    from dcx.cli.output import FleetProgress

    o = out(ctx)
    line = " ".join(command)
    selection = fleet.Selection(pools=pool, role=role, nodes=node, labels=fleet.parse_labels(label))
    with fleet.connections(name, selection, parallel=parallel, become_password=become_password(ask_become_pass),
                           key_passphrase=key_passphrase(), log_as="node run", sudo=sudo) as run_ctx:
        with FleetProgress(o, [h.name for h in run_ctx.hosts]) as progress:
            results = fleet.run_command(run_ctx, line, sudo=sudo, timeout=timeout,
                                        connect_timeout=min(timeout, 15.0), on_start=progress.started,
                                        on_done=lambda r: progress.done(r.node, short_outcome(r)))
    failed = [r for r in results if not r.ok]
    if o.json:
        doc = {"cluster": name, "command": line, "sudo": sudo, "ok": not failed,
               "summary": {"nodes": len(results), "ok": len(results) - len(failed), "failed": len(failed)},
               "nodes": [r.to_dict() for r in results]}
        if fold_:
            doc["groups"] = [g.to_dict() for g in fleet.fold(results)]
        o.data(doc)
    else:
        print_results(o, results, fold_)
    if failed:
        raise typer.Exit(1)


def skip_ssh_config_exec() -> None:
    """Before paramiko is first imported by a fleet command: paramiko.config imports `invoke` (~0.1 s, a
    tenth of a `node run` on 20 nodes) only to run ~/.ssh/config's `Match exec` lines. Fleet commands
    never read that file (nodes are reached at the endpoints `create` recorded), so invoke is marked
    absent for this process; a process that imported paramiko already is left as it is."""
    import sys

    if "paramiko" not in sys.modules:
        sys.modules.setdefault("invoke", None)  # type: ignore[arg-type]


def short_outcome(r: NodeResult) -> str:
    """ok, exit N, timed out after S s, unreachable: what the live status and the headers show."""
    if r.error:
        return r.error.split(":", 1)[0]
    return "ok" if r.exit_code == 0 else f"exit {r.exit_code}"


def print_results(o: Output, results: list[NodeResult], fold_: bool) -> None:
    """Each node's (or with --fold, each group's) header, then its output as the command printed it."""
    from dcx import fleet
    from dcx.cli.output import write_raw

    groups = fleet.fold(results) if fold_ else [fleet.Group([r.node], r) for r in results]
    for g in groups:
        r = g.result
        who = g.nodes[0] if len(g.nodes) == 1 else f"{', '.join(g.nodes)} ({len(g.nodes)} nodes)"
        when = "" if fold_ and len(g.nodes) > 1 else f" ({r.duration:.2f}s)"
        outcome = r.error or short_outcome(r)
        if not o.quiet or not r.ok:
            o.people.print(f"==> {who}: {outcome}{when}", style="green" if r.ok else "bold red", markup=False,
                           emoji=False)
        for text in (r.stdout, r.stderr):
            if text:
                write_raw(o, text if text.endswith("\n") else text + "\n")
    failed = [r for r in results if not r.ok]
    summary = f"{len(results)} node{'s' if len(results) != 1 else ''}: {len(results) - len(failed)} ok"
    if failed:
        summary += f", {len(failed)} failed (" + ", ".join(f"{r.node}: {short_outcome(r)}" for r in failed[:5])
        summary += ", ..." if len(failed) > 5 else ""
        summary += ")"
    # On stderr: stdout holds only what the nodes printed (and the headers), for pipes.
    if failed:
        o.warn(summary)
    elif not o.quiet:
        o.err.print(summary, markup=False, emoji=False, highlight=False)
