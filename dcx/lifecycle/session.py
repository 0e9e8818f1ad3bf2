"""A command's hold on one cluster (Session: directory, lock, state, log, providers), and how nodes are
reached (build_context). Every lifecycle operation (apply, plan, destroy, status, run) starts here."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dcx import access
from dcx.bootstrap.engines import ClusterEngine
from dcx.bootstrap.phases import Host, Phase, PhaseFailed, Reporter, RunContext, run_phases
from dcx.bootstrap.runtime import GatherFacts, InstallRuntime, SetHostname, StartRuntime
from dcx.bootstrap.ssh import HostKeyStore, Sessions, Target, connect_with_retry
from dcx.errors import DcxError, InputError, OperationFailed
from dcx.log import log, start_run_log, stop_run_log
from dcx.providers.base import Node, NodeRequest, Provider, ProviderContext
from dcx.providers.registry import provider_class
from dcx.spec import ClusterSpec
from dcx.state import ClusterDir, ClusterState, StateStore, new_cluster_id, now_iso


@dataclass
class Options:
    parallel: int = 10
    ssh_timeout: float = 300.0
    provision_only: bool = False
    purge: bool = False
    reporter: Reporter | None = None
    become_password: str | None = field(default=None, repr=False)
    key_passphrase: str | None = field(default=None, repr=False)
    max_unavailable: int = 1  # nodes that leave at once when nodes are replaced (replace.batches)
    restore: str | None = None  # `create --restore FILE`: a `dcx cluster backup` archive (dcx.lifecycle.restore)
    skip_unreachable: bool = False  # destroy and scale-down: a given machine (ssh pool) that does not answer
    #                                 is left as it is instead of being reset


class Session:
    """One command's hold on one cluster: its directory, lock, state, log and providers."""

    def __init__(self, store: StateStore, name: str, command: str, reporter: Reporter) -> None:
        self.cdir: ClusterDir = store.cluster(name)
        self.name = name
        self.command = command
        self.reporter = reporter
        self.state: ClusterState | None = None
        self._providers: dict[str, Provider] = {}
        self.key_path: Path | None = None
        self.public_key = ""
        self._saved: str | None = None  # the state as this session last wrote it (without updated_at)

    # state ---------------------------------------------------------------------------------------

    def load_or_new(self, spec: ClusterSpec | None) -> ClusterState:
        if self.cdir.exists():
            self.state = self.cdir.load()
        else:
            engine = spec.spec.engine.type if spec else "swarm"
            self.state = ClusterState(name=self.name, id=new_cluster_id(), engine=engine)
        if spec is not None:
            self.state.spec_file = str(Path(spec.file).resolve()) if spec.file else ""
            self.state.engine = spec.spec.engine.type
            self.state.spec = spec.model_dump(mode="json")
        return self.state

    def save(self) -> None:
        assert self.state is not None
        # Nothing changed since this session last wrote it: no write (a re-run records every node and
        # resource again, and each write is two fsyncs, or an upload in a bucket store).
        content = json.dumps({k: v for k, v in self.state.__dict__.items() if k != "updated_at"}, sort_keys=True)
        if content == self._saved:
            return
        self.cdir.save(self.state)
        self._saved = content

    def journal(self, key: str, value: Any) -> None:
        assert self.state is not None
        if value is None:
            self.state.resources.pop(key, None)
        else:
            self.state.resources[key] = value
        self.save()

    def record_node(self, node: Node) -> None:
        assert self.state is not None
        self.state.nodes[node.name] = node.to_dict()
        self.save()

    def forget_node(self, name: str) -> None:
        assert self.state is not None
        self.state.nodes.pop(name, None)
        self.state.resources.pop(f"mesh/address/{name}", None)
        for prefix in ("placement/", "replace/", "move/"):  # dcx.plan, dcx.lifecycle.replace
            self.state.resources.pop(prefix + name, None)
        from dcx.bootstrap.relay import key, routes_from_resources

        for p, relay in routes_from_resources(self.state.resources).items():  # routes to or through it
            if name in (*p, relay):
                self.state.resources.pop(key(p), None)
        if self.state.host_keys.pop(name, None) is not None:
            access.write_known_hosts(self.cdir, self.state.host_keys)
        self.save()

    # providers -----------------------------------------------------------------------------------

    def provider(self, name: str, spec: ClusterSpec | None) -> Provider:
        if name not in self._providers:
            assert self.state is not None
            cls = provider_class(name)
            ctx = ProviderContext(
                cluster_name=self.name, cluster_id=self.state.id, ssh_public_key=self.public_key,
                ssh_private_key_path=self.key_path or self.cdir.private_key, workdir=self.cdir.provider_dir(name),
                journal=self.journal, resources=self.state.resources, log=log,
                network=spec.spec.network if spec else None, spec=spec,
                ssh_user=spec.spec.ssh.user if spec else "root")
            provider = cls(ctx)
            provider.check_prerequisites()
            self._providers[name] = provider
        return self._providers[name]

    def loaded_provider(self, name: str) -> Provider | None:
        """The provider if this run has used it already (status and node commands load none)."""
        return self._providers.get(name)

    def named_requests(self, spec: ClusterSpec) -> dict[str, list[NodeRequest]]:
        """Pools whose provider names the nodes itself (inventories)."""
        out = {}
        for pool in spec.spec.pools:
            requests = self.provider(pool.provider, spec).node_requests(pool)
            if requests is not None:
                out[pool.name] = requests
        return out

    def existing_nodes(self, spec: ClusterSpec, forget: bool = True) -> list[Node]:
        """What exists now, asked of the providers (not taken from state)."""
        assert self.state is not None
        out: list[Node] = []
        for name, pools in pools_by_provider(spec).items():
            out.extend(self.provider(name, spec).list_nodes(pools))
        reported = {n.name for n in out}
        # Nodes of pools no longer in the spec are not asked about: they exist until removed (the plan
        # removes them), not forgotten with their machines still running.
        pools = {p.name: p.provider for p in spec.spec.pools}
        for name, data in self.state.nodes.items():
            # A pool that moved to another provider: its old nodes are not asked about either (the
            # provider they are on may be in the spec no more) until they are replaced.
            moved = data.get("pool") in pools and data.get("provider") != pools[data.get("pool")]
            if name not in reported and (data.get("pool") not in pools or moved):
                out.append(Node.from_dict(data))
                reported.add(name)
        # Nodes recorded but no longer reported are gone: forget them (and their host keys).
        for gone in [n for n in self.state.nodes if n not in reported and forget]:
            log.info("%s is recorded but no longer exists; forgetting it", gone)
            self.forget_node(gone)
        return out


