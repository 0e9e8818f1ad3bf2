"""`dcx cluster plan`: what `create` would do (dcx/plan.py computes the plan itself)."""

from __future__ import annotations

from dcx.lifecycle.health import cluster_health
from dcx.lifecycle.session import (
    Options,
    Session,
    null_reporter,
)
from dcx.plan import Plan, make_plan, validate_provider_settings
from dcx.spec import ClusterSpec
from dcx.state import StateStore


def plan(spec: ClusterSpec, store: StateStore | None = None) -> Plan:
    """What `create` would do. Asks providers what exists and the engine how healthy it is."""
    store = store or StateStore()
    validate_provider_settings(spec)
    session = Session(store, spec.name, "plan", null_reporter())
    state = session.load_or_new(None)  # in memory only: planning writes nothing
    named = session.named_requests(spec)
    if not session.cdir.exists():
        from dcx.plan import desired_nodes

        return Plan(cluster=spec.name, create=desired_nodes(spec, named), new_cluster=True)
    session.key_path, session.public_key = session.cdir.private_key, ""
    existing = session.existing_nodes(spec, forget=False)
    healthy: dict[str, bool] | None = None
    if existing and state.status == "ready":
        healthy = {k: v.ready for k, v in cluster_health(session, spec, existing, Options())[0].items()}
    return make_plan(spec, existing, healthy, new_cluster=not existing, named=named, resources=state.resources)

