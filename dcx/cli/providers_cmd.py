"""`dcx providers list`: what is installed under the `dcx.providers` entry-point group."""

from __future__ import annotations

import typer

from dcx.cli.common import out

app = typer.Typer(help="Installed providers.", no_args_is_help=True)


@app.command("list")
def list_(ctx: typer.Context) -> None:
    """Installed providers (listed without importing them)."""
    from dcx.providers.registry import available

    o = out(ctx)
    rows = [{"name": name, "entry_point": ep.value, "package": ep.dist.name if ep.dist else ""}
            for name, ep in sorted(available().items())]
    if o.json:
        o.data(rows)
    else:
        o.table(None, ["provider", "entry point", "package"], [[r["name"], r["entry_point"], r["package"]]
                                                               for r in rows])
