"""Docker Swarm engine: init the first manager, join managers (one at a time) and workers, set
labels and roles, verify through `docker node ls`.

Join tokens are read from a manager at run time (once per phase), registered with the redactor, and
given to the joining node's daemon through the Engine API (`POST /swarm/join` over `docker system
dial-stdio`, see docker_api): never on a command line (`docker swarm join --token` would show it to every
local user in the process table), never in an environment, never stored, never printed.
"""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
from typing import Any

from dcx.bootstrap import docker_api
from dcx.bootstrap.docker_api import EngineAPIError
from dcx.bootstrap.engines import ClusterEngine, EngineBackup, NodeHealth, engine_address
from dcx.bootstrap.phases import Host, Phase, RunContext, run_phases
from dcx.errors import OperationFailed
from dcx.log import log, register_secret
from dcx.shell import cmd, q

SWARM_PORT = 2377
LABEL_NODE = "dcx.node"


def swarm_info(host: Host) -> dict[str, Any]:
    result = host.run("docker info --format '{{json .Swarm}}'", timeout=60, check=True, what="docker info")
    return json.loads(result.stdout.strip() or "{}")


def is_active(info: dict[str, Any]) -> bool:
    return info.get("LocalNodeState") == "active"


def is_manager(info: dict[str, Any]) -> bool:
    return is_active(info) and bool(info.get("ControlAvailable"))


def init_command(advertise: str, data_path: str | None = None, force_new_cluster: bool = False) -> str:
    argv = ["docker", "swarm", "init", "--advertise-addr", advertise, "--listen-addr", f"{advertise}:{SWARM_PORT}"]
    if force_new_cluster:  # a restored raft directory: this node alone becomes its swarm's manager
        argv.append("--force-new-cluster")
    if data_path:
        argv += ["--data-path-addr", data_path]
    return cmd(*argv)


def join_request(token: str, advertise: str, manager_addr: str, data_path: str | None = None) -> dict[str, Any]:
    """The body of the Engine API's POST /swarm/join (what `docker swarm join` sends)."""
    body: dict[str, Any] = {"ListenAddr": f"{advertise}:{SWARM_PORT}", "AdvertiseAddr": advertise,
                            "RemoteAddrs": [f"{manager_addr}:{SWARM_PORT}"], "JoinToken": token}
    if data_path:
        body["DataPathAddr"] = data_path
    return body


def join_swarm(host: Host, token: str, advertise: str, manager_addr: str, data_path: str | None = None) -> None:
    """Join through the node's Engine API: the token stays in the request body on the SSH session's stdin.
    The daemon answers when the node has joined (or has given up: its message says why)."""
    docker_api.call(host.conn, "POST", "/swarm/join", join_request(token, advertise, manager_addr, data_path),
                    what="docker swarm join", timeout=180)


class GatherSwarmState(Phase):
    title = "Read swarm membership"
    read_only = True
    pipelined = True  # its own daemon (and mesh) up is all it needs

    def run(self, ctx: RunContext, host: Host) -> None:
        host.data["swarm"] = facts_swarm_info(host) or settled_swarm_info(host)

    def prepare(self, ctx: RunContext) -> None:
        ctx.shared.pop("swarm_manager", None)


def facts_swarm_info(host: Host) -> dict[str, Any] | None:
    """The swarm state the facts read, when it still holds: no phase of this run has changed the host
    since (runtime, proxy, mesh) and it had settled. None: read it again."""
    if host.facts is None or not host.facts.docker_swarm or \
            host.data.get("facts_changes") != host.data.get("changes", 0):
        return None
    try:
        info = json.loads(host.facts.docker_swarm)
    except ValueError:
        return None
    if not isinstance(info, dict) or not info.get("LocalNodeState") or info.get("LocalNodeState") == "pending":
        return None
    return info


PENDING_WAIT = 30.0  # seconds


def settled_swarm_info(host: Host, timeout: float = PENDING_WAIT) -> dict[str, Any]:
    """The node's swarm state once it has settled: a daemon restarted on a member (or whose mesh just came
    back) reports "pending" while it reconnects, and is a member, not a node to join. A join that failed
    stays pending: after `timeout` it is returned as it is."""
    deadline = time.monotonic() + timeout
    while True:
        info = swarm_info(host)
        # No NodeID: the node never got its certificate, so this is a join that has not completed, not a
        # member reconnecting; there is nothing to wait for.
        if info.get("LocalNodeState") != "pending" or not info.get("NodeID") or time.monotonic() > deadline:
            return info
        time.sleep(1.0)