def pools_by_provider(spec: ClusterSpec) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for pool in spec.spec.pools:
        out.setdefault(pool.provider, []).append(pool)
    return out


@contextlib.contextmanager
def open_session(store: StateStore, name: str, command: str, reporter: Reporter) -> Iterator[Session]:
    session = Session(store, name, command, reporter)
    with session.cdir.lock(command):
        handler = start_run_log(session.cdir.logs_dir / f"{now_iso().replace(':', '')}-{command.split()[0]}.log")
        log.info("dcx %s on cluster %s", command, name)
        try:
            yield session
        except DcxError as exc:
            log.error("failed: %s", exc.message)
            raise
        except BaseException:
            log.exception("internal error")
            raise
        finally:
            stop_run_log(handler)


# --- bootstrap ------------------------------------------------------------------------------------


def target_for(node: Node, session: Session, options: Options) -> Target:
    """How to reach a node. Machines dcx made take the cluster key; machines it was given (ssh pools)
    take their inventory's or ~/.ssh/config's keys, the agent and OpenSSH's default identities."""
    # A password the inventory gives for this host wins over -K's, as a host variable does in Ansible.
    provider = session.loaded_provider(node.provider)
    password = (provider.become_password(node) if provider else None) or options.become_password
    become = password if node.ssh_user != "root" else None
    if node.extra.get("endpoint"):
        from dcx.sshconfig import Endpoint

        return target_for_endpoint(node.name, Endpoint.from_dict(node.extra["endpoint"]), password)
    return Target(name=node.name, host=node.ssh_address, port=node.ssh_port, user=node.ssh_user,
                  key_files=[node.ssh_key or str(session.cdir.private_key)], become_password=become)


