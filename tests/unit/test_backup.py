"""Backup archives (what they hold, and every way a bad one is refused: one line, exit 2), the swarm backup
procedure and the k3s etcd-snapshot save/restore contract (exact commands; k3s cannot run here), and the
images that follow a cluster (recorded, then loaded on nodes that lack them)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from dcx import images
from dcx.bootstrap import k3s, swarm
from dcx.bootstrap.engines import EngineBackup
from dcx.bootstrap.phases import Host, RunContext
from dcx.bootstrap.runtime import Facts, docker_stop_commands
from dcx.bootstrap.ssh import Result, Target
from dcx.errors import InputError, OperationFailed
from dcx.lifecycle import backup, restore
from dcx.providers.base import Node
from dcx.spec import ClusterSpec
from dcx.state import ClusterDir, ClusterState
from tests.unit.test_k3s import FakeRemote, load_yaml, make_ctx, make_spec

# --- the archive ------------------------------------------------------------------------------------


def write_backup(path: Path, engine: str = "swarm", *, secrets: dict[str, str] | None = None,
                 image: bytes | None = None, **manifest: Any) -> Path:
    members = {backup.SPEC: b'{"metadata": {"name": "old"}}\n', "engine/swarm.tar.gz": b"raft bytes"}
    members.update({f"secrets/{k}": v.encode() for k, v in (secrets or {}).items()})
    records = []
    if image is not None:
        digest = hashlib.sha256(image).hexdigest()
        members[f"images/{digest}.tar"] = image
        records.append({"digest": digest, "kind": "import", "refs": ["x/busybox:1"]})
    doc = {"kind": backup.KIND, "schema_version": backup.SCHEMA_VERSION, "cluster": "old", "cluster_id": "abc",
           "engine": engine, "created_at": "2026-12-01T05:00:00Z", "source_node": "old-control-1",
           "images": records, **manifest}
    path.write_bytes(backup.build_archive(doc, members))
    return path


def test_archive_round_trip_keeps_engine_state_secrets_and_images(tmp_path: Path) -> None:
    path = write_backup(tmp_path / "b.tar.gz", secrets={"unlock-key": "SWMKEY-1-abc"}, image=b"rootfs")
    b = restore.read_archive(path)
    assert b.engine_type == "swarm" and b.engine.source == "old-control-1"
    assert b.engine.files == {"swarm.tar.gz": b"raft bytes"}
    assert b.engine.secrets == {"unlock-key": "SWMKEY-1-abc"}
    assert b.images == [("import", ["x/busybox:1"], b"rootfs")]
    assert b.manifest["cluster"] == "old" and b.spec == {"metadata": {"name": "old"}}
    with tarfile.open(path) as tar:  # every member private, the manifest first
        assert tar.getnames()[0] == backup.MANIFEST
        assert {m.mode for m in tar.getmembers()} == {0o600}


def rewrite(path: Path, change: Any) -> None:
    """Re-pack the archive after `change(members)`, keeping the manifest as it is."""
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    change(members)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def set_manifest(**fields: Any) -> Any:
    def change(members: dict[str, bytes]) -> None:
        members[backup.MANIFEST] = json.dumps({**json.loads(members[backup.MANIFEST]), **fields}).encode()
    return change


@pytest.mark.parametrize(("damage", "message"), [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "damaged or not a backup archive"),
    (lambda p: p.write_bytes(b"not gzip at all"), "damaged or not a backup archive"),
    (lambda p: p.write_bytes(gzip.compress(b"x" * 1000)), "damaged or not a backup archive"),
    (lambda p: rewrite(p, lambda m: m.update({"engine/swarm.tar.gz": b"other bytes"})),
     "engine/swarm.tar.gz does not match its SHA-256"),
    (lambda p: rewrite(p, lambda m: m.pop("engine/swarm.tar.gz")), "engine/swarm.tar.gz is missing"),
    (lambda p: rewrite(p, lambda m: m.update({"extra": b""})), "members not in the manifest: extra"),
    (lambda p: rewrite(p, lambda m: m.pop(backup.MANIFEST)), "not a dcx backup (no manifest.json)"),
    (lambda p: rewrite(p, set_manifest(kind="something-else")), "not a dcx backup"),
    (lambda p: rewrite(p, set_manifest(schema_version=2)), "backup schema_version 2 is not one this dcx reads (1)"),
    (lambda p: rewrite(p, set_manifest(schema_version="1")), "backup schema_version '1' is not one this dcx reads"),
])
def test_a_damaged_or_unknown_archive_is_refused_as_bad_input(tmp_path: Path, damage: Any, message: str) -> None:
    path = write_backup(tmp_path / "b.tar.gz")
    damage(path)
    with pytest.raises(InputError) as exc:
        restore.read_archive(path)
    assert message in exc.value.message and str(path) in exc.value.message
    assert "\n" not in exc.value.message


def test_members_that_would_escape_are_refused(tmp_path: Path) -> None:
    path = write_backup(tmp_path / "b.tar.gz")
    rewrite(path, lambda m: m.update({"../evil": b"x"}))
    with pytest.raises(InputError, match="unexpected member '../evil'"):
        restore.read_archive(path)


def test_an_archive_of_the_other_engine_is_refused(tmp_path: Path) -> None:
    path = write_backup(tmp_path / "b.tar.gz", engine="swarm")
    with pytest.raises(InputError, match="a backup of a swarm cluster cannot be restored into the k3s cluster"):
        restore.load(path, make_spec())


def test_restore_refuses_a_cluster_with_state_but_resumes_its_own_unfinished_restore(tmp_path: Path) -> None:
    path = write_backup(tmp_path / "b.tar.gz")
    b = restore.read_archive(path)
    cdir = ClusterDir(tmp_path / "home", "demo")
    cdir.create_dirs()
    state = ClusterState(name="demo", id="x1", nodes={"demo-control-1": {
        "name": "demo-control-1", "pool": "control", "provider": "local", "role": "control", "ssh_address": "a"}})
    cdir.save(state)

    class S:
        pass

    session = S()
    session.cdir = cdir  # type: ignore[attr-defined]
    with pytest.raises(InputError, match="cluster demo already has state \\(1 nodes\\): a restore builds a new"):
        restore.refuse_existing(session, b)
    state.resources[restore.MARKER] = {"archive": b.sha256, "done": False}
    cdir.save(state)
    restore.refuse_existing(session, b)  # the same restore, not finished: a re-run resumes it
    state.resources[restore.MARKER]["done"] = True
    cdir.save(state)
    with pytest.raises(InputError):
        restore.refuse_existing(session, b)


def dcx(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "dcx", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DCX_HOME": str(home), "NO_COLOR": "1"}, stdin=subprocess.DEVNULL)


def test_create_restore_with_a_bad_archive_is_one_line_and_exit_2(tmp_path: Path) -> None:
    spec = tmp_path / "cluster.yaml"
    spec.write_text("apiVersion: dcx/v1\nkind: Cluster\nmetadata: {name: r1}\nspec:\n  engine: {type: k3s}\n"
                    "  pools:\n    - {name: control, role: control, count: 1, provider: local}\n")
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"garbage")
    r = dcx(tmp_path / "home", "cluster", "create", "-f", str(spec), "--restore", str(bad))
    assert r.returncode == 2, r.stderr
    assert "damaged or not a backup archive" in r.stderr and "Traceback" not in r.stderr
    other = write_backup(tmp_path / "swarm.tar.gz", engine="swarm")
    r = dcx(tmp_path / "home", "cluster", "create", "-f", str(spec), "--restore", str(other))
    assert r.returncode == 2 and "a backup of a swarm cluster cannot be restored into the k3s cluster" in r.stderr
    assert not (tmp_path / "home" / "clusters" / "r1").exists()  # refused before anything was made


def test_backup_takes_its_o_as_the_archive_path() -> None:
    from dcx.cli.main import hoist_global_options

    assert hoist_global_options(["cluster", "backup", "demo", "-o", "b.tar.gz"]) == [
        "cluster", "backup", "demo", "-o", "b.tar.gz"]
    assert hoist_global_options(["cluster", "backup", "demo", "-o", "json"]) == [
        "-o", "json", "cluster", "backup", "demo"]


# --- swarm: Docker's documented procedure -----------------------------------------------------------


class SwarmManager:
    """One manager's SSH connection as backup_swarm uses it: `docker info` .Swarm (Engine API SwarmInfo, with
    Cluster.Spec.EncryptionConfig.AutoLockManagers), the node list (Engine API Node objects), the unlock key,
    dockerd stopped and started; `download` hands back what tar wrote. Every command is recorded."""

    def __init__(self, name: str, nodes: list[dict[str, Any]], autolock: bool) -> None:
        self.name, self.nodes, self.autolock = name, nodes, autolock
        self.calls: list[str] = []
        self.requests: list[bytes] = []
        self.dockerd = True
        self.target = Target(name=name, host="192.0.2.1")

    def run(self, command: str, *, check: bool = False, **_: Any) -> Result:
        self.calls.append(command)
        if command == "docker info --format '{{json .Swarm}}'":
            state = "locked" if self.autolock and self.dockerd == "restarted" else "active"
            lock = {"EncryptionConfig": {"AutoLockManagers": self.autolock}}
            return Result(0, json.dumps({"LocalNodeState": state, "ControlAvailable": True,
                                         "NodeID": f"id-{self.name}", "Cluster": {"Spec": lock}}), "")
        if command == "docker node ls -q":
            return Result(0, "\n".join(n["ID"] for n in self.nodes), "")
        if command.startswith("docker node inspect --format "):
            return Result(0, "\n".join(json.dumps(n) for n in self.nodes), "")
        if command == "docker swarm unlock-key -q":
            return Result(0, "SWMKEY-1-secret\n", "")
        if command.startswith("set -e; ") and "docker.socket" in command:
            self.dockerd = False
        elif command.startswith("set -e; systemctl enable --now docker"):
            self.dockerd = "restarted"
        elif command.startswith("umask 077; ") and self.dockerd:
            raise AssertionError("the raft directory was copied while dockerd ran")
        return Result(0, "", "")

    def exchange(self, command: str, request: bytes, **_: Any) -> tuple[int, bytes, bytes]:
        self.requests.append(request)
        self.dockerd = True
        return 0, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b""

    def download(self, path: str) -> bytes:
        self.calls.append(f"download {path}")
        return b"raft tarball"


def swarm_backup_ctx(managers: int, autolock: bool = False) -> tuple[RunContext, dict[str, SwarmManager]]:
    nodes = [{"ID": f"id-c{i}", "Spec": {"Role": "manager", "Labels": {swarm.LABEL_NODE: f"c{i}"}},
              "ManagerStatus": {"Reachability": "reachable", "Leader": i == 1}} for i in range(1, managers + 1)]
    conns, hosts = {}, []
    for i in range(1, managers + 1):
        conns[f"c{i}"] = conn = SwarmManager(f"c{i}", nodes, autolock)
        node = Node(name=f"c{i}", pool="control", provider="local", role="control", ssh_address="192.0.2.1")
        host = Host(node=node, target=conn.target, conn=conn)  # type: ignore[arg-type]
        host.facts = Facts(init="systemd", os_id="debian")
        hosts.append(host)
    notes: list[str] = []

    class Notes:
        def note(self, message: str) -> None:
            notes.append(message)

    ctx = RunContext(cluster_name="demo", spec=None, hosts=hosts, sessions=None, reporter=Notes())  # type: ignore[arg-type]
    ctx.shared["notes"] = notes
    return ctx, conns


def test_swarm_backup_stops_dockerd_copies_the_raft_directory_and_starts_it_again() -> None:
    ctx, conns = swarm_backup_ctx(1)
    got = swarm.backup_swarm(ctx, ctx.hosts[0])
    assert got == EngineBackup({"swarm.tar.gz": b"raft tarball"}, source="c1", secrets={}, control_members=1)
    changes = [c for c in conns["c1"].calls if not c.startswith(("docker info", "docker node"))]
    assert changes == [
        "set -e; systemctl stop docker.socket docker",
        "umask 077; rm -f /var/lib/docker/dcx-swarm-backup.tar.gz; "
        "tar czf /var/lib/docker/dcx-swarm-backup.tar.gz -C /var/lib/docker swarm",
        "set -e; systemctl enable --now docker",
        "download /var/lib/docker/dcx-swarm-backup.tar.gz",
        "rm -f /var/lib/docker/dcx-swarm-backup.tar.gz",
    ]
    assert any("control plane pauses" in n for n in ctx.shared["notes"])


def test_swarm_backup_with_three_managers_copies_a_follower() -> None:
    ctx, conns = swarm_backup_ctx(3)
    got = swarm.backup_swarm(ctx, ctx.hosts[0])
    assert got.source == "c2" and got.control_members == 3  # c1 leads: a follower stops, two keep the quorum
    assert got.secrets == {}
    assert not any("docker.socket" in c for c in conns["c1"].calls + conns["c3"].calls)
    assert any("docker.socket" in c for c in conns["c2"].calls)
    assert not any("pauses" in n for n in ctx.shared["notes"])


@pytest.mark.parametrize("managers", [2, 3])
def test_swarm_backup_with_autolock_and_several_managers_is_refused_before_anything_stops(managers: int) -> None:
    ctx, conns = swarm_backup_ctx(managers, autolock=True)
    with pytest.raises(OperationFailed, match=f"autolock on and {managers} managers") as exc:
        swarm.backup_swarm(ctx, ctx.hosts[0])
    assert "--autolock=false" in (exc.value.hint or "")
    assert not any("docker.socket" in c or "unlock-key" in c for conn in conns.values() for c in conn.calls)


def test_swarm_backup_of_one_autolocked_manager_keeps_the_unlock_key_off_command_lines() -> None:
    ctx, conns = swarm_backup_ctx(1, autolock=True)
    got = swarm.backup_swarm(ctx, ctx.hosts[0])
    assert got.secrets == {"unlock-key": "SWMKEY-1-secret"}
    # The key reaches the daemon in the API request body (POST /swarm/unlock), never a command line.
    assert len(conns["c1"].requests) == 1 and b"/swarm/unlock" in conns["c1"].requests[0].split(b"\r\n", 1)[0]
    assert b"SWMKEY-1-secret" in conns["c1"].requests[0]
    assert not any("SWMKEY" in c for c in conns["c1"].calls)


def test_an_archive_of_an_autolocked_swarm_of_several_managers_is_refused(tmp_path: Path) -> None:
    path = write_backup(tmp_path / "b.tar.gz", secrets={"unlock-key": "SWMKEY-1-x"}, control_members=3)
    swarm_spec = ClusterSpec.model_validate({"apiVersion": "dcx/v1", "kind": "Cluster", "metadata": {"name": "n"},
                                             "spec": {"pools": [{"name": "c", "role": "control", "count": 1,
                                                                 "provider": "local"}]}})
    with pytest.raises(InputError, match="autolock on and 3 managers"):
        restore.load(path, swarm_spec)
    one = write_backup(tmp_path / "one.tar.gz", secrets={"unlock-key": "SWMKEY-1-x"}, control_members=1)
    assert restore.load(one, swarm_spec).engine.control_members == 1


def test_init_with_force_new_cluster() -> None:
    assert swarm.init_command("100.96.0.1", "100.96.0.1", force_new_cluster=True) == (
        "docker swarm init --advertise-addr 100.96.0.1 --listen-addr 100.96.0.1:2377 --force-new-cluster "
        "--data-path-addr 100.96.0.1")


def raft_tarball(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data, mode in [("swarm/docker-state.json", json.dumps(state).encode(), 0o600),
                                 ("swarm/raft/wal-v3-encrypted/0.wal", b"wal", 0o600)]:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_restored_raft_directory_points_at_the_new_machine() -> None:
    # dockerd's daemon/cluster saves nodeStartConfig as docker-state.json; a manager restarts on its addresses.
    old = {"LocalAddr": "10.213.225.2", "ListenAddr": "10.213.225.2:2377", "AdvertiseAddr": "10.213.225.2",
           "DataPathAddr": "100.96.0.1", "DefaultAddressPool": None, "SubnetSize": 0, "DataPathPort": 0,
           "JoinAddr": ""}
    out = swarm.retarget(raft_tarball(old), "10.213.226.2", None)
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        state = json.loads(tar.extractfile("swarm/docker-state.json").read())  # type: ignore[union-attr]
        wal = tar.getmember("swarm/raft/wal-v3-encrypted/0.wal")
        assert tar.extractfile(wal).read() == b"wal" and wal.mode == 0o600  # type: ignore[union-attr]
    assert state == {**old, "LocalAddr": "10.213.226.2", "ListenAddr": "10.213.226.2:2377",
                     "AdvertiseAddr": "10.213.226.2", "DataPathAddr": ""}


def test_a_restore_replaces_the_swarm_init_and_prunes_the_old_nodes() -> None:
    engine = swarm.SwarmEngine()
    ctx = RunContext(cluster_name="demo", spec=None, hosts=[], sessions=None)  # type: ignore[arg-type]
    plain = [type(p).__name__ for p in engine.phases(ctx)]
    engine.restore = EngineBackup({"swarm.tar.gz": b""})
    restored = [type(p).__name__ for p in engine.phases(ctx)]
    assert plain == ["GatherSwarmState", "SettleMembership", "InitSwarm", "JoinManagers", "JoinWorkers",
                     "RefreshRestoredManager", "LabelNodes", "VerifySwarm"]
    assert restored == ["GatherSwarmState", "SettleMembership", "RestoreSwarm", "JoinManagers", "JoinWorkers",
                        "RefreshRestoredManager", "LabelNodes", "PruneOldNodes", "VerifySwarm"]


@pytest.mark.parametrize(("init", "expected"), [
    ("systemd", "systemctl stop docker.socket docker"), ("openrc", "rc-service docker stop")])
def test_docker_stop_commands(init: str, expected: str) -> None:
    assert docker_stop_commands(Facts(init=init)) == [expected]


def test_detached_dockerd_stop_is_valid_sh() -> None:
    script = docker_stop_commands(Facts(init=""))[0]
    assert subprocess.run(["sh", "-n", "-c", script], capture_output=True).returncode == 0
    # With no dockerd running (no pidfile) it does nothing and succeeds.
    assert subprocess.run(["sh", "-c", script.replace("/run/dcx/dockerd.pid", "/nonexistent/pid")]).returncode == 0


# --- k3s: etcd snapshot save / cluster-reset restore (contract) -------------------------------------


class SnapshotRemote(FakeRemote):
    """A k3s server that answers the backup and restore commands as k3s documents them
    (docs.k3s.io/cli/etcd-snapshot): `etcd-snapshot save --name N --etcd-snapshot-dir D` writes one file
    D/N-NODE-TIMESTAMP; `server --cluster-reset --cluster-reset-restore-path=F` needs F and exits."""

    def answer(self, command: str, stdin: str) -> Result:
        argv = shlex.split(command) if not command.startswith(("rm ", "ls ", "test ", "mkdir ")) else []
        if argv[:3] == [k3s.BIN, "etcd-snapshot", "save"]:
            name, directory = argv[argv.index("--name") + 1], argv[argv.index("--etcd-snapshot-dir") + 1]
            self.files[f"{directory}/{name}-{self.name}-1764565200"] = b"etcd snapshot bytes"
            return Result(0, "", "")
        if argv[:3] == [k3s.BIN, "server", "--cluster-reset"]:
            path = argv[3].split("=", 1)[1]
            assert path in self.files, "cluster-reset before the snapshot was uploaded"
            assert not self.running, "cluster-reset while k3s runs"
            self.restored_from = self.files[path]
            return Result(0, "", "")
        if command.startswith(f"ls -1 {k3s.BACKUP_DIR}"):
            return Result(0, "\n".join(p.rsplit("/", 1)[1] for p in self.files if p.startswith(k3s.BACKUP_DIR)), "")
        if command.startswith("test -f "):
            return Result(0 if command.split()[2] in self.files else 1, "", "")
        if command == k3s.stop_command(self.init, "server"):
            self.running = False
            return Result(0, "", "")
        if command.startswith(("rm -rf ", "mkdir -p")):
            if k3s.RESTORED_MARKER in command:
                self.files[k3s.RESTORED_MARKER] = b""
            for path in [p for p in self.files if command.startswith(f"rm -rf {p.rsplit('/', 1)[0]}")]:
                del self.files[path]
            return Result(0, "", "")
        return super().answer(command, stdin)

    def download(self, path: str) -> bytes:
        self.calls.append((f"download {path}", ""))
        return self.files[path]


def test_k3s_backup_saves_an_etcd_snapshot_and_copies_it_back(tmp_path: Path) -> None:
    ctx = make_ctx(make_spec(controls=1, workers=0), cdir=ClusterDir(tmp_path, "demo"), remote=SnapshotRemote)
    host = ctx.hosts[0]
    host.conn.running = True  # type: ignore[attr-defined]
    (tmp_path / "clusters" / "demo" / "secrets").mkdir(parents=True)
    (tmp_path / "clusters" / "demo" / "secrets" / "k3s-token").write_text("the-token\n")
    got = k3s.backup_k3s(ctx, host)
    assert got.files == {"etcd-snapshot": b"etcd snapshot bytes"} and got.source == "demo-control-1"
    assert got.secrets == {"k3s-token": "the-token"}
    sent = [c for c, _ in host.conn.calls]  # type: ignore[attr-defined]
    snap = f"{k3s.BACKUP_DIR}/dcx-demo-demo-control-1-1764565200"
    assert sent == [
        "rm -rf /var/lib/rancher/k3s/server/db/dcx-backup",
        "/usr/local/bin/k3s etcd-snapshot save --name dcx-demo --etcd-snapshot-dir "
        "/var/lib/rancher/k3s/server/db/dcx-backup",
        "ls -1 /var/lib/rancher/k3s/server/db/dcx-backup",
        f"download {snap}",
        "rm -rf /var/lib/rancher/k3s/server/db/dcx-backup",
    ]


def test_k3s_restore_resets_the_first_server_from_the_snapshot_with_the_old_token(tmp_path: Path) -> None:
    from dcx.bootstrap.phases import run_phases

    ctx = make_ctx(make_spec(controls=3, workers=1), cdir=ClusterDir(tmp_path, "demo"), remote=SnapshotRemote)
    engine = k3s.K3sEngine()
    engine.restore = EngineBackup({"etcd-snapshot": b"etcd snapshot bytes"}, source="old-control-1",
                                  secrets={"k3s-token": "the-old-token"})
    phases = engine.phases(ctx)
    titles = [p.title for p in phases]
    assert titles.index("Restore etcd from the backup on the first control node") == titles.index(
        "Start k3s on the first control node (embedded etcd)") + 1
    run_phases(ctx, [p for p in phases if p.title.startswith(("Read", "Start k3s", "Restore"))])
    first = ctx.host("demo-control-1").conn
    assert first.restored_from == b"etcd snapshot bytes"  # type: ignore[attr-defined]
    sent = [c for c, _ in first.calls]  # type: ignore[attr-defined]
    at = sent.index("systemctl stop k3s")
    assert sent[at - 2:at + 6] == [
        f"test -f {k3s.RESTORED_MARKER}",
        "mkdir -p -m 700 /var/lib/rancher/k3s/server/db/dcx-restore",
        "systemctl stop k3s",
        "/usr/local/bin/k3s server --cluster-reset "
        "--cluster-reset-restore-path=/var/lib/rancher/k3s/server/db/dcx-restore/etcd-snapshot",
        f"mkdir -p {k3s.DCX_DIR} && touch {k3s.RESTORED_MARKER} && rm -rf /var/lib/rancher/k3s/server/db/dcx-restore",
        "systemctl enable --now k3s",
        "/usr/local/bin/k3s kubectl get --raw=/readyz",
        "/usr/local/bin/k3s kubectl -n kube-system delete secret demo-control-1.node-password.k3s --ignore-not-found",
    ]
    assert ("/var/lib/rancher/k3s/server/db/dcx-restore/etcd-snapshot", 0o600, b"etcd snapshot bytes") in \
        first.uploads  # type: ignore[attr-defined]
    # The old token: in the config (from stdin), in the cluster directory, on no command line.
    assert load_yaml(first.config)["token"] == "the-old-token"  # type: ignore[attr-defined]
    assert (tmp_path / "clusters" / "demo" / "secrets" / "k3s-token").read_text().strip() == "the-old-token"
    assert not any("the-old-token" in c for c in sent)
    # A re-run finds the marker and does not reset again.
    restore_phase = next(p for p in phases if p.title.startswith("Restore"))
    assert not restore_phase.needs_run(ctx, ctx.host("demo-control-1"))


# --- images that follow the cluster -------------------------------------------------------------------


def docker_save_tar(manifest: list[dict[str, Any]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_refs_of_a_docker_save_tarball() -> None:
    assert images.save_refs(docker_save_tar([{"Config": "abc.json", "RepoTags": ["a:1", "b:2"]},
                                             {"Config": "blobs/sha256/def", "RepoTags": None}])) == [
        "a:1", "b:2", "sha256:def"]
    assert images.save_refs(b"not a tar") == []


def test_recording_an_image_keeps_the_tarball_private_and_replaces_an_older_one_of_the_same_ref(
        tmp_path: Path) -> None:
    cdir = ClusterDir(tmp_path, "demo")
    cdir.create_dirs()
    state = ClusterState(name="demo", id="x")
    first = images.add_image(cdir, state, "import", b"v1", ["x/busybox:1"])
    second = images.add_image(cdir, state, "import", b"v2", ["x/busybox:1"])
    assert list(state.images) == [second]
    assert not (cdir.path / "images" / f"{first}.tar").exists()
    kept = cdir.path / state.images[second]["file"]
    assert kept.read_bytes() == b"v2" and (kept.stat().st_mode & 0o777) == 0o600
    state2 = ClusterState.from_json(state.to_json(), "x")  # the record survives the state file
    assert state2.images == state.images


class ImageNode:
    def __init__(self, has: set[str]) -> None:
        self.has = has
        self.calls: list[tuple[str, bytes | None]] = []

    def run(self, command: str, *, stdin: bytes | None = None, **_: Any) -> Result:
        self.calls.append((command, stdin))
        if "docker image inspect" in command:
            refs = [shlex.split(part)[3] for part in command.split("; ")]
            return Result(0, "".join(f"{r}\n" for r in refs if r not in self.has), "")
        return Result(0, "", "")


def test_nodes_that_lack_a_recorded_image_get_it(tmp_path: Path) -> None:
    cdir = ClusterDir(tmp_path, "demo")
    cdir.create_dirs()
    state = ClusterState(name="demo", id="x")
    images.add_image(cdir, state, "import", b"rootfs", ["x/busybox:1"])
    images.add_image(cdir, state, "load", b"saved", ["a:1", "b:2"])
    [phase] = images.image_phases(cdir, state, uses_docker=True)
    assert images.image_phases(cdir, state, uses_docker=False) == []  # k3s nodes have no docker load
    hosts = {}
    for name, has in {"fresh": set(), "partial": {"x/busybox:1", "a:1"}, "full": {"x/busybox:1", "a:1", "b:2"}}.items():
        node = Node(name=name, pool="p", provider="local", role="worker", ssh_address="a")
        hosts[name] = Host(node=node, target=Target(name=name, host="a"), conn=ImageNode(has))  # type: ignore[arg-type]
    ctx = RunContext(cluster_name="demo", spec=None, hosts=list(hosts.values()), sessions=None)  # type: ignore[arg-type]
    loads = {}
    for name, host in hosts.items():
        if phase.needs_run(ctx, host):
            phase.run(ctx, host)
        loads[name] = [(c, s) for c, s in host.conn.calls if "inspect" not in c]  # type: ignore[attr-defined]
    assert loads["full"] == []
    assert loads["partial"] == [("docker load -q", b"saved")]
    assert sorted(loads["fresh"]) == [("docker import --change 'CMD [\"/bin/sh\"]' - x/busybox:1", b"rootfs"),
                                      ("docker load -q", b"saved")]


def test_k3s_restore_deletes_the_old_clusters_nodes() -> None:
    ctx = make_ctx(make_spec(controls=1, workers=1), remote=SnapshotRemote)
    cluster = ctx.hosts[0].conn.cluster  # type: ignore[attr-defined]
    for h in ctx.hosts:
        h.conn.running = True  # type: ignore[attr-defined]
    # The snapshot's nodes: the old machines, registered but gone (NotReady until deleted).
    for name in ("old-control-1", "old-workers-1"):
        SnapshotRemote(name, "systemd", cluster)
        cluster.stale.add(name)
    k3s.PruneOldK3sNodes().run(ctx, ctx.hosts[0])
    sent = [c for c, _ in ctx.hosts[0].conn.calls if "delete node" in c]  # type: ignore[attr-defined]
    assert sent == ["/usr/local/bin/k3s kubectl delete node old-control-1 --ignore-not-found",
                    "/usr/local/bin/k3s kubectl delete node old-workers-1 --ignore-not-found"]
    assert "old-" not in cluster.nodes_json()


class RestoringNode(SwarmManager):
    """The first manager of a restore: dockerd comes back locked (autolock), active once unlocked."""

    def __init__(self) -> None:
        super().__init__("n1", [], autolock=True)
        self.uploads: list[tuple[str, int, bytes]] = []

    def upload(self, data: bytes, dest: str, mode: int = 0o644) -> None:
        self.uploads.append((dest, mode, data))


def test_swarm_restore_with_autolock_unlocks_suspends_autolock_and_forces_a_new_cluster() -> None:
    conn = RestoringNode()
    node = Node(name="n1", pool="control", provider="local", role="control", ssh_address="192.0.2.1",
                private_address="10.213.226.2")
    host = Host(node=node, target=conn.target, conn=conn)  # type: ignore[arg-type]
    host.facts = Facts(init="systemd", os_id="debian")
    notes: list[str] = []

    class Notes:
        def note(self, message: str) -> None:
            notes.append(message)

    ctx = RunContext(cluster_name="demo", spec=None, hosts=[host], sessions=None, reporter=Notes())  # type: ignore[arg-type]
    raft = raft_tarball({"LocalAddr": "10.213.225.2", "ListenAddr": "10.213.225.2:2377", "AdvertiseAddr": "x"})
    swarm.RestoreSwarm(EngineBackup({"swarm.tar.gz": raft}, secrets={"unlock-key": "SWMKEY-1-old"})).run(ctx, host)
    [(dest, mode, sent)] = conn.uploads
    assert (dest, mode) == ("/var/lib/docker/dcx-swarm-restore.tar.gz", 0o600)
    assert sent == swarm.retarget(raft, "10.213.226.2", None) != raft
    changes = [c for c in conn.calls if not c.startswith("docker info")]
    assert changes == [
        "set -e; systemctl stop docker.socket docker",
        "set -e; rm -rf /var/lib/docker/swarm; tar xzf /var/lib/docker/dcx-swarm-restore.tar.gz -C /var/lib/docker; "
        "rm -f /var/lib/docker/dcx-swarm-restore.tar.gz",
        "set -e; systemctl enable --now docker",
        "docker swarm update --autolock=false",
        "docker swarm init --advertise-addr 10.213.226.2 --listen-addr 10.213.226.2:2377 --force-new-cluster",
        "docker swarm update --autolock=true >/dev/null",
    ]
    assert len(conn.requests) == 1 and b"POST" in conn.requests[0] and b"SWMKEY-1-old" in conn.requests[0]
    assert ctx.shared["swarm_manager"] == "n1" and any("new unlock key" in n for n in notes)