def find_manager(ctx: RunContext) -> Host | None:
    """An existing manager of this cluster: a re-run must never initialise a second swarm."""
    def cluster_id(h: Host) -> str:
        # Empty while the manager cannot read the cluster (no raft leader, or it is being demoted).
        return str((h.data["swarm"].get("Cluster") or {}).get("ID") or "")

    managers = [h for h in ctx.control_hosts + ctx.worker_hosts if is_manager(h.data.get("swarm", {}))]
    cluster_ids = {cluster_id(h) for h in managers} - {""}
    if len(cluster_ids) > 1:
        raise OperationFailed(
            "the control nodes belong to different swarms (" + ", ".join(sorted(cluster_ids)) + "); "
            "dcx will not merge them: reset the stray nodes (`docker swarm leave --force`) and re-run")
    managers.sort(key=lambda h: not cluster_id(h))  # one that knows its cluster first
    return managers[0] if managers else None


def membership(info: dict[str, Any], member_ids: set[str], our_addresses: set[str]) -> str:
    """A node's swarm membership as it is: none | member (of this cluster's swarm) | pending (a join that
    never finished, or a member that cannot reach its managers) | error | locked (autolock, daemon
    restarted) | stale (a membership of this cluster the swarm no longer has: it was removed, or its
    managers left) | foreign (a member of another swarm). `docker info` .Swarm: LocalNodeState, NodeID,
    RemoteManagers (Engine API SwarmInfo); member_ids: the node IDs this cluster's manager lists (empty
    when no manager is known); our_addresses: the cluster's nodes' swarm addresses. "unreachable": a
    member (pending or error) while no manager answers, which is not reset (see below)."""
    state = info.get("LocalNodeState") or "inactive"
    if state == "inactive":
        return "none"
    if state == "locked":
        return state
    if state != "active":  # pending | error
        # A node that was a member (it has a NodeID) while no manager of this cluster answers may be a
        # manager of a swarm that lost its quorum: leaving would throw its state away.
        return "unreachable" if info.get("NodeID") and not member_ids else state
    if info.get("NodeID") in member_ids:
        return "member"
    managers = {str(r.get("Addr", "")).rsplit(":", 1)[0] for r in info.get("RemoteManagers") or []}
    return "stale" if not managers or managers & our_addresses else "foreign"


class SettleMembership(Phase):
    """Every node is brought to none or member before anything joins: a pending join, an error or a
    stale membership of this cluster leaves (and joins again below); a locked node or a member of
    another swarm is refused, saying what to do."""

    title = "Settle swarm membership"

    def prepare(self, ctx: RunContext) -> None:
        manager = find_manager(ctx)
        self._members = {n["ID"] for n in swarm_nodes(manager)} if manager is not None else set()
        self._addresses = {engine_address(ctx, h) for h in ctx.hosts} | {h.node.private_address for h in ctx.hosts}

    def needs_run(self, ctx: RunContext, host: Host) -> bool:
        return membership(host.data.get("swarm", {}), self._members, self._addresses) not in ("none", "member")

    def run(self, ctx: RunContext, host: Host) -> None:
        info = host.data.get("swarm", {})
        kind = membership(info, self._members, self._addresses)
        if kind == "locked":
            raise OperationFailed(f"{host.name}: its swarm is locked (autolock; its daemon restarted): unlock it "
                                  "(`docker swarm unlock`) or reset it (`docker swarm leave --force`), then re-run")
        if kind == "unreachable":
            raise OperationFailed(f"{host.name} is a swarm member that cannot reach its managers ("
                                  f"{info.get('LocalNodeState')}): bring them back, or on a manager run "
                                  "`docker swarm init --force-new-cluster` (keeps the swarm) or `docker swarm leave "
                                  "--force` (discards it), then re-run")
        if kind == "foreign":
            managers = ", ".join(sorted(str(r.get("Addr")) for r in info.get("RemoteManagers") or []))
            raise OperationFailed(f"{host.name} is a member of another swarm (managers {managers}): take it out "
                                  "of that swarm (`docker swarm leave` on it) or out of the spec, then re-run")
        log.info("%s: swarm membership is %s; leaving so that it joins again", host.name, kind)
        host.run("docker swarm leave --force", timeout=120, check=True, what="docker swarm leave")
        host.data["swarm"] = swarm_info(host)


class InitSwarm(Phase):
    title = "Initialise swarm on the first control node"

    def hosts(self, ctx: RunContext) -> list[Host]:
        manager = find_manager(ctx)
        if manager is not None:
            ctx.shared["swarm_manager"] = manager.name
            return []
        return ctx.control_hosts[:1]

    def run(self, ctx: RunContext, host: Host) -> None:
        addr = engine_address(ctx, host)
        host.run(init_command(addr, host.data.get("mesh_address")), timeout=120, check=True, what="docker swarm init")
        host.data["swarm"] = swarm_info(host)
        ctx.shared["swarm_manager"] = host.name


