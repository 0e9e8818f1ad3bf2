"""Desired (spec) vs actual (state + what providers report) -> Plan.

A plan against an unchanged, healthy cluster is empty. Computing a plan never changes anything.

A count-based pool wants `count` nodes. Its nodes whose placement (the provider, and the provider
settings that decide where and on what a machine runs: PLACEMENT_KEYS) is still the pool's are kept,
lowest index first; each node whose placement changed, or that is marked for replacement (`roll`,
`node replace`: resources `replace/NODE`), is replaced by a new node with an index no existing node of
the pool has, so names never collide (web-1..3 moving become web-4..6).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from dcx.errors import SpecError
from dcx.providers.base import Node, NodeRequest
from dcx.providers.registry import provider_class
from dcx.spec import ClusterSpec, PoolSpec, node_name, raise_located

# Per provider, the pool settings that decide where and on what a machine runs: a change to any of them
# (or to the pool's provider) means new machines. Settings not listed (tags, labels, ssh address kind,
# sshd hardening) apply to the machines as they are. ssh pools list none: their machines are given, not made.
PLACEMENT_KEYS: dict[str, tuple[str, ...]] = {
    "local": ("subnet",),
    "aws": ("region", "vpc", "subnet", "subnetCIDR", "instanceType", "image", "spot", "rootVolumeGiB"),
    "gcp": ("project", "zone", "network", "subnetwork", "machineType", "image", "preemptible", "diskGiB",
            "diskType"),
    "azure": ("subscription", "location", "resourceGroup", "vnet", "subnet", "vmSize", "image", "spot", "diskGiB"),
    "ssh": (),
}
PLACEMENT_PREFIX = "placement/"  # state resources: placement/NODE = the placement it was made with
REPLACE_PREFIX = "replace/"  # state resources: replace/NODE = {"reason": ...}: replace it (roll, node replace)


def placement(pool: PoolSpec) -> dict[str, str]:
    """Where and on what the pool's machines run, as recorded on each node when it is made."""
    settings = provider_class(pool.provider).settings_model.model_validate(pool.settings).model_dump()
    out = {"provider": pool.provider}
    for key in PLACEMENT_KEYS.get(pool.provider, ()):
        if settings.get(key) not in ("", None):
            out[key] = str(settings[key])
    return out


def placement_change(recorded: dict[str, str] | None, node: Node, pool: PoolSpec) -> str:
    """Why the node must move ("" when it stays): what differs between where it was made and the pool now.
    A node made before placements were recorded is compared on its provider only."""
    want = placement(pool)
    have = recorded if recorded is not None else {"provider": node.provider}
    if node.provider != pool.provider:
        return f"provider {node.provider} -> {pool.provider}"
    if recorded is None:
        return ""
    changed = [f"{k} {have.get(k, '-')} -> {want.get(k, '-')}" for k in sorted(set(have) | set(want))
               if have.get(k) != want.get(k)]
    return ", ".join(changed)


def node_index(cluster: str, pool: str, name: str) -> int | None:
    """N of cluster-pool-N; None for names dcx did not give."""
    prefix = node_name(cluster, pool, 0)[:-1]
    tail = name[len(prefix):] if name.startswith(prefix) else ""
    return int(tail) if tail.isdigit() else None


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
class Replacement:
    """An existing node and the new node that takes its place (made and Ready before the old one goes)."""

    old: Node
    new: NodeRequest
    reason: str


