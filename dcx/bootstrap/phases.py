"""The phase runner (after k0sctl's phase manager).

A phase has a title, picks its hosts, decides per host whether it must run (by looking at the host,
never at recorded state), and runs on the hosts that need it, in parallel on a bounded pool. When a
phase fails on some hosts the run stops before the next phase and reports each failed host with its
error and the last lines of output; the hosts that succeeded keep what they did, and a re-run
picks up from there.
"""

from __future__ import annotations

import os
import signal
import threading
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
    for phase in phases:
        run_phase(ctx, phase)


def run_phase(ctx: RunContext, phase: Phase) -> None:
    kill_point(f"phase:{phase.title}")
    hosts = phase.hosts(ctx)
    if not hosts:
        return
    ctx.reporter.phase_started(phase.title, [h.name for h in hosts])
    log.info("==> %s (%d hosts)", phase.title, len(hosts))
    phase.prepare(ctx)

    def one(host: Host) -> str:
        if not phase.needs_run(ctx, host):
            ctx.reporter.host_done(phase.title, host.name, "skipped")
            return "skipped"
        phase.run(ctx, host)
        outcome = "ok" if phase.read_only else "changed"
        ctx.reporter.host_done(phase.title, host.name, outcome)
        return outcome

    results = fan_out(one, hosts, 1 if phase.serial else ctx.parallel)
    failures: list[HostFailure] = []
    for host, _, error in results:
        if error is not None:
            message, output = describe_error(error)
            log.error("%s: %s: %s\n%s", phase.title, host.name, message, output)
            if not isinstance(error, OperationFailed):
                log.debug("traceback", exc_info=error)
            ctx.reporter.host_done(phase.title, host.name, "failed", redact(message))
            failures.append(HostFailure(host.name, redact(message), redact(output), getattr(error, "hint", None)))
    changed = sum(1 for _, r, _ in results if r == "changed")
    skipped = sum(1 for _, r, _ in results if r in ("skipped", "ok"))
    ctx.reporter.phase_done(phase.title, changed, skipped, len(failures))
    if failures:
        raise PhaseFailed(phase.title, failures, len(hosts))
