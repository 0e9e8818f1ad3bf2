"""The phase runner: per-host decisions, parallel runs, failures stop before the next phase."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import paramiko
import pytest

from dcx.bootstrap import ssh
from dcx.bootstrap.phases import Host, Phase, PhaseFailed, RunContext, run_phases
from dcx.bootstrap.ssh import CommandFailed, Connection, HostKeyStore, Result, Target
from dcx.providers.base import Node
from tests.fakes.ssh_server import LimitedSSHServer


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def phase_started(self, title: str, hosts: list[str]) -> None:
        self.events.append(("start", title, *hosts))

    def host_done(self, title: str, host: str, outcome: str, detail: str = "") -> None:
        self.events.append(("host", title, host, outcome))

    def phase_done(self, title: str, changed: int, skipped: int, failed: int) -> None:
        self.events.append(("done", title, str(changed), str(skipped), str(failed)))

    def note(self, message: str) -> None:
        self.events.append(("note", message))


def make_ctx(n: int, parallel: int = 10) -> tuple[RunContext, Recorder]:
    hosts = []
    for i in range(1, n + 1):
        node = Node(name=f"n{i}", pool="p", provider="local", role="control" if i == 1 else "worker",
                    ssh_address=f"10.0.0.{i}")
        hosts.append(Host(node=node, target=Target(name=node.name, host=node.ssh_address), conn=None))  # type: ignore[arg-type]
    rec = Recorder()
    return RunContext(cluster_name="c", spec=None, hosts=hosts, sessions=None, reporter=rec,  # type: ignore[arg-type]
                      parallel=parallel), rec


class Mark(Phase):
    title = "mark"

    def needs_run(self, ctx: RunContext, host: Host) -> bool:
        return not host.data.get("marked")

    def run(self, ctx: RunContext, host: Host) -> None:
        host.data["marked"] = True


def test_a_phase_runs_only_where_needed_and_a_rerun_changes_nothing() -> None:
    ctx, rec = make_ctx(3)
    ctx.hosts[1].data["marked"] = True
    run_phases(ctx, [Mark()])
    assert ("done", "mark", "2", "1", "0") in rec.events
    rec.events.clear()
    run_phases(ctx, [Mark()])
    assert ("done", "mark", "0", "3", "0") in rec.events


class FailOn(Phase):
    title = "fail some"

    def __init__(self, bad: set[str]) -> None:
        self.bad = bad

    def run(self, ctx: RunContext, host: Host) -> None:
        if host.name in self.bad:
            raise CommandFailed(host.name, "installing docker", Result(100, "", "E: line one\nE: Unable to locate"))


class Never(Phase):
    title = "never"

    def run(self, ctx: RunContext, host: Host) -> None:
        raise AssertionError("a phase after a failed one must not run")


def test_failures_are_reported_per_host_and_stop_the_run() -> None:
    ctx, rec = make_ctx(5)
    with pytest.raises(PhaseFailed) as info:
        run_phases(ctx, [FailOn({"n2", "n4"}), Never()])
    text = info.value.message
    assert text.splitlines()[0] == "phase 'fail some' failed on 2/5 hosts:"
    assert "  n2: installing docker failed on n2 (exit 100)" in text
    assert "      | E: Unable to locate" in text
    assert [f.host for f in info.value.failures] == ["n2", "n4"]
    assert not any(e[1] == "never" for e in rec.events if len(e) > 1)
    assert ("host", "fail some", "n1", "changed") in rec.events


class Slow(Phase):
    title = "slow"

    def __init__(self, serial: bool) -> None:
        self.serial = serial
        self.active = 0
        self.peak = 0
        self.lock = threading.Lock()

    def run(self, ctx: RunContext, host: Host) -> None:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(0.05)
        with self.lock:
            self.active -= 1


def test_hosts_run_in_parallel_within_the_bound() -> None:
    ctx, _ = make_ctx(8, parallel=3)
    phase = Slow(serial=False)
    run_phases(ctx, [phase])
    assert phase.peak == 3


def test_serial_phases_run_one_host_at_a_time() -> None:
    ctx, _ = make_ctx(4)
    phase = Slow(serial=True)
    run_phases(ctx, [phase])
    assert phase.peak == 1


def test_unexpected_exceptions_are_reported_not_raised_raw() -> None:
    class Crash(Phase):
        title = "crash"

        def run(self, ctx: RunContext, host: Host) -> None:
            raise KeyError("boom")

    ctx, _ = make_ctx(1)
    with pytest.raises(PhaseFailed, match="n1: KeyError: 'boom'"):
        run_phases(ctx, [Crash()])


class AskTheManager(Phase):
    """Each worker's run opens a session on the manager's one connection, as a join's token fetch does."""

    title = "ask the manager"

    def __init__(self, manager: Connection) -> None:
        self.manager = manager

    def run(self, ctx: RunContext, host: Host) -> None:
        self.manager.run(f"sleep 0.05; echo {host.name}", check=True, timeout=30)


