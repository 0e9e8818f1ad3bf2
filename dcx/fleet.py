"""Fleet operations: one shell command on many nodes of a cluster at once (`dcx node run`).

Nodes are reached exactly as bootstrap reaches them (dcx.lifecycle.session.build_context: the cluster key or the
inventory's keys, jump hosts, recorded host keys, sudo rules), one connection per node, all at once
on a bounded pool. Each node's result is kept whole (exit code, stdout, stderr, duration); identical
results can be folded into one group, as `ansible -o` users read them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from dcx.bootstrap.phases import Host, RunContext
from dcx.bootstrap.ssh import connect_with_retry, fan_out
from dcx.errors import DcxError, InputError, OperationFailed
from dcx.log import log, redact
from dcx.providers.base import Node
from dcx.state import ClusterState, StateStore, now_iso


@dataclass
class Selection:
    """Which nodes: every filter given must match (pools and nodes: any of the names listed)."""

    pools: list[str] = field(default_factory=list)
    role: str | None = None
    nodes: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        parts = [f"--pool {p}" for p in self.pools] + ([f"--role {self.role}"] if self.role else [])
        parts += [f"--node {n}" for n in self.nodes] + [f"--label {k}={v}" for k, v in self.labels.items()]
        return " ".join(parts) or "(all nodes)"


def parse_labels(items: list[str]) -> dict[str, str]:
    """`k=v` pairs from --label; a pair without `=` or with an empty key is bad input."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--label {item}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def select_nodes(state: ClusterState, sel: Selection) -> list[Node]:
    """The recorded nodes that match `sel`, control nodes first. Unknown names, roles or an empty
    result are bad input (exit 2): a typo must not silently run on nothing."""
    nodes = [Node.from_dict(d) for d in state.nodes.values()]
    if not nodes:
        raise InputError(f"cluster {state.name} has no nodes recorded")
    if sel.role not in (None, "control", "worker"):
        raise InputError(f"--role {sel.role}: must be control or worker")
    known = {n.name for n in nodes}
    unknown = [n for n in sel.nodes if n not in known]
    if unknown:
        raise InputError(f"cluster {state.name} has no node {', '.join(unknown)} (nodes: {', '.join(sorted(known))})")
    pools = {n.pool for n in nodes}
    missing = [p for p in sel.pools if p not in pools]
    if missing:
        raise InputError(f"cluster {state.name} has no nodes in pool {', '.join(missing)} "
                         f"(pools: {', '.join(sorted(pools))})")
    chosen = [n for n in nodes
              if (not sel.pools or n.pool in sel.pools) and (not sel.role or n.role == sel.role)
              and (not sel.nodes or n.name in sel.nodes)
              and all(n.labels.get(k) == v for k, v in sel.labels.items())]
    if not chosen:
        raise InputError(f"no node of cluster {state.name} matches {sel.describe()}")
    return sorted(chosen, key=lambda n: (n.role != "control", n.pool, n.name))


@dataclass
class NodeResult:
    node: str
    pool: str
    role: str
    exit_code: int | None  # None: the command did not finish (unreachable, timed out)
    stdout: str = ""
    stderr: str = ""
    duration: float = 0.0
    error: str | None = None  # why there is no exit code

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def outcome(self) -> str:
        if self.error:
            return self.error
        return "ok" if self.ok else f"exit {self.exit_code}"

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "pool": self.pool, "role": self.role, "exit_code": self.exit_code,
                "stdout": self.stdout, "stderr": self.stderr, "duration_s": round(self.duration, 3),
                "error": self.error}


@dataclass
class Group:
    """Nodes whose results are identical (exit code, error, stdout and stderr)."""

    nodes: list[str]
    result: NodeResult

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        return {"nodes": self.nodes, "exit_code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr,
                "error": r.error}


def fold(results: list[NodeResult]) -> list[Group]:
    """Identical results folded into one group each, in the order their first node appears."""
    groups: dict[tuple[Any, ...], Group] = {}
    for r in results:
        key = (r.exit_code, r.error, r.stdout, r.stderr)
        if key in groups:
            groups[key].nodes.append(r.node)
        else:
            groups[key] = Group([r.node], r)
    return list(groups.values())


