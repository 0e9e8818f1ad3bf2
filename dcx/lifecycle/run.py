"""Run one command on every node of a recorded cluster (`dcx image load`/`import`)."""

from __future__ import annotations

from dcx.errors import OperationFailed
from dcx.lifecycle.session import (
    Options,
)
from dcx.state import StateStore


def run_on_nodes(name: str, command: str, stdin: bytes | None = None, nodes: list[str] | None = None,
                 options: Options | None = None, store: StateStore | None = None) -> list[tuple[str, int, str]]:
    """Run one command (as root) on every node of a recorded cluster (or the named ones), in parallel,
    through the fleet code `dcx node run` uses. Returns (node, exit code, last output lines) per node;
    raises when a node cannot be reached or the command does not finish."""
    from dcx import fleet
    from dcx.bootstrap.ssh import Result

    options = options or Options(ssh_timeout=30)
    with fleet.connections(name, fleet.Selection(nodes=list(nodes or [])), parallel=options.parallel,
                           become_password=options.become_password, key_passphrase=options.key_passphrase,
                           store=store) as ctx:
        results = fleet.run_command(ctx, command, sudo=True, timeout=600, connect_timeout=options.ssh_timeout,
                                    stdin=stdin)
    for r in results:
        if r.exit_code is None:
            raise OperationFailed(f"{r.node}: {r.error}")
    return [(r.node, r.exit_code or 0, Result(r.exit_code or 0, r.stdout, r.stderr).tail()) for r in results]