def manager_on_fake_sshd(tmp_path: Path, max_sessions: int) -> tuple[LimitedSSHServer, Connection]:
    key = paramiko.RSAKey.generate(2048)
    key.write_private_key_file(str(tmp_path / "id"))
    server = LimitedSSHServer(key, max_sessions)
    target = Target(name="manager-1", host="127.0.0.1", port=server.port, key_files=[str(tmp_path / "id")],
                    agent=False, booting=False)
    return server, Connection(target, HostKeyStore({}, lambda: None))


def test_workers_sharing_a_hardened_managers_connection_all_succeed(tmp_path: Path) -> None:
    server, manager = manager_on_fake_sshd(tmp_path, max_sessions=2)
    try:
        ctx, rec = make_ctx(12, parallel=12)
        run_phases(ctx, [AskTheManager(manager)])
        assert ("done", "ask the manager", "12", "0", "0") in rec.events
        assert server.refusals >= 1 and server.most_at_once <= 2
    finally:
        manager.close()
        server.close()


def test_a_refusing_connection_is_named_not_the_host_whose_phase_used_it(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ssh, "REFUSAL_PATIENCE", 0.3)
    server, manager = manager_on_fake_sshd(tmp_path, max_sessions=0)
    try:
        ctx, _ = make_ctx(2)
        with pytest.raises(PhaseFailed) as info:
            run_phases(ctx, [AskTheManager(manager)])
        lines = info.value.message.splitlines()
        assert lines[0] == "phase 'ask the manager' failed on 2/2 hosts:"
        assert lines[1].startswith(f"  n1: manager-1 (root@127.0.0.1:{server.port}) refused every new SSH session")
        assert "MaxSessions" in (info.value.hint or "")
    finally:
        manager.close()
        server.close()


# --- pipelined phases: a chain per host, real threads ------------------------------------------------


class Step(Phase):
    """Records when each host starts and ends it; `gate` holds a host until an event is set (or fails)."""

    def __init__(self, title: str, log: list[tuple[str, ...]], lock: threading.Lock, pipelined: bool = True,
                 gate: dict[str, threading.Event] | None = None, fail: set[str] = frozenset(),  # type: ignore[assignment]
                 only: set[str] | None = None) -> None:
        self.title = title
        self.pipelined = pipelined
        self.log, self.lock = log, lock
        self.gate = gate or {}
        self.fail = fail
        self.only = only

    def hosts(self, ctx: RunContext) -> list[Host]:
        return [h for h in ctx.hosts if self.only is None or h.name in self.only]

    def run(self, ctx: RunContext, host: Host) -> None:
        with self.lock:
            self.log.append(("begin", self.title, host.name))
        if host.name in self.gate:
            assert self.gate[host.name].wait(5), f"{host.name} was never released in {self.title}"
        if host.name in self.fail:
            raise CommandFailed(host.name, f"step {self.title}", Result(1, "", "it broke"))
        with self.lock:
            self.log.append(("end", self.title, host.name))


