"""The phase runner (after k0sctl's phase manager).

A phase has a title, picks its hosts, decides per host whether it must run (by looking at the host,
never at recorded state), and runs on the hosts that need it, in parallel on a bounded pool. When a
phase fails on some hosts the run stops before the next phase and reports each failed host with its
error and the last lines of output; the hosts that succeeded keep what they did, and a re-run
picks up from there.

Between two phases every host waits for the slowest (a barrier), unless the later phase is
`pipelined`: it only needs the same host to have finished the phase before (connect, then set the
hostname, then gather facts). A phase and the pipelined phases after it run as one chain per host,
so a fast host goes on while a slow one is still in an earlier phase. Phases that need the whole
cluster (preflight's duplicate checks, the mesh key exchange, the first manager before any join,
verification) stay barriers. Each host's time in each phase is written to the run log.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from dcx.bootstrap.ssh import CommandFailed, Connection, Sessions, Target, fan_out
from dcx.errors import HostKeyMismatch, OperationFailed
from dcx.log import log, redact
from dcx.providers.base import Node


@dataclass
class Host:
    """A node during bootstrap: its record, its connection and the facts gathered this run."""

    node: Node
    target: Target
    conn: Connection
    facts: Any = None  # runtime.Facts, gathered by the facts phase
    data: dict[str, Any] = field(default_factory=dict)  # per-run scratch (engine ids, mesh keys)

    @property
    def name(self) -> str:
        return self.node.name

    def run(self, command: str, **kw: Any):  # noqa: ANN201 - returns ssh.Result
        return self.conn.run(command, **kw)


class Reporter(Protocol):
    def phase_started(self, title: str, hosts: list[str]) -> None: ...
    def host_done(self, title: str, host: str, outcome: str, detail: str = "") -> None: ...
    def phase_done(self, title: str, changed: int, skipped: int, failed: int) -> None: ...
    def note(self, message: str) -> None: ...


class NullReporter:
    def phase_started(self, title: str, hosts: list[str]) -> None:
        pass

    def host_done(self, title: str, host: str, outcome: str, detail: str = "") -> None:
        pass

    def phase_done(self, title: str, changed: int, skipped: int, failed: int) -> None:
        pass

    def note(self, message: str) -> None:
        pass


@dataclass
class RunContext:
    """What every phase can see: the cluster, its hosts, settings, and a place for shared results."""

    cluster_name: str
    spec: Any  # dcx.spec.ClusterSpec
    hosts: list[Host]
    sessions: Sessions
    reporter: Reporter = field(default_factory=NullReporter)
    parallel: int = 10
    shared: dict[str, Any] = field(default_factory=dict)  # results passed between phases (not secrets)
    secrets_dir: Any = None  # dcx.state.ClusterDir, for engine secrets kept at rest (0600)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    @property
    def control_hosts(self) -> list[Host]:
        return [h for h in self.hosts if h.node.role == "control"]

    @property
    def worker_hosts(self) -> list[Host]:
        return [h for h in self.hosts if h.node.role == "worker"]


class Phase:
    """Subclasses set `title` and implement `run`; they may narrow `hosts` and `needs_run`."""

    title: str = ""
    serial: bool = False  # run hosts one after another (e.g. control-plane joins, one member at a time)
    read_only: bool = False  # only looks (connect, facts, verify): reported as "ok", never as "changed"
    # A host may start this phase as soon as it has itself finished the phase before, without waiting
    # for the other hosts. Only for phases whose `hosts`, `prepare`, `needs_run` and `run` look at no
    # other host's results of the phases before (they run when the first host gets here).
    pipelined: bool = False
    # Every host must have passed this phase before any host goes on, even into a pipelined phase
    # (preflight: nothing changes anywhere until every host has passed it).
    barrier_after: bool = False

    def hosts(self, ctx: RunContext) -> list[Host]:
        return ctx.hosts

    def needs_run(self, ctx: RunContext, host: Host) -> bool:
        return True

    def run(self, ctx: RunContext, host: Host) -> None:
        raise NotImplementedError

    def prepare(self, ctx: RunContext) -> None:  # noqa: B027 - optional hook, runs once before hosts
        pass


@dataclass
class HostFailure:
    host: str
    error: str
    output: str = ""
    hint: str | None = None


class PhaseFailed(OperationFailed):
    def __init__(self, title: str, failures: list[HostFailure], total: int) -> None:
        self.title = title
        self.failures = failures
        lines = [f"phase '{title}' failed on {len(failures)}/{total} hosts:"]
        for f in failures:
            lines.append(f"  {f.host}: {f.error}")
            for out in f.output.splitlines()[-5:]:
                lines.append(f"      | {out}")
        hints = list(dict.fromkeys(f.hint for f in failures if f.hint))
        super().__init__(redact("\n".join(lines)), hint="\n".join(hints) or None)


def describe_error(exc: BaseException) -> tuple[str, str]:
    """(one-line error, last output lines) for a host failure."""
    if isinstance(exc, CommandFailed):
        return exc.message.split(": ", 1)[0], exc.result.tail()
    if isinstance(exc, HostKeyMismatch | OperationFailed):
        return exc.message, ""
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}", ""


KILL_AT = "DCX_TEST_KILL_AT"


def kill_point(name: str) -> None:
    """Tests only: with DCX_TEST_KILL_AT=NAME set, dcx kills itself with SIGKILL here, as `kill -9` would,
    to prove a re-run converges from that instant. Points: `phase:TITLE` as a phase starts, and
    `mesh:before-apply`, `mesh:after-apply` (dcx.bootstrap.mesh). Unset (always, outside tests), this
    does nothing."""
    if os.environ.get(KILL_AT) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def run_phases(ctx: RunContext, phases: list[Phase]) -> None:
    """Run the phases in order: every host waits for the others before each phase, except before a
    pipelined one (a phase and the pipelined phases after it run as one chain per host)."""
    for group in pipeline_groups(phases):
        if len(group) == 1:
            run_phase(ctx, group[0])
        else:
            _Chain(ctx, group).run()


def pipeline_groups(phases: list[Phase]) -> list[list[Phase]]:
    """Each phase together with the pipelined phases right after it (none after a barrier_after phase)."""
    groups: list[list[Phase]] = []
    for phase in phases:
        if phase.pipelined and groups and not groups[-1][-1].barrier_after:
            groups[-1].append(phase)
        else:
            groups.append([phase])
    return groups


def _take_turn(ctx: RunContext, phase: Phase, host: Host) -> str:
    """One host's turn in a phase; returns its outcome. Its time goes to the run log."""
    started = time.monotonic()
    if not phase.needs_run(ctx, host):
        outcome = "skipped"
    else:
        phase.run(ctx, host)
        outcome = "ok" if phase.read_only else "changed"
        if outcome == "changed":  # what was read from the host before may be stale now (facts_changes)
            host.data["changes"] = host.data.get("changes", 0) + 1
    log.info("%s: %s: %s in %.2fs", phase.title, host.name, outcome, time.monotonic() - started)
    return outcome


