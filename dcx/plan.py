"""Desired (spec) vs actual (state + what providers report) -> Plan.

A plan against an unchanged, healthy cluster is empty. Computing a plan never changes anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from dcx.errors import SpecError
from dcx.providers.base import Node, NodeRequest
from dcx.providers.registry import provider_class
from dcx.spec import ClusterSpec, PoolSpec, node_name, raise_located


def validate_provider_settings(spec: ClusterSpec) -> None:
    """Each pool's provider exists and its section is valid (located errors, exit 2)."""
    for i, pool in enumerate(spec.spec.pools):
        try:
            cls = provider_class(pool.provider)
        except Exception as exc:  # an unknown provider is the user's input: point at the field
            raise spec.error(("spec", "pools", i, "provider"), getattr(exc, "message", str(exc))) from None
        try:
            cls.settings_model.model_validate(pool.settings)
        except ValidationError as exc:
            if spec._locator is None:
                raise SpecError(spec.file, None, f"spec.pools[{i}].{pool.provider}", str(exc)) from None
            raise_located(exc, spec._locator, ("spec", "pools", i, pool.provider))


def desired_nodes(spec: ClusterSpec, named: dict[str, list[NodeRequest]] | None = None) -> list[NodeRequest]:
    """Stable names per pool: cluster-pool-1..count, or the names a provider gives (an inventory's)."""
    out = []
    for pool in spec.spec.pools:
        if named and pool.name in named:
            out.extend(named[pool.name])
            continue
        for i in range(1, (pool.count or 0) + 1):
            out.append(NodeRequest(name=node_name(spec.name, pool.name, i), pool=pool.name, role=pool.role, index=i))
    return out


@dataclass
class Plan:
    cluster: str
    create: list[NodeRequest] = field(default_factory=list)
    keep: list[Node] = field(default_factory=list)
    remove: list[Node] = field(default_factory=list)
    converge: list[str] = field(default_factory=list)  # existing nodes that are not healthy in the cluster
    new_cluster: bool = False

    @property
    def empty(self) -> bool:
        return not (self.create or self.remove or self.converge or self.new_cluster)

    def pools_to_create(self, spec: ClusterSpec) -> list[tuple[PoolSpec, list[NodeRequest]]]:
        by_pool: dict[str, list[NodeRequest]] = {}
        for req in self.create:
            by_pool.setdefault(req.pool, []).append(req)
        return [(spec.pool(name), reqs) for name, reqs in by_pool.items()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "empty": self.empty,
            "create": [{"name": r.name, "pool": r.pool, "role": r.role} for r in self.create],
            "keep": [n.name for n in self.keep],
            "remove": [{"name": n.name, "pool": n.pool, "role": n.role} for n in self.remove],
            "converge": self.converge,
        }


def make_plan(
    spec: ClusterSpec,
    existing: list[Node],
    healthy: dict[str, bool] | None,
    new_cluster: bool,
    named: dict[str, list[NodeRequest]] | None = None,
) -> Plan:
    """`existing`: nodes that exist (recorded or reported by providers). `healthy`: per node whether
    the engine reports it Ready (None when the cluster could not be asked)."""
    want = desired_nodes(spec, named)
    want_names = {r.name for r in want}
    have = {n.name: n for n in existing}
    plan = Plan(cluster=spec.name, new_cluster=new_cluster)
    plan.create = [r for r in want if r.name not in have]
    plan.keep = [have[r.name] for r in want if r.name in have]
    plan.remove = [n for n in existing if n.name not in want_names]
    for n in plan.keep:
        if healthy is None or not healthy.get(n.name, False):
            plan.converge.append(n.name)
    return plan
