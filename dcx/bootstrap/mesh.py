"""WireGuard mesh between nodes that sit in networks that cannot reach each other.

With `network.mesh: auto` a mesh is needed when the cluster's nodes span more than one network
(providers or subnets); `wireguard` forces it, `none` turns it off.
"""

from __future__ import annotations

from dcx.bootstrap.phases import Phase, RunContext
from dcx.errors import OperationFailed


def networks(ctx: RunContext) -> set[str]:
    return {h.node.network or f"{h.node.provider}:{h.name}" for h in ctx.hosts}


def mesh_wanted(ctx: RunContext) -> bool:
    mode = ctx.spec.spec.network.mesh
    if mode == "none":
        return False
    if mode == "wireguard":
        return True
    return len(networks(ctx)) > 1


def mesh_phases(ctx: RunContext) -> list[Phase]:
    if not mesh_wanted(ctx):
        return []
    raise OperationFailed(
        "the nodes span networks that cannot reach each other (" + ", ".join(sorted(networks(ctx))) + ") and "
        "this dcx build has no WireGuard mesh yet",
        hint="put the pools in one network, or set network.mesh: none if they can route to each other")


def mesh_reset_phases(ctx: RunContext) -> list[Phase]:
    return []
