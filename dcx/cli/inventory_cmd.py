"""`dcx inventory ...`: bare-metal inventories (Ansible INI/YAML and dcx's own)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Read and check inventories of existing machines.", no_args_is_help=True)
