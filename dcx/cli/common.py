"""Helpers shared by the command modules."""

from __future__ import annotations

import typer

from dcx.cli.output import Output, PhaseReporter


def reporter(ctx: typer.Context) -> PhaseReporter:
    return PhaseReporter(ctx.obj)


def options(ctx: typer.Context, **kw: object):  # noqa: ANN201 - dcx.engine.Options, imported lazily
    from dcx.engine import Options  # engine pulls in paramiko: only commands that connect pay for it

    return Options(reporter=reporter(ctx), **kw)  # type: ignore[arg-type]


def out(ctx: typer.Context) -> Output:
    return ctx.obj
