"""End to end: dcx works within what a hardened sshd allows (MaxSessions 1, MaxStartups 3:50:6 on every
node): a 12-node create, destroy, and create again, each converging; and one connection's commands and
uploads against a real hardened OpenSSH, concurrent and back to back."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paramiko
import pytest

from dcx import netns
from dcx.bootstrap.ssh import Connection, HostKeyStore, Target
from tests.testbed.lab import Lab
from tests.testbed.local import Dcx, leftovers, registry_entries, skip_without_namespace_nodes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SUBNET = "10.213.207.0/24"


def hardened_spec(name: str, nodes: int) -> str:
    local = f"provider: local, local: {{subnet: {SUBNET}, sshd: hardened}}"
    return (f"apiVersion: dcx/v1\nkind: Cluster\nmetadata: {{name: {name}}}\nspec:\n  engine: {{type: swarm}}\n"
            f"  pools:\n    - {{name: control, role: control, count: 1, {local}}}\n"
            f"    - {{name: workers, role: worker, count: {nodes - 1}, {local}}}\n")


def assert_sessions_limited_to_one(cli: Dcx, cluster: str, node: dict) -> None:
    """The node's live sshd really is hardened: a second session on one connection is refused, as
    OpenSSH refuses past MaxSessions (ChannelException 2)."""
    config = (Path(node["home"]) / "sshd" / "sshd_config").read_text()
    assert "MaxSessions 1\n" in config and "MaxStartups 3:50:6\n" in config
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # a throwaway check of a test node
    client.connect(node["address"], username="root", key_filename=str(cli.home / "clusters" / cluster / "ssh" /
                                                                       "id_ed25519"),
                   allow_agent=False, look_for_keys=False, timeout=10)
    try:
        transport = client.get_transport()
        assert transport is not None
        first = transport.open_session()
        with pytest.raises(paramiko.ChannelException) as refused:
            transport.open_session()
        assert refused.value.code == 2
        first.close()
    finally:
        client.close()


def test_twelve_nodes_on_hardened_sshd_create_destroy_create(dcx_cli: tuple[Dcx, list[str]], tmp_path: Path) -> None:
    cli, clusters = dcx_cli
    name = "e2e-hardened"
    clusters.append(name)
    spec = tmp_path / "cluster.yaml"
    spec.write_text(hardened_spec(name, 12))
    for attempt in ("first", "after destroy"):
        r = cli.run("cluster", "create", "-f", str(spec))
        assert r.returncode == 0, f"{attempt} create:\n{r.stdout}\n{r.stderr}"
        status = cli.json("cluster", "status", name)
        assert status["healthy"] is True, status
        assert len(status["nodes"]) == 12 and all(n["ready"] for n in status["nodes"])
        nodes = registry_entries(name)
        assert_sessions_limited_to_one(cli, name, next(n for n in nodes if n["node"] == f"{name}-control-1"))
        cluster_id = cli.state(name)["id"]
        r = cli.run("cluster", "destroy", name, "--yes")
        assert r.returncode == 0, r.stderr
        assert leftovers(cluster_id, name) == []


def test_commands_and_uploads_share_one_session_on_a_real_hardened_sshd(caplog: pytest.LogCaptureFixture) -> None:
    """Against OpenSSH itself (MaxSessions 1): commands and SFTP uploads from 8 threads on one connection,
    then 20 commands one after another. sshd frees a closed session a loop turn after the client's CLOSE,
    so back-to-back opens are refused unless dcx orders them after it; every one must succeed."""
    skip_without_namespace_nodes()
    with Lab("limits") as lab:
        lab.network("lan", "10.214.70.0/24", operator_ip="10.214.70.1")
        lab.host("hard", "lan", "10.214.70.10", sshd=netns.HARDENED_SSHD)
        conn = Connection(Target(name="hard", host="10.214.70.10", key_files=[str(lab.key)], agent=False,
                                 booting=False), HostKeyStore({}, lambda: None))
        try:
            def work(i: int) -> str:
                conn.upload(f"payload {i}\n".encode(), f"/root/dcx-limits-{i}", 0o600)
                return conn.run(f"cat /root/dcx-limits-{i}; stat -c %a /root/dcx-limits-{i}", check=True).stdout

            caplog.set_level(logging.DEBUG, logger="dcx")
            with ThreadPoolExecutor(max_workers=8) as pool:
                assert list(pool.map(work, range(8))) == [f"payload {i}\n600\n" for i in range(8)]
            assert conn._gate.limit == 1  # learned from the real sshd's refusal
            assert "session refused (ChannelException(2" in caplog.text  # sshd refused, dcx waited: no failure
            refused = caplog.text.count("session refused")
            assert [conn.run(f"echo {i}").stdout for i in range(20)] == [f"{i}\n" for i in range(20)]
            assert caplog.text.count("session refused") == refused  # back to back: no refusal once it knows
        finally:
            conn.close()
