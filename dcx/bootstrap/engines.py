"""The cluster-engine interface and its registry (swarm, k3s)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dcx.bootstrap.phases import Host, Phase, RunContext


@dataclass
class NodeHealth:
    name: str
    ready: bool
    role: str = ""  # control | worker, as the engine sees it
    state: str = ""  # engine's own word: ready, down, NotReady ...
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class ClusterEngine:
    type: str = ""
    uses_docker: bool = True  # the container runtime dcx installs and starts (k3s brings its own)

    def phases(self, ctx: RunContext) -> list[Phase]:
        raise NotImplementedError

    def health(self, ctx: RunContext) -> dict[str, NodeHealth]:
        """Ask the cluster itself how every node is (through a reachable control host)."""
        raise NotImplementedError

    def remove_nodes(self, ctx: RunContext, leaving: list[Host]) -> None:
        """Take nodes out of the cluster before their machines go (control nodes leave the control
        plane first, so quorum is kept)."""
        raise NotImplementedError

    def reset_phases(self, ctx: RunContext, purge: bool) -> list[Phase]:
        """Undo everything the engine put on the hosts (for machines that stay: the ssh provider)."""
        raise NotImplementedError


def engine_address(ctx: RunContext, host: Host) -> str:
    """The address the engine advertises: the mesh address when a mesh is up, else the private one."""
    from dcx.bootstrap.mesh import private_address

    return host.data.get("mesh_address") or private_address(host)


def get_engine(kind: str) -> ClusterEngine:
    if kind == "swarm":
        from dcx.bootstrap.swarm import SwarmEngine

        return SwarmEngine()
    if kind == "k3s":
        from dcx.bootstrap.k3s import K3sEngine

        return K3sEngine()
    raise ValueError(f"unknown engine {kind!r}")