@dataclass
class Plan:
    cluster: str
    create: list[NodeRequest] = field(default_factory=list)
    keep: list[Node] = field(default_factory=list)
    remove: list[Node] = field(default_factory=list)
    converge: list[str] = field(default_factory=list)  # existing nodes that are not healthy in the cluster
    new_cluster: bool = False
    # Nodes that move: their new nodes are in `create` too; the old ones leave after the new ones are Ready.
    replace: list[Replacement] = field(default_factory=list)
    # Nodes in `remove` that leave because of a move (their pool has fewer old nodes than new ones to
    # make, e.g. after a run killed mid-move): they go after the new nodes are Ready, as replacements do.
    retire: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.create or self.remove or self.converge or self.new_cluster or self.replace)

    @property
    def moving(self) -> bool:
        """Nodes leave because others take their place: surge first, then gated removals."""
        return bool(self.replace or self.retire)

    def leaving(self) -> list[Node]:
        """Every node that leaves the cluster: replaced ones, then removed ones."""
        return [r.old for r in self.replace] + self.remove

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
            "replace": [{"name": r.old.name, "pool": r.old.pool, "role": r.old.role, "by": r.new.name,
                         "reason": r.reason} for r in self.replace],
            "remove": [{"name": n.name, "pool": n.pool, "role": n.role, "after_surge": n.name in self.retire}
                       for n in self.remove],
            "converge": self.converge,
        }


def make_plan(
    spec: ClusterSpec,
    existing: list[Node],
    healthy: dict[str, bool] | None,
    new_cluster: bool,
    named: dict[str, list[NodeRequest]] | None = None,
    resources: dict[str, Any] | None = None,
) -> Plan:
    """`existing`: nodes that exist (recorded or reported by providers). `healthy`: per node whether
    the engine reports it Ready (None when the cluster could not be asked). `resources`: the state's
    journal (recorded placements, replacement marks)."""
    resources = resources or {}
    named = named or {}
    plan = Plan(cluster=spec.name, new_cluster=new_cluster)
    pools = {p.name: p for p in spec.spec.pools}
    for pool in spec.spec.pools:
        mine = [n for n in existing if n.pool == pool.name]
        if pool.name in named:
            _plan_named(plan, named[pool.name], mine)
        else:
            _plan_counted(plan, spec, pool, mine, resources)
    plan.remove += [n for n in existing if n.pool not in pools]
    for n in plan.keep:
        if healthy is None or not healthy.get(n.name, False):
            plan.converge.append(n.name)
    return plan


def _plan_named(plan: Plan, wanted: list[NodeRequest], mine: list[Node]) -> None:
    """A pool whose provider names its nodes (an inventory): kept, created and removed by name."""
    have = {n.name: n for n in mine}
    names = {r.name for r in wanted}
    plan.create += [r for r in wanted if r.name not in have]
    plan.keep += [have[r.name] for r in wanted if r.name in have]
    plan.remove += [n for n in mine if n.name not in names]


def _plan_counted(plan: Plan, spec: ClusterSpec, pool: PoolSpec, mine: list[Node], resources: dict[str, Any]) -> None:
    def order(n: Node) -> tuple[int, str]:
        index = node_index(spec.name, pool.name, n.name)
        return (index if index is not None else 1 << 30, n.name)

    reasons = {}
    for n in mine:
        mark = resources.get(REPLACE_PREFIX + n.name)
        change = placement_change(resources.get(PLACEMENT_PREFIX + n.name), n, pool)
        if change or mark:
            reasons[n.name] = change or str((mark or {}).get("reason") or "marked for replacement")
    fit = sorted((n for n in mine if n.name not in reasons), key=order)
    moving = sorted((n for n in mine if n.name in reasons), key=order)
    count = pool.count or 0
    plan.keep += fit[:count]
    plan.remove += fit[count:]
    used = {i for i in (node_index(spec.name, pool.name, n.name) for n in mine) if i is not None}
    new = []
    index = 0
    while len(new) < count - len(fit[:count]):
        index += 1
        if index not in used:
            new.append(NodeRequest(name=node_name(spec.name, pool.name, index), pool=pool.name, role=pool.role,
                                   index=index))
    plan.create += new
    for old, req in zip(moving, new, strict=False):
        plan.replace.append(Replacement(old, req, reasons[old.name]))
    # More old nodes than new ones to make (the pool shrank as it moved, or a killed run made some new
    # nodes already): the rest leave too, after the new nodes are Ready.
    rest = moving[len(new):]
    plan.remove += rest
    plan.retire += [n.name for n in rest]
