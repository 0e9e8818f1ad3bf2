"""A connection holds no more sessions at once than its server accepts (sshd's MaxSessions), learns the
limit from a refusal, queues for a free session instead of failing, and names the refusing host."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paramiko
import pytest

from dcx.bootstrap import ssh
from dcx.bootstrap.ssh import Connection, HostKeyStore, SessionRefused, Target
from dcx.errors import OperationFailed
from tests.fakes.ssh_server import LimitedSSHServer


@pytest.fixture(scope="module")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[paramiko.PKey, Path]:
    key = paramiko.RSAKey.generate(2048)
    path = tmp_path_factory.mktemp("key") / "id_rsa"
    key.write_private_key_file(str(path))
    return key, path


@pytest.fixture
def server_factory(client_key: tuple[paramiko.PKey, Path]) -> Iterator:
    servers: list[LimitedSSHServer] = []
    conns: list[Connection] = []

    def make(max_sessions: int | None, name: str = "manager-1") -> tuple[LimitedSSHServer, Connection]:
        server = LimitedSSHServer(client_key[0], max_sessions)
        servers.append(server)
        target = Target(name=name, host="127.0.0.1", port=server.port, key_files=[str(client_key[1])], agent=False,
                        booting=False)
        conn = Connection(target, HostKeyStore({}, lambda: None))
        conns.append(conn)
        return server, conn

    yield make
    for c in conns:
        c.close()
    for s in servers:
        s.close()


def run_many(conn: Connection, n: int, command: str = "sleep 0.1; echo ok") -> list[str]:
    with ThreadPoolExecutor(max_workers=n) as pool:
        return [r.stdout.strip() for r in pool.map(lambda _: conn.run(command, check=True, timeout=60), range(n))]


@pytest.mark.parametrize("max_sessions", [1, 2, 3, 10])  # 10: OpenSSH's default
def test_concurrent_commands_queue_within_the_servers_limit(server_factory, max_sessions: int) -> None:
    server, conn = server_factory(max_sessions)
    n = max(8, max_sessions + 4)
    assert run_many(conn, n) == ["ok"] * n
    assert server.most_at_once <= max_sessions  # never more than the server allows at once
    assert server.refusals >= 1  # the limit was learned from a refusal, not configured
    assert conn._gate.limit == max_sessions  # ... and it is exactly what the server allows
    assert server.connections == 1  # queued on the one connection: no extra logins (MaxStartups)


def test_refusals_stop_once_the_limit_is_known(server_factory) -> None:
    server, conn = server_factory(2)
    run_many(conn, 8)
    refused = server.refusals
    run_many(conn, 8)
    assert server.refusals == refused  # the second burst queues on the learned limit: no refusal at all


def test_no_limit_is_imposed_where_the_server_refuses_nothing(server_factory) -> None:
    server, conn = server_factory(None)
    assert run_many(conn, 8) == ["ok"] * 8
    assert server.refusals == 0 and conn._gate.limit is None
    assert server.most_at_once >= 2  # concurrent sessions were really used (the sleeps overlapped)


def test_stdin_and_exit_codes_survive_the_queue(server_factory) -> None:
    _, conn = server_factory(1)
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda i: conn.run(f"read x; echo $x-{i}; exit {i}", stdin=f"in{i}\n", timeout=60),
                                range(6)))
    assert [(r.exit_code, r.stdout.strip()) for r in results] == [(i, f"in{i}-{i}") for i in range(6)]


def test_a_server_that_allows_no_session_fails_naming_itself(server_factory, monkeypatch) -> None:
    monkeypatch.setattr(ssh, "REFUSAL_PATIENCE", 0.3)
    _, conn = server_factory(0, name="manager-1")
    with pytest.raises(SessionRefused) as info:
        conn.run("true", timeout=30)
    assert info.value.message.startswith("manager-1 (root@127.0.0.1:")
    assert "refused every new SSH session" in info.value.message and "ChannelException(2" in info.value.message
    assert "MaxSessions" in (info.value.hint or "")


def test_a_slot_wait_is_bounded_by_the_command_timeout(server_factory) -> None:
    _, conn = server_factory(1)
    with ThreadPoolExecutor(max_workers=2) as pool:
        slow = pool.submit(conn.run, "sleep 1", timeout=30)
        # the slow one holds the only session; the learned limit makes this one wait, then time out
        fast = pool.submit(lambda: (time.sleep(0.3), conn.run("true", timeout=0.4))[1])
        with pytest.raises(OperationFailed, match="manager-1"):
            fast.result()
        assert slow.result().ok


def test_hosts_behind_one_jump_host_share_its_connection(client_key: tuple[paramiko.PKey, Path]) -> None:
    """Five hosts behind one bastion: one login on the bastion (its MaxStartups would drop logins that
    arrive together), five forwarded channels through it."""
    bastion = LimitedSSHServer(client_key[0], max_sessions=1)
    behind = LimitedSSHServer(client_key[0], max_sessions=2)
    sessions = ssh.Sessions(HostKeyStore({}, lambda: None))
    try:
        def target(i: int) -> Target:
            # as lifecycle.session.target_for_endpoint builds them: a fresh jump Target per host
            jump = Target(name=f"jump-127.0.0.1-{bastion.port}", host="127.0.0.1", port=bastion.port,
                          key_files=[str(client_key[1])], agent=False, booting=False)
            return Target(name=f"edge-{i}", host="127.0.0.1", port=behind.port, key_files=[str(client_key[1])],
                          jump=jump, agent=False, booting=False)

        conns = [sessions.get(target(i)) for i in range(5)]
        with ThreadPoolExecutor(max_workers=5) as pool:
            out = list(pool.map(lambda c: c.run("echo $((6*7))", check=True, timeout=60).stdout.strip(), conns))
        assert out == ["42"] * 5
        assert bastion.connections == 1 and bastion.forwarded == 5
        assert behind.connections == 5
    finally:
        sessions.close()
        bastion.close()
        behind.close()
