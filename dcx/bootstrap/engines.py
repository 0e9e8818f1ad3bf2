"""The cluster-engine interface and its registry (swarm, k3s)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dcx.bootstrap.phases import Host, Phase, RunContext
from dcx.errors import OperationFailed


@dataclass
class NodeHealth:
    name: str
    ready: bool
    role: str = ""  # control | worker, as the engine sees it
    state: str = ""  # engine's own word: ready, down, NotReady ...
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EngineBackup:
    """An engine's control-plane state, as `dcx cluster backup` archives it and `create --restore` gives it
    back: archive members by name, the node it was taken from, and secrets (only ever inside the 0600
    archive: an unlock key, a cluster token)."""

    files: dict[str, bytes]
    source: str = ""
    secrets: dict[str, str] = field(default_factory=dict, repr=False)
    control_members: int = 0  # the control plane's members when it was taken (0: not known)


class ClusterEngine:
    type: str = ""
    uses_docker: bool = True  # the container runtime dcx installs and starts (k3s brings its own)
    # `create --restore`: the control plane is rebuilt from this backup instead of initialised empty.
    restore: EngineBackup | None = None

    def backup(self, ctx: RunContext) -> EngineBackup:
        """Take a consistent copy of the control plane's state from one control node."""
        raise NotImplementedError

    def phases(self, ctx: RunContext) -> list[Phase]:
        raise NotImplementedError

    def health(self, ctx: RunContext) -> dict[str, NodeHealth]:
        """Ask the cluster itself how every node is (through a reachable control host)."""
        raise NotImplementedError

    def remove_nodes(self, ctx: RunContext, leaving: list[Host]) -> None:
        """Take nodes out of the cluster before their machines go, one at a time: a removal that would
        lose the control plane's quorum is refused first; then each node is drained (its work
        rescheduled elsewhere, bounded by drain_timeout), demoted (control nodes: k3s's etcd member
        must go while the node still answers, after its pods) and removed. `ctx` holds every host,
        the leaving ones included."""
        api = self.control_host(ctx, exclude=leaving)
        members = self.control_members(ctx, api)
        check_quorum(len(members), len([h for h in leaving if h.name in members]), self.control_noun)
        # Workers first: the control plane shrinks last, each step with every other member up.
        for h in sorted(leaving, key=lambda h: h.name in members):
            self.drain(ctx, api, h)
            if h.name in members:
                self.demote(ctx, api, h)
            self.remove(ctx, api, h)

    # The steps remove_nodes takes; each engine implements them.
    control_noun = "control nodes"  # as the engine calls its control-plane members (the quorum message)
    drain_timeout = 120.0  # seconds a drain may take before the node is removed anyway

    def control_host(self, ctx: RunContext, exclude: list[Host]) -> Host:
        """A control node that stays and answers: removals are driven from it."""
        raise NotImplementedError

    def control_members(self, ctx: RunContext, api: Host) -> set[str]:
        """Names of the nodes that are members of the control plane's quorum now (swarm managers, etcd
        members), as the cluster itself reports them."""
        raise NotImplementedError

    def demote(self, ctx: RunContext, api: Host, host: Host) -> None:
        """Take a control node out of the control plane (it stays a node until removed)."""
        raise NotImplementedError

    def drain(self, ctx: RunContext, api: Host, host: Host) -> None:
        """No new work on the node; its work runs elsewhere (bounded by drain_timeout)."""
        raise NotImplementedError

    def remove(self, ctx: RunContext, api: Host, host: Host) -> None:
        """The node leaves and the cluster forgets it (its machine may be gone already)."""
        raise NotImplementedError

    def reset_phases(self, ctx: RunContext, purge: bool) -> list[Phase]:
        """Undo everything the engine put on the hosts (for machines that stay: the ssh provider)."""
        raise NotImplementedError


class QuorumLost(OperationFailed):
    """A removal that would leave fewer control-plane members than the quorum of the current ones."""


def check_quorum(members: int, removing: int, noun: str) -> None:
    """Raft (swarm) and etcd (k3s) commit only with a majority of their members: the members that stay
    must be a majority of those there are now, so that the cluster keeps its quorum while it shrinks."""
    if not removing:
        return
    left, need = members - removing, members // 2 + 1
    if left < need:
        spare = members - need
        raise QuorumLost(f"removing {removing} of {members} {noun} leaves {left}, quorum needs {need}",
                         hint=f"remove at most {spare} per run" if spare else f"add {noun} before removing any")


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
