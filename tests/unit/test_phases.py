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
