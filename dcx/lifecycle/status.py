"""`dcx cluster status` and `dcx cluster list`."""

from __future__ import annotations

from typing import Any

from dcx import access
from dcx.errors import DcxError
from dcx.lifecycle.health import cluster_health
from dcx.lifecycle.session import (
    Options,
    Session,
    null_reporter,
    spec_stub,
)
from dcx.providers.base import Node
from dcx.state import StateStore


def status(name: str, store: StateStore | None = None) -> dict[str, Any]:
    store = store or StateStore()
    session = Session(store, name, "status", null_reporter())
    state = session.cdir.load()
    session.state = state
    nodes = [Node.from_dict(d) for d in state.nodes.values()]
    spec = spec_stub(state) if state.spec else None
    health, mesh = cluster_health(session, spec, nodes, Options(ssh_timeout=10), with_mesh=True) if nodes else ({}, {})
    rows = []
    for n in sorted(nodes, key=lambda n: (n.role != "control", n.name)):
        h = health.get(n.name)
        row = {
            "name": n.name, "pool": n.pool, "role": n.role, "provider": n.provider, "address": n.ssh_address,
            "private_address": n.private_address, "ready": bool(h and h.ready),
            "state": h.state if h else "unknown", "detail": h.detail if h else "",
            "leader": bool(h and h.extra.get("leader")),
            "checks": h.extra.get("probe", {}) if h else {},
        }
        if mesh:
            row["mesh"] = mesh.get(n.name, {})
            if "address" in row["mesh"] and "error" not in row["mesh"]:
                row["mesh"].update(mesh_paths(state.resources, n.name, [m.name for m in nodes if m is not n]))
        rows.append(row)
    mesh_ok = all(r["mesh"].get("link") == "up" and not r["mesh"].get("peers_down") for r in rows if "mesh" in r)
    return {
        "name": state.name, "id": state.id, "engine": state.engine, "status": state.status,
        "healthy": bool(rows) and all(r["ready"] for r in rows) and mesh_ok and state.status == "ready",
        "mesh": bool(mesh),
        "nodes": rows, "context": access.context_name(state.name) if state.engine == "swarm" else "",
        "updated_at": state.updated_at,
    }


def mesh_paths(resources: dict[str, Any], name: str, peers: list[str]) -> dict[str, Any]:
    """Which peers the node reaches directly and which through a relay (dcx.bootstrap.relay), as the
    last run recorded and applied them; whether they answer now is in peers_down."""
    from dcx.bootstrap.relay import peer_paths, routes_from_resources

    return peer_paths(name, peers, routes_from_resources(resources))


def list_clusters(store: StateStore | None = None) -> list[dict[str, Any]]:
    store = store or StateStore()
    out = []
    for name in store.names():
        try:
            st = store.cluster(name).load()
        except DcxError as exc:
            out.append({"name": name, "error": exc.message})
            continue
        providers = sorted({n.get("provider", "") for n in st.nodes.values()})
        out.append({"name": st.name, "id": st.id, "engine": st.engine, "status": st.status,
                    "nodes": len(st.nodes), "providers": providers, "updated_at": st.updated_at})
    return out