def _host_failure(phase: Phase, host: Host, error: BaseException) -> HostFailure:
    message, output = describe_error(error)
    log.error("%s: %s: %s\n%s", phase.title, host.name, message, output)
    if not isinstance(error, OperationFailed):
        log.debug("traceback", exc_info=error)
    return HostFailure(host.name, redact(message), redact(output), getattr(error, "hint", None))


def _counts(outcomes: list[str | None]) -> tuple[int, int]:
    """(changed, unchanged): a read-only phase's "ok" counts as unchanged."""
    return (sum(1 for r in outcomes if r == "changed"), sum(1 for r in outcomes if r in ("skipped", "ok")))


def _phase_done(ctx: RunContext, title: str, changed: int, skipped: int, failed: int, started: float) -> None:
    log.info("<== %s: %d changed, %d unchanged, %d failed in %.2fs", title, changed, skipped, failed,
             time.monotonic() - started)
    ctx.reporter.phase_done(title, changed, skipped, failed)


def run_phase(ctx: RunContext, phase: Phase) -> None:
    kill_point(f"phase:{phase.title}")
    hosts = phase.hosts(ctx)
    if not hosts:
        return
    ctx.reporter.phase_started(phase.title, [h.name for h in hosts])
    log.info("==> %s (%d hosts)", phase.title, len(hosts))
    started = time.monotonic()
    phase.prepare(ctx)

    def one(host: Host) -> str:
        outcome = _take_turn(ctx, phase, host)
        ctx.reporter.host_done(phase.title, host.name, outcome)
        return outcome

    results = fan_out(one, hosts, 1 if phase.serial else ctx.parallel)
    failures: list[HostFailure] = []
    for host, _, error in results:
        if error is not None:
            failure = _host_failure(phase, host, error)
            ctx.reporter.host_done(phase.title, host.name, "failed", failure.error)
            failures.append(failure)
    changed, skipped = _counts([r for _, r, _ in results])
    _phase_done(ctx, phase.title, changed, skipped, len(failures), started)
    if failures:
        raise PhaseFailed(phase.title, failures, len(hosts))