def target_for_endpoint(name: str, ep: Any, become_password: str | None) -> Target:
    """A machine dcx was given (inventory, ~/.ssh/config): its keys, the agent, OpenSSH's defaults, jumps."""
    jump = None
    for hop in ep.jumps:  # outermost first: each hop is reached through the one before
        # A hop also offers the destination's keys: bastions usually take the same operator key.
        jump = Target(name=f"jump-{hop.host}-{hop.port}", host=hop.host, port=hop.port, user=hop.user,
                      key_files=hop.key_files + [k for k in ep.key_files if k not in hop.key_files], jump=jump,
                      default_keys=True, booting=False)
    return Target(name=name, host=ep.host, port=ep.port, user=ep.user, key_files=ep.key_files, jump=jump,
                  default_keys=True, become_password=become_password if ep.user != "root" else None, booting=False)


class Connect(Phase):
    title = "Connect over SSH"
    read_only = True

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def run(self, ctx: RunContext, host: Host) -> None:
        connect_with_retry(host.conn, self.timeout)


def connect_for_reset(session: Session, ctx: RunContext, options: Options) -> None:
    """Before given machines (ssh pools) are reset: connect to them. One that does not answer fails the
    run, or with --skip-unreachable is named, left as it is and dropped from `ctx` (a machine gone for
    good holds nothing dcx could remove)."""
    try:
        run_phases(ctx, [Connect(min(options.ssh_timeout, 60))])
    except PhaseFailed as exc:
        if not options.skip_unreachable:
            raise OperationFailed(exc.message, hint="re-run when the machines answer, or add --skip-unreachable "
                                  "to leave those that do not as they are (reset them by hand)") from None
        gone = {f.host for f in exc.failures}
        session.reporter.note(f"not reset (unreachable, left as it is): {', '.join(sorted(gone))}")
        ctx.hosts = [h for h in ctx.hosts if h.name not in gone]


def build_context(session: Session, spec: ClusterSpec, nodes: list[Node], options: Options) -> RunContext:
    assert session.state is not None
    keys = HostKeyStore(session.state.host_keys, on_change=lambda: _host_keys_changed(session))
    sessions = Sessions(keys, options.key_passphrase)
    hosts = []
    for node in sorted(nodes, key=lambda n: (n.role != "control", n.pool, n.name)):
        target = target_for(node, session, options)
        hosts.append(Host(node=node, target=target, conn=sessions.get(target)))
    return RunContext(cluster_name=spec.name, spec=spec, hosts=hosts, sessions=sessions,
                      reporter=session.reporter, parallel=options.parallel, secrets_dir=session.cdir)


def _host_keys_changed(session: Session) -> None:
    assert session.state is not None
    session.save()
    access.write_known_hosts(session.cdir, session.state.host_keys)


def base_phases(options: Options, engine: ClusterEngine) -> list[Phase]:
    from dcx.bootstrap.preflight import Preflight
    from dcx.bootstrap.proxy import ConfigureProxy

    phases: list[Phase] = [Connect(options.ssh_timeout), SetHostname(), GatherFacts(), Preflight(),
                           ConfigureProxy()]  # before anything is downloaded
    # k3s brings its own containerd: Docker is installed only for the engines that run on it.
    return phases + ([InstallRuntime(), StartRuntime()] if engine.uses_docker else [])


def null_reporter() -> Reporter:
    from dcx.bootstrap.phases import NullReporter

    return NullReporter()


logging.getLogger("dcx").addHandler(logging.NullHandler())


def spec_stub(state: ClusterState) -> Any:
    if state.spec:
        try:
            spec = ClusterSpec.model_validate(state.spec)
        except ValidationError as exc:  # edited by hand, or written by another dcx
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "spec"
            raise InputError(f"the spec recorded in cluster {state.name}'s state does not validate ({where}: "
                             f"{first['msg']})", hint="give the spec file with -f FILE") from None
        # Paths in the spec (inventories, keys) stay relative to the file it was applied from.
        spec._file = state.spec_file
        return spec
    raise OperationFailed(f"cluster {state.name} has no recorded spec")


def recorded_providers(state: ClusterState) -> list[str]:
    """Providers with nodes or journaled resources in the state (keys are `provider/...`)."""
    from dcx.providers.registry import available

    installed = set(available())
    names = {d.get("provider", "") for d in state.nodes.values()} | {k.split("/", 1)[0] for k in state.resources}
    return sorted(names & installed)
