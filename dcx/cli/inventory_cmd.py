"""`dcx inventory ...`: bare-metal inventories (Ansible INI/YAML and dcx's own)."""

from __future__ import annotations

from pathlib import Path

import typer

from dcx.cli.common import ASK_BECOME, become_password, key_passphrase, out

app = typer.Typer(help="Read and check inventories of existing machines.", no_args_is_help=True)
FILE = typer.Argument(..., help="Inventory file (Ansible INI or YAML, or dcx's own).", dir_okay=False)
GROUP = typer.Option(None, "--group", "-g", help="Only this group (and its children).")


@app.command()
def show(ctx: typer.Context, file: Path = FILE, group: str = GROUP) -> None:
    """The hosts and how dcx would connect to each (no connection is made)."""
    from dcx import hostcheck

    o = out(ctx)
    rows = hostcheck.show(file, group)
    if o.json:
        o.data(rows)
        return
    o.table(None, ["host", "address", "port", "user", "key", "via"],
            [[r["name"], r["address"], r["port"], r["user"], ",".join(r["keys"]) or "(agent/defaults)",
              " -> ".join(r["jumps"])] for r in rows])


@app.command()
def check(ctx: typer.Context, file: Path = FILE, group: str = GROUP,
          parallel: int = typer.Option(20, "--parallel", min=1, max=200),
          timeout: float = typer.Option(15.0, "--timeout", min=1, help="Seconds to wait for each host."),
          ask_become_pass: bool = ASK_BECOME) -> None:
    """Connect to every host in parallel and report what each is (exit 1 when any is not usable)."""
    from dcx import hostcheck

    o = out(ctx)
    rows = hostcheck.check(file, group, parallel, timeout, become_password(ask_become_pass), key_passphrase())
    if o.json:
        o.data(rows)
    else:
        yes = {True: "yes", False: "no"}
        o.table(None, ["host", "address", "reachable", "os", "arch", "cpus", "memory", "init", "docker", "clock",
                       "sudo"],
                [[r["name"], r["address"], yes[r["reachable"]] if r["reachable"] else f"no: {r.get('error', '')}",
                  r.get("os", ""), r.get("arch", ""), r.get("cpus", ""),
                  f"{r['memory_mib']} MiB" if "memory_mib" in r else "", r.get("init", ""),
                  yes.get(r.get("docker"), ""), f"{r['clock_offset_s']:+.2f}s" if "clock_offset_s" in r else "",
                  yes.get(r.get("sudo"), "")] for r in rows])
    if not all(r["reachable"] and r.get("sudo") and "error" not in r for r in rows):
        raise typer.Exit(1)