class _Stage:
    """One phase of a chain. It is set up (kill point, hosts, prepare) when the first host gets to it."""

    def __init__(self, phase: Phase, hosts: int) -> None:
        self.phase = phase
        self.setup_lock = threading.Lock()
        self.turn_lock = threading.Lock()  # a serial phase's hosts take turns
        self.ready = False
        self.names: set[str] = set()
        self.error: BaseException | None = None  # from hosts() or prepare(): every host of the phase fails with it
        self.started = 0.0
        self.outcomes: dict[str, str] = {}
        self.failures: dict[str, HostFailure] = {}
        self.waiting = hosts  # hosts that have not got past this phase yet
        self.held: list[Any] = []  # reporter calls held until the phases before are reported done


class _Chain:
    """A phase and the pipelined phases after it, run as one chain per host on one bounded pool.

    The reporter sees the same sequence as for phases run one after another: a phase's events are held
    until every earlier phase of the chain is reported done. A host that fails stops its chain; after
    every chain has ended, the first phase with failures raises PhaseFailed naming its hosts."""

    def __init__(self, ctx: RunContext, phases: list[Phase]) -> None:
        self.ctx = ctx
        self.stages = [_Stage(p, len(ctx.hosts)) for p in phases]
        self.lock = threading.Lock()  # the stages' counts and the reporter
        self.current = 0  # the phase whose events reach the reporter as they happen

    def run(self) -> None:
        for _, _, error in fan_out(self._chain, self.ctx.hosts, self.ctx.parallel):
            if error is not None:  # the runner's own bug, not a host's failure
                raise error
        order = {h.name: i for i, h in enumerate(self.ctx.hosts)}
        for stage in self.stages:
            if stage.failures:
                failures = [stage.failures[n] for n in sorted(stage.failures, key=order.__getitem__)]
                raise PhaseFailed(stage.phase.title, failures, len(stage.names))

    def _chain(self, host: Host) -> None:
        failed = False
        for i, stage in enumerate(self.stages):
            if not failed:
                self._set_up(i)
                if host.name in stage.names:
                    failed = not self._turn(i, host)
            with self.lock:
                stage.waiting -= 1
                self._advance()

    def _turn(self, i: int, host: Host) -> bool:
        stage = self.stages[i]
        title = stage.phase.title
        try:
            if stage.error is not None:
                raise stage.error
            if stage.phase.serial:
                with stage.turn_lock:
                    outcome = _take_turn(self.ctx, stage.phase, host)
            else:
                outcome = _take_turn(self.ctx, stage.phase, host)
        except BaseException as exc:  # noqa: BLE001 - reported per host, as run_phase does
            failure = _host_failure(stage.phase, host, exc)
            with self.lock:
                stage.failures[host.name] = failure
                self._report(i, lambda: self.ctx.reporter.host_done(title, host.name, "failed", failure.error))
            return False
        with self.lock:
            stage.outcomes[host.name] = outcome
            self._report(i, lambda: self.ctx.reporter.host_done(title, host.name, outcome))
        return True

    def _set_up(self, i: int) -> None:
        stage = self.stages[i]
        with stage.setup_lock:
            if stage.ready:
                return
            try:
                kill_point(f"phase:{stage.phase.title}")
                try:
                    hosts = [h.name for h in stage.phase.hosts(self.ctx)]
                except BaseException:
                    hosts = [h.name for h in self.ctx.hosts]
                    raise
                finally:
                    stage.names = set(hosts)
                    if hosts:
                        stage.started = time.monotonic()
                        log.info("==> %s (%d hosts)", stage.phase.title, len(hosts))
                        with self.lock:
                            self._report(i, lambda: self.ctx.reporter.phase_started(stage.phase.title, hosts))
                if hosts:
                    stage.phase.prepare(self.ctx)
            except BaseException as exc:  # noqa: BLE001 - every host of the phase fails with it
                stage.error = exc
            finally:
                stage.ready = True

    def _report(self, i: int, event: Any) -> None:
        """Under self.lock: the reporter hears of phase i now, or once the phases before it are done."""
        if i == self.current:
            event()
        else:
            self.stages[i].held.append(event)

    def _advance(self) -> None:
        """Under self.lock: report done every phase, in order, that no host is still to get past."""
        while self.current < len(self.stages) and self.stages[self.current].waiting == 0:
            stage = self.stages[self.current]
            if stage.names:
                changed, skipped = _counts(list(stage.outcomes.values()))
                _phase_done(self.ctx, stage.phase.title, changed, skipped, len(stage.failures), stage.started)
            self.current += 1
            if self.current < len(self.stages):
                held, self.stages[self.current].held = self.stages[self.current].held, []
                for event in held:
                    event()