def manager_host(ctx: RunContext) -> Host:
    name = ctx.shared.get("swarm_manager")
    if not name:
        raise OperationFailed("no swarm manager is reachable")
    return ctx.host(name)


def read_token(manager: Host, role: str) -> str:
    token = manager.run(cmd("docker", "swarm", "join-token", "-q", role), timeout=60, check=True,
                        what="reading the join token").stdout.strip()
    register_secret(token)
    return token


class _Join(Phase):
    role = "worker"

    def hosts(self, ctx: RunContext) -> list[Host]:
        return ctx.control_hosts if self.role == "manager" else ctx.worker_hosts

    def needs_run(self, ctx: RunContext, host: Host) -> bool:
        return not is_active(host.data.get("swarm", {}))

    def prepare(self, ctx: RunContext) -> None:
        manager = manager_host(ctx)
        self._manager_addr = engine_address(ctx, manager)
        self._token: str | None = None
        self._token_lock = threading.Lock()
        self._manager = manager

    def _get_token(self) -> str:
        # Once per phase, whatever the number of joining hosts: one session on the manager, not one each.
        with self._token_lock:
            if self._token is None:
                self._token = read_token(self._manager, self.role)
            return self._token

    def run(self, ctx: RunContext, host: Host) -> None:
        addr = engine_address(ctx, host)
        try:
            join_swarm(host, self._get_token(), addr, self._manager_addr, host.data.get("mesh_address"))
        except EngineAPIError as exc:
            raise OperationFailed(exc.message, hint=unreachable_hint(ctx, host, self._manager)) from None
        host.data["swarm"] = swarm_info(host)


def unreachable_hint(ctx: RunContext, host: Host, manager: Host) -> str | None:
    """Why a join may fail: nodes in different networks without the mesh cannot reach each other."""
    if host.data.get("mesh_address") or host.node.network == manager.node.network:
        return None
    return (f"{host.name} ({host.node.network}) and the manager {manager.name} ({manager.node.network}) sit in "
            "different networks and the mesh is off, so they may not reach each other's private addresses: "
            "set spec.network.mesh to auto or wireguard")


class JoinManagers(_Join):
    title = "Join control nodes"
    role = "manager"
    serial = True  # raft membership changes one at a time

    def prepare(self, ctx: RunContext) -> None:
        from dcx.bootstrap.swarm_address import note_stale_address

        super().prepare(ctx)
        if len(self.hosts(ctx)) > 1:  # a restored manager's old raft address (RefreshRestoredManager)
            note_stale_address(ctx, self._manager)

    def needs_run(self, ctx: RunContext, host: Host) -> bool:
        return not is_manager(host.data.get("swarm", {}))

    def run(self, ctx: RunContext, host: Host) -> None:
        from dcx.bootstrap.swarm_address import redirect_for_join

        info = host.data.get("swarm", {})
        if is_active(info):
            # A worker of this swarm where the spec has a control node (demoted by hand, or a run stopped
            # between RefreshRestoredManager's demote and promote): promoted, as a join would make it.
            self._manager.run(cmd("docker", "node", "promote", str(info.get("NodeID", ""))), timeout=120,
                              check=True, what=f"promoting {host.name}")
            wait_for(lambda: is_manager(swarm_info(host)), 120.0, f"{host.name} to be a manager")
            host.data["swarm"] = swarm_info(host)
            return
        redirect_for_join(ctx, host)
        super().run(ctx, host)


class JoinWorkers(_Join):
    title = "Join workers"
    role = "worker"
    # Through the first manager, initialised before: workers need not wait for the other managers' joins.
    pipelined = True


def swarm_nodes(manager: Host) -> list[dict[str, Any]]:
    ids = manager.run("docker node ls -q", timeout=60, check=True, what="docker node ls").stdout.split()
    if not ids:
        return []
    out = manager.run(cmd("docker", "node", "inspect", "--format", "{{json .}}", *ids), timeout=60, check=True,
                      what="docker node inspect").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def nodes_by_name(manager: Host) -> dict[str, dict[str, Any]]:
    """The swarm's nodes by their dcx.node label."""
    out = {}
    for n in swarm_nodes(manager):
        label = (n.get("Spec", {}).get("Labels") or {}).get(LABEL_NODE)
        if label:
            out[label] = n
    return out


def node_tasks(manager: Host, node_id: str) -> list[dict[str, Any]]:
    """A node's tasks (history included), each with `running`: its current state is Running."""
    out = manager.run(cmd("docker", "node", "ps", node_id, "--format", "{{json .}}"), timeout=60, check=True,
                      what="docker node ps").stdout
    tasks = [json.loads(line) for line in out.splitlines() if line.strip()]
    for task in tasks:
        task["running"] = str(task.get("CurrentState", "")).startswith("Running")
    return tasks


