"""FACTS_SCRIPT run for real under /bin/sh, with `docker` and `ss` replaced by doubles that print what the
real tools print (docker CLI `info --format` is a Go text/template over the Engine API's SystemInfo, whose
.Swarm is SwarmInfo, JSON-escaped by `json`; ss(8) `-H -l -n -t -u`, with `-p` also users:). The
doubles refuse any other arguments, so a changed command line fails here. Then what Preflight and
GatherSwarmState make of those facts: owners are read (ss -p) only when a checked port is not the member's own,
and the swarm state read with the facts is reused only when no phase changed the host since."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from dcx.bootstrap.preflight import host_problems
from dcx.bootstrap.runtime import FACTS_SCRIPT, LISTENING_COMMAND, parse_facts
from dcx.bootstrap.swarm import GatherSwarmState

DOCKER_FORMAT = '{{.ServerVersion}}{{"\\n"}}{{json .Swarm}}'
# A manager's .Swarm carries the CA certificate, a PEM with newlines: JSON escapes them as \n.
MANAGER = {"NodeID": "n1", "NodeAddr": "10.0.0.1", "LocalNodeState": "active", "ControlAvailable": True,
           "Cluster": {"ID": "c1", "TLSInfo": {"TrustRoot": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END"}}}
WORKER = {"NodeID": "n2", "NodeAddr": "10.0.0.2", "LocalNodeState": "active", "ControlAvailable": False}

# (netid, local address, process or "" for a kernel socket)
MEMBER_SOCKETS = [("tcp", "*:7946", "dockerd"), ("udp", "*:7946", "dockerd"), ("udp", "0.0.0.0:4789", "")]


def fake_bin(tmp: Path, swarm: dict | None, sockets: list[tuple[str, str, str]]) -> Path:
    """docker: `info --format DOCKER_FORMAT` prints the version and .Swarm (exit 1 when swarm is None: no
    daemon); ss: -Hlntu or -Hlntup over `sockets`."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    docker_out = "" if swarm is None else f"24.0.7\n{json.dumps(swarm, separators=(',', ':'))}\n"
    (bin_dir / "docker").write_text(
        "#!/bin/sh\n"
        f"if [ \"$1 $2\" = 'info --format' ] && [ \"$3\" = '{DOCKER_FORMAT}' ] && [ $# = 3 ]; then\n"
        f"  [ {int(swarm is None)} = 1 ] && {{ echo 'Cannot connect to the Docker daemon' >&2; exit 1; }}\n"
        f"  printf '%s' '{docker_out}'; exit 0; fi\n"
        "echo \"unexpected docker $*\" >&2; exit 2\n")
    plain = "".join(f"{n} {'LISTEN' if n == 'tcp' else 'UNCONN'} 0 4096 {a} *:*\n" for n, a, _ in sockets)
    p_lines = "".join(f"{n} {'LISTEN' if n == 'tcp' else 'UNCONN'} 0 4096 {a} *:*"
                      + (f' users:(("{p}",pid={100 + i},fd=3))' if p else "") + "\n"
                      for i, (n, a, p) in enumerate(sockets))
    (bin_dir / "ss").write_text(
        "#!/bin/sh\n"
        f"case \"$*\" in -Hlntu) printf '%s' '{plain}';; -Hlntup) printf '%s' '{p_lines}';;\n"
        "*) echo \"unexpected ss $*\" >&2; exit 2;; esac\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


class ShellHost:
    """A host whose commands run in /bin/sh here, with the doubles first on PATH; it records them."""

    def __init__(self, bin_dir: Path, role: str = "worker") -> None:
        self.env = {"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin"}
        self.calls: list[str] = []
        self.data: dict = {}
        self.facts = None
        self.name = "n1"
        self.node = SimpleNamespace(network="default", role=role)

    def run(self, command: str, **kw: object) -> SimpleNamespace:
        self.calls.append(command)
        p = subprocess.run(["sh", "-c", command], env=self.env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 or not kw.get("check"), p.stderr
        return SimpleNamespace(stdout=p.stdout, stderr=p.stderr, ok=p.returncode == 0)


def ctx(engine: str = "swarm") -> SimpleNamespace:
    return SimpleNamespace(spec=SimpleNamespace(spec=SimpleNamespace(
        engine=SimpleNamespace(type=engine), network=SimpleNamespace(meshPort=51820))))


def gathered(tmp: Path, swarm: dict | None, sockets: list[tuple[str, str, str]]) -> ShellHost:
    host = ShellHost(fake_bin(tmp, swarm, sockets))
    host.facts = parse_facts(host.run(FACTS_SCRIPT, check=True).stdout)
    host.calls.clear()
    return host


def test_the_script_reads_the_same_as_the_tools_it_replaced(tmp_path: Path) -> None:
    host = gathered(tmp_path, None, [])
    f = host.facts
    assert f.kernel == subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip()
    assert f.arch == subprocess.run(["uname", "-m"], capture_output=True, text=True).stdout.strip()
    assert f.hostname == subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    assert f.uid == int(subprocess.run(["id", "-u"], capture_output=True, text=True).stdout)
    meminfo = Path("/proc/meminfo").read_text().split("\n")
    assert f.mem_kb == int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1])
    df = subprocess.run(["df", "-Pk", "/"], capture_output=True, text=True).stdout.splitlines()[1].split()
    assert abs(f.disk_kb - int(df[3])) < 64 * 1024  # free space moves while the tests run
    assert f.cpus >= 1 and f.epoch > 0


