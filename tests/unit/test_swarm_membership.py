"""How a node's swarm membership is read (what `create` does with it) and the quorum arithmetic that
refuses a removal. `info` rows are `docker info --format '{{json .Swarm}}'` as the Engine API's
SwarmInfo defines it (LocalNodeState: "" | inactive | pending | active | error | locked; NodeID;
RemoteManagers: [{NodeID, Addr}]); a worker reports no Cluster, so membership is told from the
manager's node list and the managers the node knows."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dcx.bootstrap.engines import QuorumLost, check_quorum
from dcx.bootstrap.phases import Host, RunContext
from dcx.bootstrap.ssh import Target
from dcx.bootstrap.swarm import LABEL_NODE, SwarmEngine, membership, task_service
from dcx.errors import OperationFailed
from dcx.providers.base import Node

OURS = {"10.0.0.1", "10.0.0.2", "10.0.0.3"}
MEMBERS = {"n1", "n2"}


def active(node_id: str, *managers: str) -> dict[str, Any]:
    return {"LocalNodeState": "active", "NodeID": node_id,
            "RemoteManagers": [{"NodeID": f"m{i}", "Addr": f"{a}:2377"} for i, a in enumerate(managers)]}


@pytest.mark.parametrize(("info", "members", "expected"), [
    ({"LocalNodeState": "inactive", "NodeID": ""}, MEMBERS, "none"),
    ({}, MEMBERS, "none"),  # a daemon that has never heard of swarm
    ({"LocalNodeState": "pending", "NodeID": ""}, MEMBERS, "pending"),  # a join that timed out goes on
    ({"LocalNodeState": "pending", "NodeID": "n9"}, MEMBERS, "pending"),  # not one of ours: join again
    ({"LocalNodeState": "error", "NodeID": "x"}, MEMBERS, "error"),
    ({"LocalNodeState": "pending", "NodeID": ""}, set(), "pending"),
    # a member while no manager answers (a swarm without quorum): not reset, refused
    ({"LocalNodeState": "pending", "NodeID": "n1"}, set(), "unreachable"),
    ({"LocalNodeState": "error", "NodeID": "n1"}, set(), "unreachable"),
    ({"LocalNodeState": "locked", "NodeID": "n2"}, MEMBERS, "locked"),
    (active("n2", "10.0.0.1"), MEMBERS, "member"),
    (active("n9", "10.0.0.1"), MEMBERS, "stale"),  # removed from this swarm, still thinks it is in
    (active("n9", "10.0.0.3"), set(), "stale"),  # its managers (ours) left: no manager lists it
    (active("n9", "192.0.2.7"), MEMBERS, "foreign"),  # another swarm's worker
    (active("n9", "192.0.2.7"), set(), "foreign"),
])
def test_membership(info: dict[str, Any], members: set[str], expected: str) -> None:
    assert membership(info, members, OURS) == expected


@pytest.mark.parametrize(("members", "removing", "message"), [
    (3, 2, "removing 2 of 3 managers leaves 1, quorum needs 2"),
    (2, 1, "removing 1 of 2 managers leaves 1, quorum needs 2"),
    (5, 3, "removing 3 of 5 managers leaves 2, quorum needs 3"),
    (3, 1, None), (5, 2, None), (1, 0, None), (4, 1, None),
])
def test_quorum_arithmetic(members: int, removing: int, message: str | None) -> None:
    if message is None:
        check_quorum(members, removing, "managers")
        return
    with pytest.raises(QuorumLost) as exc:
        check_quorum(members, removing, "managers")
    assert exc.value.message == message


def test_task_names_give_their_service() -> None:
    assert [task_service(n) for n in ["web.2", " \\_ web.2", "agent.x1y2z3", "my.app.1"]] == [
        "web", "web", "agent", "my.app"]


# --- a removal that would lose the managers' quorum changes nothing -------------------------------


class Manager:
    """Stands in for the SSH connection to one manager: it answers the reads dcx makes (`docker info`
    .Swarm, `docker node ls -q`, `docker node inspect --format '{{json .}}'` giving the Engine API's Node
    objects: ID, Spec.Role, Spec.Labels, ManagerStatus) and records every command; any other command
    (a demote, drain, leave, rm) is recorded as sent."""

    def __init__(self, nodes: list[dict[str, Any]]) -> None:
        self.nodes = nodes
        self.calls: list[str] = []

    def run(self, command: str, **_: Any) -> Any:
        from dcx.bootstrap.ssh import Result

        self.calls.append(command)
        if command == "docker info --format '{{json .Swarm}}'":
            return Result(0, json.dumps({"LocalNodeState": "active", "ControlAvailable": True}), "")
        if command == "docker node ls -q":
            return Result(0, "\n".join(n["ID"] for n in self.nodes), "")
        if command.startswith("docker node inspect --format "):
            return Result(0, "\n".join(json.dumps(n) for n in self.nodes), "")
        return Result(0, "", "")


def swarm_ctx(managers: int, workers: int) -> tuple[RunContext, Manager]:
    entries = [{"ID": f"id-c{i}", "Spec": {"Role": "manager", "Labels": {LABEL_NODE: f"c{i}"}},
                "ManagerStatus": {"Reachability": "reachable"}} for i in range(1, managers + 1)]
    entries += [{"ID": f"id-w{i}", "Spec": {"Role": "worker", "Labels": {LABEL_NODE: f"w{i}"}}}
                for i in range(1, workers + 1)]
    manager = Manager(entries)
    hosts = []
    for e in entries:
        name = e["Spec"]["Labels"][LABEL_NODE]
        node = Node(name=name, pool="p", provider="local", role="control" if name[0] == "c" else "worker",
                    ssh_address="192.0.2.1")
        hosts.append(Host(node=node, target=Target(name=name, host="192.0.2.1"), conn=manager))  # type: ignore[arg-type]
    return RunContext(cluster_name="demo", spec=None, hosts=hosts, sessions=None), manager  # type: ignore[arg-type]


READS = ("docker info", "docker node ls", "docker node inspect")


@pytest.mark.parametrize(("managers", "leaving", "message"), [
    (3, ["c2", "c3"], "removing 2 of 3 managers leaves 1, quorum needs 2"),
    (5, ["c3", "c4", "c5", "w1"], "removing 3 of 5 managers leaves 2, quorum needs 3"),
    (1, ["c1"], "cannot remove every control node"),
])
def test_swarm_refuses_a_removal_that_loses_quorum_before_any_change(managers: int, leaving: list[str],
                                                                      message: str) -> None:
    ctx, manager = swarm_ctx(managers, 1)
    with pytest.raises(OperationFailed, match=message):
        SwarmEngine().remove_nodes(ctx, [ctx.host(n) for n in leaving])
    assert [c for c in manager.calls if not c.startswith(READS)] == []


def test_swarm_worker_removal_drains_leaves_then_removes_its_entry() -> None:
    ctx, manager = swarm_ctx(3, 2)
    SwarmEngine().remove_nodes(ctx, [ctx.host("w2")])
    assert [c for c in manager.calls if not c.startswith((*READS, "docker node ps"))] == [
        "docker node update --availability drain id-w2", "docker swarm leave --force", "docker node rm --force id-w2"]


# --- roles and labels: an unchanged cluster is reported unchanged ------------------------------------

def test_label_nodes_changes_only_what_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    from dcx.bootstrap import swarm
    from tests.unit.test_phases import make_ctx

    ctx, _ = make_ctx(2)
    for i, h in enumerate(ctx.hosts, 1):
        h.data["swarm"] = {"NodeID": f"id{i}"}
    nodes = [{"ID": "id1", "Spec": {"Role": "manager", "Labels": swarm.desired_labels(ctx, ctx.hosts[0])}},
             {"ID": "id2", "Spec": {"Role": "manager", "Labels": {}}},  # n2 is a worker in the spec
             {"ID": "old", "Spec": {"Labels": {swarm.LABEL_NODE: "n2"}}, "Status": {"State": "down"}}]
    monkeypatch.setattr(swarm, "swarm_nodes", lambda manager: nodes)
    phase = swarm.LabelNodes()
    manager = ctx.hosts[0]
    assert phase.needs_run(ctx, manager)
    assert [name for name, _ in phase._roles] == ["n2"] and "--role worker" in phase._roles[0][1]
    assert "--label-add dcx.node=n2" in phase._roles[0][1] and phase._labels == [] and phase._stale == ["old"]
    nodes[1]["Spec"] = {"Role": "worker", "Labels": swarm.desired_labels(ctx, ctx.hosts[1])}
    del nodes[2]
    assert not phase.needs_run(ctx, manager)  # as it is wanted: nothing to do, reported unchanged