def task_service(task_name: str) -> str:
    """`web.2` (a replicated task) or `agent.<node id>` (a global one) -> `web`, `agent`; history rows
    are printed as ` \\_ web.2`."""
    return task_name.strip(" \\_").rsplit(".", 1)[0]


def services_short(manager: Host, names: set[str]) -> list[str]:
    """Of the named services, those running fewer tasks than they want (`docker service ls` Replicas
    "running/desired")."""
    if not names:
        return []
    out = manager.run(cmd("docker", "service", "ls", "--format", "{{.Name}} {{.Replicas}}"), timeout=60, check=True,
                      what="docker service ls").stdout
    short = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in names and "/" in parts[1]:
            running, desired = parts[1].split("/", 1)
            if int(running) < int(desired):
                short.append(parts[0])
    return short


def wait_for(predicate: Any, timeout: float, what: str, raise_on_timeout: bool = True) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            if raise_on_timeout:
                raise OperationFailed(f"timed out after {timeout:.0f}s waiting for {what}")
            return False
        time.sleep(1.0)
    return True


def desired_labels(ctx: RunContext, host: Host) -> dict[str, str]:
    labels = {LABEL_NODE: host.name, "dcx.pool": host.node.pool, "dcx.provider": host.node.provider,
              "dcx.cluster": ctx.cluster_name}
    labels.update(host.node.labels)
    return labels


class LabelNodes(Phase):
    """Done when every node has its role and dcx's labels, and no entry of a replaced machine is left (an
    unchanged re-run reports it unchanged)."""

    title = "Apply node roles and labels"

    def hosts(self, ctx: RunContext) -> list[Host]:
        return [manager_host(ctx)]

    def needs_run(self, ctx: RunContext, host: Host) -> bool:
        by_id = {n["ID"]: n for n in swarm_nodes(host)}
        self._roles: list[tuple[str, str]] = []  # (node name, command): role changes go one at a time
        self._labels: list[tuple[str, str]] = []
        for h in ctx.hosts:
            node_id = h.data.get("swarm", {}).get("NodeID")
            current = by_id.get(node_id)
            if current is None:
                continue
            want_role = "manager" if h.node.role == "control" else "worker"
            have = current.get("Spec", {}).get("Labels") or {}
            args: list[str] = []
            for k, v in desired_labels(ctx, h).items():
                if have.get(k) != v:
                    args += ["--label-add", f"{k}={v}"]
            if current.get("Spec", {}).get("Role") != want_role:
                self._roles.append((h.name, cmd("docker", "node", "update", *args, "--role", want_role, node_id)))
            elif args:
                self._labels.append((h.name, cmd("docker", "node", "update", *args, node_id)))
        # Entries left by machines that were replaced (same dcx.node label, other ID, down) are pruned.
        current_ids = {h.data.get("swarm", {}).get("NodeID") for h in ctx.hosts}
        names = {h.name for h in ctx.hosts}
        self._stale = [node_id for node_id, n in by_id.items()
                       if node_id not in current_ids and (n.get("Spec", {}).get("Labels") or {}).get(LABEL_NODE)
                       in names and n.get("Status", {}).get("State") == "down"]
        return bool(self._roles or self._labels or self._stale)

    def run(self, ctx: RunContext, host: Host) -> None:
        for name, command in self._roles:
            host.run(command, timeout=60, check=True, what=f"labelling {name}")
        update_side_by_side(host, self._labels)
        for node_id in self._stale:
            host.run(cmd("docker", "node", "rm", "--force", node_id), timeout=60)


LABEL_BATCH = 10  # docker CLIs at once on the manager


def update_side_by_side(manager: Host, updates: list[tuple[str, str]]) -> None:
    """Label updates (node name, command) in one session on the manager, up to LABEL_BATCH at once: one
    after another, each a session and a raft write, 19 workers took 5 s. Failures name their nodes."""
    if not updates:
        return
    batches = [updates[i:i + LABEL_BATCH] for i in range(0, len(updates), LABEL_BATCH)]
    script = " ".join(" ".join(f"{{ out=$({command} 2>&1) || printf '%s: %s\\n' {q(name)} \"$out\"; }} &"
                               for name, command in batch) + " wait;" for batch in batches)
    failed = manager.run(script, timeout=60 * len(batches), check=True, what="labelling nodes").stdout.strip()
    if failed:
        raise OperationFailed("labelling nodes failed: " + "; ".join(failed.splitlines()))