@contextlib.contextmanager
def connections(name: str, sel: Selection, *, parallel: int, become_password: str | None = None,
                key_passphrase: str | None = None, store: StateStore | None = None,
                log_as: str = "run", sudo: bool = True) -> Iterator[RunContext]:
    """The selected nodes of a recorded cluster as bootstrap hosts (not yet connected), and a run log
    in the cluster's logs directory. No cluster lock: reading nodes must work while a `create` hangs.
    `sudo`: commands will run through sudo, so inventories' sudo passwords are read."""
    from dcx.lifecycle.session import Options, Session, build_context, null_reporter, spec_stub
    from dcx.log import start_run_log, stop_run_log

    store = store or StateStore()
    session = Session(store, name, log_as, null_reporter())
    state = session.cdir.load()
    session.state = state
    chosen = select_nodes(state, sel)
    spec = spec_stub(state)
    handler = start_run_log(session.cdir.logs_dir / f"{now_iso().replace(':', '')}-{log_as.split()[0]}.log")
    log.info("dcx %s on cluster %s: %d node(s) (%s)", log_as, name, len(chosen), sel.describe())
    try:
        if sudo:  # without sudo no password is used: the inventory is not read
            _load_inventory_passwords(session, spec, chosen)
        options = Options(parallel=parallel, become_password=become_password, key_passphrase=key_passphrase)
        ctx = build_context(session, spec, chosen, options)
        try:
            yield ctx
        finally:
            ctx.sessions.close()
    finally:
        stop_run_log(handler)


def _load_inventory_passwords(session: Any, spec: Any, nodes: list[Node]) -> None:
    """ssh pools: the inventory's ansible_become_password per host, as `create` uses it (the provider
    reads the inventory when asked for its hosts). Other providers are never loaded here."""
    if not any(n.provider == "ssh" for n in nodes):
        return
    for pool in spec.spec.pools:
        if pool.provider == "ssh":
            try:
                session.provider("ssh", spec).node_requests(pool)
            except DcxError as exc:  # an inventory moved or broken since create: -K still works
                log.warning("pool %s: inventory not read (%s); sudo passwords come from -K only", pool.name,
                            exc.message)


def run_command(ctx: RunContext, command: str, *, sudo: bool, timeout: float, connect_timeout: float = 15.0,
                stdin: bytes | None = None, on_start: Callable[[str], None] | None = None,
                on_done: Callable[[NodeResult], None] | None = None) -> list[NodeResult]:
    """`command` (a shell command line, run by `sh -c` on each node; as root through sudo when `sudo`)
    on every host of ctx at once. A node that cannot be reached or runs past `timeout` gets an error
    and no exit code; the others are not held up by it."""

    def one(host: Host) -> NodeResult:
        node = host.node
        started = time.monotonic()
        if on_start:
            on_start(host.name)
        result = NodeResult(node.name, node.pool, node.role, None)
        try:
            connect_with_retry(host.conn, connect_timeout)
        except Exception as exc:  # noqa: BLE001 - reported per node
            result.error = "unreachable: " + redact(getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}")
        else:
            try:
                r = host.run(command, sudo=sudo, timeout=timeout, stdin=stdin)
                result.exit_code, result.stdout, result.stderr = r.exit_code, r.stdout, r.stderr
            except OperationFailed as exc:
                timed_out = exc.message.startswith("command timed out")
                result.error = f"timed out after {timeout:g} s" if timed_out else redact(exc.message)
            except Exception as exc:  # noqa: BLE001 - a connection lost mid-command, reported per node
                result.error = redact(f"{type(exc).__name__}: {exc}")
        result.duration = time.monotonic() - started
        log.info("%s: %s in %.2fs", node.name, result.outcome, result.duration)
        if on_done:
            on_done(result)
        return result

    return [r for _, r, _ in fan_out(one, ctx.hosts, ctx.parallel) if r is not None]