class Released(Step):
    """Sets `release` when the given host begins this phase: proof that it got here."""

    def __init__(self, *args: object, release: threading.Event, who: str, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.release, self.who = release, who

    def run(self, ctx: RunContext, host: Host) -> None:
        if host.name == self.who:
            self.release.set()
        super().run(ctx, host)


def test_a_fast_host_goes_on_to_the_next_pipelined_phase_while_a_slow_one_is_still_in_the_one_before() -> None:
    ctx, rec = make_ctx(2)
    log: list[tuple[str, ...]] = []
    lock = threading.Lock()
    n1_in_b = threading.Event()
    # n2 stays in phase a until n1 has begun phase b: with a barrier this would never happen (timeout).
    a = Step("a", log, lock, pipelined=False, gate={"n2": n1_in_b})
    b = Released("b", log, lock, release=n1_in_b, who="n1")
    run_phases(ctx, [a, b])
    assert log.index(("begin", "b", "n1")) < log.index(("end", "a", "n2"))
    assert ("end", "b", "n2") in log
    # The reporter still hears of one phase at a time, in order.
    titles = [e[1] for e in rec.events if e[0] in ("start", "host", "done")]
    assert titles == ["a"] * 4 + ["b"] * 4
    assert rec.events[0] == ("start", "a", "n1", "n2") and rec.events[3] == ("done", "a", "2", "0", "0")
    assert rec.events[-1] == ("done", "b", "2", "0", "0")


def test_a_barrier_phase_waits_for_every_host_of_the_chain_before() -> None:
    ctx, _ = make_ctx(3)
    log: list[tuple[str, ...]] = []
    lock = threading.Lock()
    go = threading.Event()
    threading.Timer(0.3, go.set).start()  # n3 is slow in b
    run_phases(ctx, [Step("a", log, lock, pipelined=False), Step("b", log, lock, gate={"n3": go}),
                     Step("c", log, lock, pipelined=False)])
    first_c = min(i for i, e in enumerate(log) if e[1] == "c")
    assert all(log.index(("end", t, h)) < first_c for t in ("a", "b") for h in ("n1", "n2", "n3"))


def test_a_failure_stops_only_that_hosts_chain_and_is_reported_under_its_phase() -> None:
    ctx, rec = make_ctx(3)
    log: list[tuple[str, ...]] = []
    lock = threading.Lock()
    phases = [Step("a", log, lock, pipelined=False), Step("b", log, lock, fail={"n2"}), Step("c", log, lock),
              Step("after", log, lock, pipelined=False)]
    with pytest.raises(PhaseFailed) as info:
        run_phases(ctx, phases)
    assert info.value.title == "b"
    assert info.value.message.splitlines()[:2] == ["phase 'b' failed on 1/3 hosts:",
                                                   "  n2: step b failed on n2 (exit 1)"]
    assert [f.host for f in info.value.failures] == ["n2"]
    assert {e[2] for e in log if e[:2] == ("end", "c")} == {"n1", "n3"}  # the others went on
    assert not any(e[1] == "c" and e[2] == "n2" for e in log)  # the failed host stopped
    assert not any(e[1] == "after" for e in log)  # nothing past the chain's barrier
    assert ("host", "b", "n2", "failed") in rec.events
    assert ("done", "b", "2", "0", "1") in rec.events and ("done", "c", "2", "0", "0") in rec.events


def test_the_first_failed_phase_of_a_chain_is_the_one_raised() -> None:
    ctx, _ = make_ctx(3)
    log: list[tuple[str, ...]] = []
    lock = threading.Lock()
    late = threading.Event()
    threading.Timer(0.2, late.set).start()  # n1 fails in b after n3 has already failed in c
    phases = [Step("a", log, lock, pipelined=False), Step("b", log, lock, fail={"n1"}, gate={"n1": late}),
              Step("c", log, lock, fail={"n3"})]
    with pytest.raises(PhaseFailed) as info:
        run_phases(ctx, phases)
    assert info.value.title == "b" and [f.host for f in info.value.failures] == ["n1"]


def test_the_kill_point_of_every_phase_of_a_chain_fires_before_its_first_host_starts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from dcx.bootstrap import phases as phases_module

    ctx, _ = make_ctx(3)
    log: list[tuple[str, ...]] = []
    lock = threading.Lock()

    def record(name: str) -> None:
        with lock:
            log.append(("kill", name))

    monkeypatch.setattr(phases_module, "kill_point", record)
    # "none" has no hosts: its point still fires (a kill test stops there), in order.
    run_phases(ctx, [Step("a", log, lock, pipelined=False), Step("none", log, lock, only=set()),
                     Step("b", log, lock, only={"n2"}), Step("c", log, lock)])
    kills = [e[1] for e in log if e[0] == "kill"]
    assert kills == ["phase:a", "phase:none", "phase:b", "phase:c"]
    for title in ("a", "b", "c"):
        assert log.index(("kill", f"phase:{title}")) < min(i for i, e in enumerate(log) if e[1] == title)


def test_the_kill_point_kills_the_process_in_a_chain(tmp_path: Path) -> None:
    """DCX_TEST_KILL_AT at a pipelined phase: the process dies by SIGKILL there (a child python)."""
    import signal
    import subprocess
    import sys

    script = (
        "from tests.unit.test_phases import make_ctx, Step\n"
        "import threading, sys\n"
        "from dcx.bootstrap.phases import run_phases\n"
        "ctx, _ = make_ctx(2)\nlog = []\nlock = threading.Lock()\n"
        "run_phases(ctx, [Step('a', log, lock, pipelined=False), Step('b', log, lock)])\n"
        "print('not killed', log)\n")
    r = subprocess.run([sys.executable, "-c", script], env={**__import__("os").environ, "DCX_TEST_KILL_AT": "phase:b"},
                       capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr


def test_a_serial_phase_in_a_chain_runs_one_host_at_a_time() -> None:
    ctx, _ = make_ctx(4)
    slow = Slow(serial=True)
    slow.pipelined = True
    run_phases(ctx, [Mark(), slow])
    assert slow.peak == 1


def test_groups_and_the_create_phases_barriers() -> None:
    """The phases of a swarm create: barriers where the whole cluster matters (preflight before anything
    changes, the first manager before joins, the mesh key exchange, verification)."""
    from dcx.bootstrap.engines import get_engine
    from dcx.bootstrap.mesh import InstallWireGuard, MeshConfigure, MeshKeys, MeshVerify
    from dcx.bootstrap.phases import pipeline_groups
    from dcx.lifecycle.session import Options, base_phases

    ctx, _ = make_ctx(3)
    engine = get_engine("swarm")
    phases = base_phases(Options(), engine) + [InstallWireGuard(), MeshKeys(), MeshConfigure(), MeshVerify()]
    phases += engine.phases(ctx)
    groups = [[p.title for p in g] for g in pipeline_groups(phases)]
    assert ["Connect over SSH", "Set hostnames", "Gather host facts"] in groups
    assert ["Preflight checks"] in groups  # also when the phase after it is pipelined (barrier_after)
    chain = next(g for g in groups if g[0] == "Install container runtime")
    assert chain[1:4] == ["Start container runtime", "Install WireGuard", "Make WireGuard keys on each node"]
    assert ["Configure the WireGuard mesh"] in groups
    assert ["Verify the mesh (every peer answers)", "Read swarm membership"] in groups
    assert ["Initialise swarm on the first control node"] in groups
    assert ["Join control nodes", "Join workers"] in groups
    assert ["Verify every node is Ready"] in groups


def test_a_pipelined_phase_after_a_barrier_after_phase_waits_for_every_host() -> None:
    """Preflight: a host that passed it must not change anything while another host may still fail it."""
    ctx, _ = make_ctx(3)
    log: list[tuple[str, ...]] = []
    lock = threading.Lock()
    check = Step("check", log, lock, pipelined=False, fail={"n3"})
    check.barrier_after = True
    with pytest.raises(PhaseFailed) as info:
        run_phases(ctx, [check, Step("change", log, lock)])
    assert info.value.title == "check"
    assert not any(e[1] == "change" for e in log)