class VerifySwarm(Phase):
    title = "Verify every node is Ready"
    read_only = True
    timeout = 120.0

    def hosts(self, ctx: RunContext) -> list[Host]:
        return [manager_host(ctx)]

    def run(self, ctx: RunContext, host: Host) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            health = SwarmEngine().health(ctx, manager=host)
            not_ready = [h for h in health.values() if not h.ready]
            if not not_ready:
                return
            if time.monotonic() > deadline:
                waiting = ", ".join(f"{h.name} ({h.state or 'absent'}{': ' + h.detail if h.detail else ''})"
                                    for h in not_ready)
                raise OperationFailed(f"not Ready after {self.timeout:.0f}s: {waiting}")
            time.sleep(1.0)


class LeaveSwarm(Phase):
    title = "Leave the swarm"

    def needs_run(self, ctx: RunContext, host: Host) -> bool:
        # Any membership at all: a pending join or an error state stays until the node leaves.
        return (swarm_info(host).get("LocalNodeState") or "inactive") != "inactive"

    def run(self, ctx: RunContext, host: Host) -> None:
        host.run("docker swarm leave --force", timeout=120, check=True, what="docker swarm leave")


class SwarmEngine(ClusterEngine):
    type = "swarm"

    def phases(self, ctx: RunContext) -> list[Phase]:
        if len(ctx.control_hosts) % 2 == 0:
            ctx.reporter.note(f"warning: {len(ctx.control_hosts)} control nodes: swarm's raft needs an odd "
                              "number to tolerate failures (3 tolerate 1, 5 tolerate 2)")
        from dcx.bootstrap.swarm_address import RefreshRestoredManager

        if self.restore is not None:  # `create --restore`: the first manager starts from the backup's raft data
            return [GatherSwarmState(), SettleMembership(), RestoreSwarm(self.restore), JoinManagers(), JoinWorkers(),
                    RefreshRestoredManager(), LabelNodes(), PruneOldNodes(), VerifySwarm()]
        return [GatherSwarmState(), SettleMembership(), InitSwarm(), JoinManagers(), JoinWorkers(),
                RefreshRestoredManager(), LabelNodes(), VerifySwarm()]

    def backup(self, ctx: RunContext) -> EngineBackup:
        return backup_swarm(ctx, self._any_manager(ctx))

    def health(self, ctx: RunContext, manager: Host | None = None) -> dict[str, NodeHealth]:
        manager = manager or self._any_manager(ctx)
        nodes = swarm_nodes(manager)
        by_name: dict[str, dict[str, Any]] = {}
        by_addr: dict[str, dict[str, Any]] = {}
        for n in nodes:
            label = (n.get("Spec", {}).get("Labels") or {}).get(LABEL_NODE)
            state = n.get("Status", {}).get("State")
            # A replaced machine leaves a down entry with the same label: prefer the live one.
            if label and (label not in by_name or state == "ready"):
                by_name[label] = n
            by_addr[n.get("Status", {}).get("Addr", "")] = n
        out: dict[str, NodeHealth] = {}
        for h in ctx.hosts:
            n = by_name.get(h.name) or by_addr.get(engine_address(ctx, h))
            if n is None:
                out[h.name] = NodeHealth(h.name, False, state="absent", detail="not in the swarm")
                continue
            status = n.get("Status", {})
            spec = n.get("Spec", {})
            ms = n.get("ManagerStatus") or {}
            ready = status.get("State") == "ready" and spec.get("Availability") == "active"
            if spec.get("Role") == "manager":
                ready = ready and ms.get("Reachability") == "reachable"
            out[h.name] = NodeHealth(
                h.name, ready, role="control" if spec.get("Role") == "manager" else "worker",
                state=status.get("State", ""), detail=status.get("Message", "") if not ready else "",
                extra={"id": n.get("ID"), "leader": bool(ms.get("Leader")), "availability": spec.get("Availability"),
                       "engine_version": n.get("Description", {}).get("Engine", {}).get("EngineVersion", "")})
        return out

    def _any_manager(self, ctx: RunContext, among: list[Host] | None = None) -> Host:
        errors = []
        for h in ctx.control_hosts if among is None else among:
            try:
                if is_manager(swarm_info(h)):
                    return h
            except Exception as exc:  # noqa: BLE001 - try the next control host
                errors.append(f"{h.name}: {exc}")
        raise OperationFailed("no reachable swarm manager" + (": " + "; ".join(errors) if errors else ""))

    control_noun = "managers"

    def control_host(self, ctx: RunContext, exclude: list[Host]) -> Host:
        staying = [h for h in ctx.control_hosts if h not in exclude]
        if not staying:
            raise OperationFailed("cannot remove every control node of a running cluster")
        return self._any_manager(ctx, among=staying)

    def control_members(self, ctx: RunContext, api: Host) -> set[str]:
        return {name for name, n in nodes_by_name(api).items() if n.get("Spec", {}).get("Role") == "manager"}

    def demote(self, ctx: RunContext, api: Host, host: Host) -> None:
        n = nodes_by_name(api).get(host.name)
        if n is None:
            return
        log.info("demoting %s before it leaves", host.name)
        api.run(cmd("docker", "node", "demote", n["ID"]), timeout=120, check=True, what="docker node demote")
        # One at a time: the next change waits until raft has let this one go.
        wait_for(lambda: not (nodes_by_name(api).get(host.name) or {}).get("ManagerStatus"), 60.0,
                 f"{host.name} to leave the managers")

    def drain(self, ctx: RunContext, api: Host, host: Host) -> None:
        n = nodes_by_name(api).get(host.name)
        if n is None:
            return
        services = {task_service(t["Name"]) for t in node_tasks(api, n["ID"]) if t["running"]}
        api.run(cmd("docker", "node", "update", "--availability", "drain", n["ID"]), timeout=60, check=True,
                what=f"draining {host.name}")
        started = time.monotonic()
        # A node that is down cannot report its tasks stopped: only their replacements are waited for.
        reachable = n.get("Status", {}).get("State") == "ready"

        def drained() -> bool:
            running = [t["Name"] for t in node_tasks(api, n["ID"]) if t["running"]] if reachable else []
            return not running and not services_short(api, services)

        if wait_for(drained, self.drain_timeout, "", raise_on_timeout=False):
            log.info("%s drained in %.1fs (%d service(s) rescheduled)", host.name, time.monotonic() - started,
                     len(services))
        else:
            ctx.reporter.note(f"warning: {host.name} did not drain within {self.drain_timeout:.0f}s (tasks still "
                              f"running there or not yet running elsewhere); removing it anyway")

    def remove(self, ctx: RunContext, api: Host, host: Host) -> None:
        n = nodes_by_name(api).get(host.name)
        try:
            host.run("docker swarm leave --force", timeout=120)
        except Exception as exc:  # noqa: BLE001 - the machine may be gone already; the entry is removed below
            log.info("%s: leave failed (%s); removing its entry from the manager", host.name, exc)
        if n is not None:
            api.run(cmd("docker", "node", "rm", "--force", n["ID"]), timeout=120, check=True, what="docker node rm")

    def reset_phases(self, ctx: RunContext, purge: bool) -> list[Phase]:
        return [LeaveSwarm()]