def test_no_daemon_reads_listeners_with_their_owners(tmp_path: Path) -> None:
    host = gathered(tmp_path, None, [("tcp", "0.0.0.0:2377", "nginx")])
    f = host.facts
    assert (f.docker_running, f.docker_version, f.docker_swarm, f.listening_owners) == (False, "", "", True)
    assert f.listeners() == {("tcp", 2377): "nginx"}
    assert host_problems(ctx(), host, {}) == ["ports in use by other programs: tcp/2377 (nginx)"]  # type: ignore[arg-type]
    assert host.calls == []


def test_an_active_manager_is_not_asked_for_owners(tmp_path: Path) -> None:
    host = gathered(tmp_path, MANAGER, [*MEMBER_SOCKETS, ("tcp", "10.0.0.1:2377", "dockerd")])
    f = host.facts
    assert (f.docker_running, f.docker_version, f.listening_owners) == (True, "24.0.7", False)
    assert json.loads(f.docker_swarm) == MANAGER
    assert f.listeners() == {("tcp", 7946): "?", ("udp", 7946): "?", ("udp", 4789): "?", ("tcp", 2377): "?"}
    assert host_problems(ctx(), host, {}) == []  # type: ignore[arg-type]
    assert host.calls == []  # no ss -p


def test_a_port_the_member_does_not_hold_is_checked_with_its_owner(tmp_path: Path) -> None:
    # A worker's dockerd does not listen on the raft port: whoever does is found and reported.
    host = gathered(tmp_path, WORKER, [*MEMBER_SOCKETS, ("tcp", "0.0.0.0:2377", "nginx")])
    assert host.facts.listeners()[("tcp", 2377)] == "?"
    assert host_problems(ctx(), host, {}) == ["ports in use by other programs: tcp/2377 (nginx)"]  # type: ignore[arg-type]
    assert host.calls == [LISTENING_COMMAND]
    # The mesh port held by a process (wireguard-go is fine, anything else is not) is checked the same way.
    (tmp_path / "m").mkdir()
    other = gathered(tmp_path / "m", WORKER, [*MEMBER_SOCKETS, ("udp", "0.0.0.0:51820", "wireguard-go")])
    other.data["mesh_address"] = "100.96.0.2"
    assert host_problems(ctx(), other, {}) == []  # type: ignore[arg-type]
    assert other.calls == [LISTENING_COMMAND]


@pytest.mark.parametrize(("changed_since", "swarm", "reads"), [
    (False, WORKER, 0),  # nothing changed the host: the facts' swarm state stands
    (True, WORKER, 1),  # e.g. docker restarted with new proxy settings: read again
    (False, {**WORKER, "LocalNodeState": "pending"}, 1),  # not settled: read (and wait) again
])
def test_swarm_state_from_the_facts_only_while_it_holds(tmp_path: Path, changed_since: bool, swarm: dict,
                                                        reads: int) -> None:
    host = gathered(tmp_path, swarm, MEMBER_SOCKETS)
    host.data["facts_changes"] = 0
    host.data["changes"] = 1 if changed_since else 0
    live = {**WORKER, "NodeID": "live"}
    runs: list[str] = []

    def run(command: str, **kw: object) -> SimpleNamespace:
        runs.append(command)
        assert command == "docker info --format '{{json .Swarm}}'"
        return SimpleNamespace(stdout=json.dumps(live), ok=True)

    host.run = run  # type: ignore[method-assign]
    GatherSwarmState().run(None, host)  # type: ignore[arg-type]
    assert len(runs) == reads
    assert host.data["swarm"] == (live if reads else swarm)
