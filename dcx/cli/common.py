"""Helpers shared by the command modules."""

from __future__ import annotations

import typer

from dcx.cli.output import Output, PhaseReporter


def reporter(ctx: typer.Context) -> PhaseReporter:
    return PhaseReporter(ctx.obj)


def options(ctx: typer.Context, **kw: object):  # noqa: ANN201 - dcx.lifecycle.session.Options, imported lazily
    from dcx.lifecycle.session import Options  # it pulls in paramiko: only commands that connect pay for it

    return Options(reporter=reporter(ctx), **kw)  # type: ignore[arg-type]


def out(ctx: typer.Context) -> Output:
    return ctx.obj


def become_password(ask: bool) -> str | None:
    """sudo's password, asked once: from the terminal (not echoed), else the first line of stdin (CI),
    or DCX_BECOME_PASSWORD. Registered as a secret so it can never reach a log or an error."""
    import os
    import sys

    from dcx.errors import InputError
    from dcx.log import register_secret

    value = os.environ.get("DCX_BECOME_PASSWORD")
    if ask and value is None:
        if sys.stdin.isatty():
            import getpass

            value = getpass.getpass("BECOME password: ")
        else:
            value = sys.stdin.readline().rstrip("\n")
            if not value:
                raise InputError("--ask-become-pass: no password on standard input",
                                 hint="pipe it in, or set DCX_BECOME_PASSWORD")
    if value:
        register_secret(value)
    return value or None


def key_passphrase() -> str | None:
    """The passphrase of encrypted SSH key files, from DCX_SSH_KEY_PASSPHRASE (never logged)."""
    import os

    from dcx.log import register_secret

    value = os.environ.get("DCX_SSH_KEY_PASSPHRASE")
    if value:
        register_secret(value)
    return value or None


ASK_BECOME = typer.Option(False, "--ask-become-pass", "-K",
                          help="Ask for sudo's password once (non-root logins whose sudo needs one).")
SKIP_UNREACHABLE = typer.Option(False, "--skip-unreachable",
                                help="ssh pools: a leaving machine that does not answer is left as it is (named in "
                                     "the output) instead of failing the run.")