# --- backup and restore -------------------------------------------------------------------------
# Docker's documented procedure (docs.docker.com/engine/swarm/admin_guide/#back-up-the-swarm): stop dockerd
# on a manager, copy /var/lib/docker/swarm, start it again; to restore, put that directory on a new node,
# start dockerd, unlock when autolock is on, then `docker swarm init --force-new-cluster`.

DOCKER_ROOT = "/var/lib/docker"
SWARM_DIR = f"{DOCKER_ROOT}/swarm"
RAFT_MEMBER = "swarm.tar.gz"  # the raft directory, as `tar czf - -C /var/lib/docker swarm` writes it
UNLOCK_KEY = "unlock-key"
_BACKUP_FILE = f"{DOCKER_ROOT}/dcx-swarm-backup.tar.gz"  # root-only directory: it holds the raft keys
_RESTORE_FILE = f"{DOCKER_ROOT}/dcx-swarm-restore.tar.gz"


def autolock_on(info: dict[str, Any]) -> bool:
    """`docker info` .Swarm.Cluster.Spec.EncryptionConfig.AutoLockManagers (Engine API ClusterInfo)."""
    spec = (info.get("Cluster") or {}).get("Spec") or {}
    return bool((spec.get("EncryptionConfig") or {}).get("AutoLockManagers"))


def backup_source(ctx: RunContext, api: Host) -> tuple[Host, int]:
    """The manager whose raft directory is copied, and how many managers there are. With 3 or more a
    reachable non-leader: stopping its dockerd leaves a quorum serving. With fewer, the leader (stopping
    any manager of 2 loses the quorum anyway)."""
    hosts = {h.name: h for h in ctx.control_hosts}
    managers = [(name, n) for name, n in nodes_by_name(api).items() if n.get("Spec", {}).get("Role") == "manager"
                and (n.get("ManagerStatus") or {}).get("Reachability") == "reachable" and name in hosts]
    if len(managers) >= 3:
        followers = sorted(name for name, n in managers if not n["ManagerStatus"].get("Leader"))
        if followers:
            return hosts[followers[0]], len(managers)
    leaders = [name for name, n in managers if n["ManagerStatus"].get("Leader")]
    return (hosts[leaders[0]] if leaders else api), len(managers)


