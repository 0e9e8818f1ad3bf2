"""`dcx node ...`: list the nodes of a cluster, open a shell or run a command on one."""

from __future__ import annotations

import os
import shutil

import typer

from dcx.cli.common import out

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
    if not config.exists():
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
