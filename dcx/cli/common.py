"""Helpers shared by the command modules."""

from __future__ import annotations

from pathlib import Path

import typer

from dcx.cli.output import Output, PhaseReporter
from dcx.engine import Options


def reporter(ctx: typer.Context) -> PhaseReporter:
    return PhaseReporter(ctx.obj)


def options(ctx: typer.Context, **kw: object) -> Options:
    return Options(reporter=reporter(ctx), **kw)  # type: ignore[arg-type]


def spec_path(file: Path | None) -> Path:
    if file is None:
        raise typer.BadParameter("a cluster file is required", param_hint="-f/--file")
    return file


def out(ctx: typer.Context) -> Output:
    return ctx.obj
