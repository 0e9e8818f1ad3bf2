"""`dcx cluster backup NAME [-o FILE]`: one tar.gz (0600) of the control plane's state and what dcx needs to
rebuild the cluster from it (`dcx cluster create -f SPEC --restore FILE`, dcx.lifecycle.restore).

Members: `manifest.json` (kind, schema_version, cluster name and id, engine, time, source node, the SHA-256
of every other member, the recorded images), `spec.json` (the applied spec), `engine/NAME` (swarm: the raft
directory as a tar.gz; k3s: an etcd snapshot), `secrets/NAME` (swarm: the unlock key when autolock is on;
k3s: the cluster token) and `images/DIGEST.tar` (the images `dcx image` put on the nodes). The secrets are
only ever in this file: never printed, never logged.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcx import __version__
from dcx.bootstrap.engines import EngineBackup, get_engine
from dcx.bootstrap.phases import Host, RunContext, run_phases
from dcx.bootstrap.runtime import GatherFacts
from dcx.bootstrap.ssh import connect_with_retry, fan_out
from dcx.errors import OperationFailed
from dcx.lifecycle.session import Options, build_context, null_reporter, open_session, spec_stub
from dcx.log import log
from dcx.providers.base import Node
from dcx.state import StateStore, atomic_write, check_output_file, now_iso

KIND = "dcx-cluster-backup"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SPEC = "spec.json"


@dataclass
class BackupResult:
    path: Path
    engine: str
    source: str
    size: int
    seconds: float
    images: int = 0
    members: list[str] = field(default_factory=list)


def default_path(name: str) -> Path:
    return Path(f"dcx-{name}-backup-{now_iso().replace(':', '').replace('-', '')}.tar.gz")


def build_archive(manifest: dict[str, Any], members: dict[str, bytes]) -> bytes:
    """The archive's bytes: the manifest (with every member's SHA-256) first, then the members, each 0600."""
    manifest = {**manifest, "members": {name: hashlib.sha256(data).hexdigest() for name, data in members.items()}}
    buf = io.BytesIO()
    mtime = int(time.time())
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in [(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"),
                           *members.items()]:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o600, mtime
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def archive_members(state: Any, cdir: Any, engine: EngineBackup) -> tuple[dict[str, bytes], list[dict[str, Any]]]:
    """(members by name, the image records for the manifest)."""
    members = {SPEC: json.dumps(state.spec, indent=2, sort_keys=True).encode() + b"\n"}
    members.update({f"engine/{name}": data for name, data in engine.files.items()})
    members.update({f"secrets/{name}": value.encode() for name, value in engine.secrets.items()})
    images = []
    for digest, rec in sorted(state.images.items()):
        path = cdir.path / str(rec.get("file"))
        if not path.is_file():
            continue  # recorded, tarball lost: the backup goes on without it (the log says so)
        members[f"images/{digest}.tar"] = path.read_bytes()
        images.append({"digest": digest, "kind": rec.get("kind"), "refs": rec.get("refs", [])})
    return members, images


def reachable(ctx: RunContext, timeout: float) -> list[Host]:
    """The control hosts that answer over SSH (the others are logged); none is an error."""
    hosts, down = [], []
    for host, _, error in fan_out(lambda h: connect_with_retry(h.conn, timeout), ctx.hosts, ctx.parallel):
        if error is None:
            hosts.append(host)
        else:
            down.append(f"{host.name}: {getattr(error, 'message', None) or error}")
            log.warning("backup: %s does not answer over SSH (%s)", host.name, down[-1])
    if not hosts:
        raise OperationFailed("no control node answers over SSH" + (": " + "; ".join(down) if down else ""))
    return hosts


def backup_cluster(name: str, output: Path | None, options: Options, store: StateStore | None = None
                   ) -> BackupResult:
    """Copy the control plane's state from one control node (under the cluster's lock) into one archive."""
    store = store or StateStore()
    reporter = options.reporter or null_reporter()
    started = time.monotonic()
    path = output or default_path(name)
    check_output_file(path, "the backup")  # before any node is touched: a swarm backup stops dockerd
    with open_session(store, name, "backup", reporter) as session:
        state = session.state = session.cdir.load()
        spec = spec_stub(state)
        controls = [Node.from_dict(d) for d in state.nodes.values() if d.get("role") == "control"]
        ctx = build_context(session, spec, controls, options)
        try:
            ctx.hosts = reachable(ctx, options.ssh_timeout)  # one control node down does not stop a backup
            run_phases(ctx, [GatherFacts()])
            engine_backup = get_engine(state.engine).backup(ctx)
        finally:
            ctx.sessions.close()
        members, images = archive_members(state, session.cdir, engine_backup)
        manifest = {"kind": KIND, "schema_version": SCHEMA_VERSION, "cluster": name, "cluster_id": state.id,
                    "engine": state.engine, "created_at": now_iso(), "source_node": engine_backup.source,
                    "control_members": engine_backup.control_members,
                    "dcx_version": __version__, "images": images}
        data = build_archive(manifest, members)
        atomic_write(path, data, 0o600)
        log.info("backup of %s written to %s (%d bytes, from %s)", name, path, len(data), engine_backup.source)
    return BackupResult(path, state.engine, engine_backup.source, len(data), time.monotonic() - started,
                        images=len(images), members=sorted(members))