def unlock(host: Host, key: str) -> None:
    """Unlock a manager whose swarm is locked (autolock, after its daemon started): the key goes in the Engine
    API request body (POST /swarm/unlock) on the SSH session's stdin, never on a command line."""
    docker_api.call(host.conn, "POST", "/swarm/unlock", {"UnlockKey": key}, what="docker swarm unlock", timeout=60)


def restart_docker(host: Host, key: str | None) -> None:
    from dcx.bootstrap.runtime import docker_start_commands, wait_for_docker

    host.run("set -e; " + "; ".join(docker_start_commands(host.facts)), timeout=120, check=True,
             what="starting docker")
    wait_for_docker(host)
    if key:
        unlock_when_locked(host, key)


def unlock_when_locked(host: Host, key: str, timeout: float = 60.0) -> None:
    """A manager of an autolocked swarm reports "locked" once its daemon has read the swarm directory (it may
    report another state first): unlock it then. Returns when it is active, or after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = swarm_info(host).get("LocalNodeState")
        log.info("%s: swarm state after dockerd started: %s", host.name, state or "inactive")
        if state == "locked":
            unlock(host, key)
            return
        if state == "active":
            return
        time.sleep(1.0)


def stop_docker(host: Host) -> None:
    from dcx.bootstrap.runtime import docker_stop_commands

    host.run("set -e; " + "; ".join(docker_stop_commands(host.facts)), timeout=120, check=True,
             what="stopping docker")


def backup_swarm(ctx: RunContext, api: Host) -> EngineBackup:
    """Copy a manager's raft directory while its dockerd is stopped (a consistent copy), then start dockerd
    again and wait until that manager is reachable in the swarm again."""
    source, managers = backup_source(ctx, api)
    info = swarm_info(source)
    key = None
    if autolock_on(info) and managers > 1:
        # A restored manager comes up locked; unlocking waits for its old raft's quorum, which is gone, and
        # a locked node cannot be re-initialised (`init --force-new-cluster` answers "not a swarm manager").
        raise OperationFailed(f"the swarm has autolock on and {managers} managers: a backup of it could not be "
                              "restored (a restored manager unlocks only with its old managers' quorum)",
                              hint="turn autolock off for the backup (`docker swarm update --autolock=false` on a "
                                   "manager), back up, then turn it on again (a new unlock key)")
    if autolock_on(info):
        key = source.run("docker swarm unlock-key -q", timeout=60, check=True,
                         what="reading the unlock key").stdout.strip()
        register_secret(key)
    if managers < 3:
        ctx.reporter.note(f"the swarm has {managers} manager(s): its control plane pauses while dockerd on "
                          f"{source.name} is stopped for the copy (the containers there stop and start again)")
    else:
        ctx.reporter.note(f"copying the raft directory of {source.name}, a non-leader manager: the other "
                          f"{managers - 1} keep the quorum")
    started = time.monotonic()
    stop_docker(source)
    try:
        source.run(f"umask 077; rm -f {_BACKUP_FILE}; tar czf {_BACKUP_FILE} -C {DOCKER_ROOT} swarm", timeout=600,
                   check=True, what="copying the swarm's raft directory")
    finally:
        restart_docker(source, key)
    paused = time.monotonic() - started
    try:
        data = source.conn.download(_BACKUP_FILE)
    finally:
        source.run(f"rm -f {_BACKUP_FILE}", timeout=60)
    node_id = info.get("NodeID")

    def rejoined() -> bool:
        if not is_manager(settled_swarm_info(source, timeout=0)):
            return False
        n = next((n for n in swarm_nodes(source) if n.get("ID") == node_id), {})
        return (n.get("ManagerStatus") or {}).get("Reachability") == "reachable"

    wait_for(rejoined, 120.0, f"{source.name} to be a reachable manager again")
    log.info("swarm raft directory copied from %s (%d bytes; dockerd stopped %.1fs)", source.name, len(data), paused)
    files = {RAFT_MEMBER: data}
    return EngineBackup(files, source=source.name, secrets={UNLOCK_KEY: key} if key else {}, control_members=managers)


def retarget(raft: bytes, advertise: str, data_path: str | None) -> bytes:
    """The raft directory's tarball with its node start config (swarm/docker-state.json: LocalAddr, ListenAddr,
    AdvertiseAddr, DataPathAddr, as dockerd's daemon/cluster saves them) pointing at the new machine's address:
    a restored manager starts by listening where the old one did, which this machine cannot bind."""
    src, out = io.BytesIO(raft), io.BytesIO()
    with tarfile.open(fileobj=src, mode="r:gz") as tin, tarfile.open(fileobj=out, mode="w:gz") as tout:
        for info in tin:
            data = tin.extractfile(info).read() if info.isfile() else None  # type: ignore[union-attr]
            if info.name == "swarm/docker-state.json" and data is not None:
                state = json.loads(data)
                port = f":{SWARM_PORT}"
                state["LocalAddr"] = advertise
                state["ListenAddr"] = f"{advertise}{port}"
                state["AdvertiseAddr"] = advertise + (port if str(state.get("AdvertiseAddr", "")).endswith(port)
                                                      else "")
                state["DataPathAddr"] = data_path or ""
                data = json.dumps(state).encode()
                info.size = len(data)
            tout.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


class RestoreSwarm(Phase):
    """The first control node starts from the backup's raft directory: dockerd stopped, the directory put in
    place, dockerd started (and unlocked), then `docker swarm init --force-new-cluster` makes it the one
    manager of the restored swarm (same swarm id, services, secrets, configs, networks)."""

    title = "Restore the swarm from the backup on the first control node"

    def __init__(self, backup: EngineBackup) -> None:
        self.backup = backup

    def hosts(self, ctx: RunContext) -> list[Host]:
        manager = find_manager(ctx)
        if manager is not None:  # a resumed restore: the swarm is back already
            ctx.shared["swarm_manager"] = manager.name
            return []
        return ctx.control_hosts[:1]

    def run(self, ctx: RunContext, host: Host) -> None:
        key = self.backup.secrets.get(UNLOCK_KEY)
        if key:
            register_secret(key)
        addr = engine_address(ctx, host)
        raft = retarget(self.backup.files[RAFT_MEMBER], addr, host.data.get("mesh_address"))
        host.conn.upload(raft, _RESTORE_FILE, mode=0o600)
        stop_docker(host)
        try:
            host.run(f"set -e; rm -rf {SWARM_DIR}; tar xzf {_RESTORE_FILE} -C {DOCKER_ROOT}; rm -f {_RESTORE_FILE}",
                     timeout=600, check=True, what="restoring the swarm's raft directory")
        finally:
            restart_docker(host, key)
        if key:
            suspend_autolock(ctx, host)
        host.run(init_command(addr, host.data.get("mesh_address"), force_new_cluster=True), timeout=180, check=True,
                 what="docker swarm init --force-new-cluster")
        if key:
            # On again; swarm makes a new key (its output, the key, goes nowhere: the note says where to read it).
            host.run("docker swarm update --autolock=true >/dev/null", timeout=60, check=True,
                     what="turning autolock on again")
            ctx.reporter.note("autolock is on again with a new unlock key: keep it (`docker swarm unlock-key -q` on a "
                              "manager shows it)")
        host.data["swarm"] = swarm_info(host)
        ctx.shared["swarm_manager"] = host.name


def suspend_autolock(ctx: RunContext, host: Host) -> None:
    """`docker swarm init --force-new-cluster` restarts the manager without the unlock key (the Engine API's
    InitRequest has no field for it), so an autolocked swarm would stay locked: autolock goes off first, on the
    unlocked manager. That takes a raft leader: the restored manager alone is one only when the backup's swarm
    had one manager."""
    try:
        wait_for(lambda: is_manager(swarm_info(host)), 60.0, f"{host.name} to lead the restored swarm")
        host.run("docker swarm update --autolock=false", timeout=60, check=True, what="turning autolock off")
    except OperationFailed as exc:
        raise OperationFailed(f"{host.name}: the backup's swarm has autolock on and cannot be led by one restored "
                              f"manager ({exc.message})",
                              hint="take the backup with autolock off (`docker swarm update --autolock=false`), "
                                   "or from a swarm with one manager") from None


class PruneOldNodes(Phase):
    """After a restore, the old cluster's machines are still entries of the swarm: those that are not this
    cluster's nodes and not ready are removed (managers demoted first)."""

    title = "Remove the old cluster's node entries"

    def hosts(self, ctx: RunContext) -> list[Host]:
        return [manager_host(ctx)]

    def run(self, ctx: RunContext, host: Host) -> None:
        current = {h.data.get("swarm", {}).get("NodeID") for h in ctx.hosts}
        removed = []
        for n in swarm_nodes(host):
            if n["ID"] in current or n.get("Status", {}).get("State") == "ready":
                continue
            if n.get("Spec", {}).get("Role") == "manager":
                host.run(cmd("docker", "node", "demote", n["ID"]), timeout=120)
            host.run(cmd("docker", "node", "rm", "--force", n["ID"]), timeout=120, check=True, what="docker node rm")
            removed.append((n.get("Spec", {}).get("Labels") or {}).get(LABEL_NODE) or n["ID"])
        if removed:
            ctx.reporter.note(f"removed {len(removed)} node entr{'y' if len(removed) == 1 else 'ies'} of the old "
                              f"cluster: {', '.join(sorted(removed))}")


def run_swarm(ctx: RunContext) -> None:
    run_phases(ctx, SwarmEngine().phases(ctx))
