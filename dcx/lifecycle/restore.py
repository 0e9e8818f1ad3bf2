"""`dcx cluster create -f SPEC --restore FILE`: a new cluster built from a `dcx cluster backup` archive.

The archive is read and checked before anything is made (one line, exit 2, for a damaged or unknown
archive, one of the other engine, or a cluster that already has state). The cluster is then created as
usual, except that its control plane starts from the backup (swarm: the raft directory on the first
manager and `docker swarm init --force-new-cluster`; k3s: the first server reset from the etcd snapshot,
with the old token), and the images the old cluster recorded are recorded again (every node gets them
before it joins). The new cluster gets an id of its own; the state notes where it was restored from.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcx.bootstrap.engines import EngineBackup
from dcx.bootstrap.swarm import UNLOCK_KEY
from dcx.errors import InputError
from dcx.lifecycle.backup import KIND, MANIFEST, SCHEMA_VERSION, SPEC
from dcx.spec import ClusterSpec

MARKER = "restore"  # state.resources[MARKER]: {archive (SHA-256), from, from_id, taken_at, done}
MAX_MEMBER = 8 << 30  # 8 GiB: a member bigger than this is not one dcx wrote


@dataclass
class Backup:
    path: Path
    sha256: str
    manifest: dict[str, Any]
    spec: dict[str, Any]
    engine: EngineBackup
    images: list[tuple[str, list[str], bytes]] = field(default_factory=list)  # (kind, refs, tarball)

    @property
    def engine_type(self) -> str:
        return str(self.manifest.get("engine", ""))


def _bad(path: Path, why: str) -> InputError:
    return InputError(f"{path}: {why}", hint="give an archive written by `dcx cluster backup`")


def read_members(path: Path) -> tuple[bytes, dict[str, bytes]]:
    """(the archive's bytes, its regular-file members by name). Nothing is written to disk."""
    try:
        # O_NONBLOCK and a regular-file check first: a FIFO or /dev/zero would otherwise hang or fill memory.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _bad(path, "is not a regular file (a device, pipe or socket)")
            raw = fh.read()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the backup ({exc.strerror})") from None
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
            for info in tar:
                if not info.isfile() or info.name.startswith("/") or ".." in info.name.split("/"):
                    raise _bad(path, f"damaged backup (unexpected member {info.name!r})")
                if info.size > MAX_MEMBER:
                    raise _bad(path, f"damaged backup (member {info.name!r} is {info.size} bytes)")
                fh = tar.extractfile(info)
                members[info.name] = fh.read() if fh is not None else b""
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise _bad(path, f"damaged or not a backup archive ({type(exc).__name__}: {exc})") from None
    return raw, members


def read_archive(path: Path) -> Backup:
    """The archive, checked: its kind, a schema_version this dcx reads, every member's SHA-256."""
    raw, members = read_members(path)
    if MANIFEST not in members:
        raise _bad(path, f"not a dcx backup (no {MANIFEST})")
    try:
        manifest = json.loads(members[MANIFEST])
    except ValueError:
        raise _bad(path, f"damaged backup ({MANIFEST} is not JSON)") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise _bad(path, f"not a dcx backup ({MANIFEST} kind is not {KIND})")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise InputError(f"{path}: backup schema_version {version!r} is not one this dcx reads ({SCHEMA_VERSION})",
                         hint="restore it with the dcx version that wrote it" if isinstance(version, int) else None)
    listed = manifest.get("members")
    if not isinstance(listed, dict) or manifest.get("engine") not in ("swarm", "k3s"):
        raise _bad(path, f"damaged backup ({MANIFEST} lacks members or engine)")
    for name, digest in listed.items():
        if name not in members:
            raise _bad(path, f"damaged backup ({name} is missing)")
        if hashlib.sha256(members[name]).hexdigest() != digest:
            raise _bad(path, f"damaged backup ({name} does not match its SHA-256)")
    extra = sorted(set(members) - set(listed) - {MANIFEST})
    if extra:
        raise _bad(path, f"damaged backup (members not in the manifest: {', '.join(extra)})")
    try:
        spec = json.loads(members.get(SPEC, b"{}"))
        secrets = {n.split("/", 1)[1]: members[n].decode() for n in listed if n.startswith("secrets/")}
    except (ValueError, UnicodeDecodeError):
        raise _bad(path, f"damaged backup ({SPEC} or a secret is unreadable)") from None
    members_then = manifest.get("control_members", 0)
    engine = EngineBackup({n.split("/", 1)[1]: members[n] for n in listed if n.startswith("engine/")},
                          source=str(manifest.get("source_node", "")), secrets=secrets,
                          control_members=members_then if isinstance(members_then, int) else 0)
    if not engine.files:
        raise _bad(path, "damaged backup (no engine state in it)")
    images = []
    for rec in manifest.get("images") or []:
        member = f"images/{rec.get('digest')}.tar"
        if member not in members or rec.get("kind") not in ("import", "load") or not rec.get("refs"):
            raise _bad(path, f"damaged backup (image record {rec.get('digest')!r})")
        images.append((str(rec["kind"]), [str(r) for r in rec["refs"]], members[member]))
    return Backup(path, hashlib.sha256(raw).hexdigest(), manifest, spec if isinstance(spec, dict) else {}, engine,
                  images)


def load(path: str | Path, spec: ClusterSpec) -> Backup:
    """Read the archive and check it fits the spec (same engine), before anything changes."""
    backup = read_archive(Path(path))
    want = spec.spec.engine.type
    if backup.engine_type == "swarm" and UNLOCK_KEY in backup.engine.secrets and backup.engine.control_members > 1:
        raise InputError(f"{path}: the backup's swarm had autolock on and {backup.engine.control_members} managers: "
                         "a restored manager could not be unlocked without their quorum",
                         hint="take the backup with autolock off (`docker swarm update --autolock=false`)")
    if backup.engine_type != want:
        raise InputError(f"{path}: a backup of a {backup.engine_type} cluster cannot be restored into the {want} "
                         f"cluster of {spec.file or 'the spec'}",
                         hint=f"set spec.engine.type to {backup.engine_type}, or give a {want} backup")
    return backup


def refuse_existing(session: Any, backup: Backup) -> None:
    """A restore builds a new cluster: a cluster of that name that already has nodes is refused, unless it is
    this very restore not yet finished (a re-run resumes it)."""
    if not session.cdir.exists():
        return
    state = session.cdir.load()
    marker = state.resources.get(MARKER) or {}
    resuming = marker.get("archive") == backup.sha256 and not marker.get("done")
    if state.nodes and not resuming:
        raise InputError(f"cluster {state.name} already has state ({len(state.nodes)} nodes): a restore builds a new "
                         "cluster", hint=f"destroy it first (`dcx cluster destroy {state.name}`) or restore under "
                         "another metadata.name")


def begin(session: Any, backup: Backup) -> None:
    """Note the restore in the state (a re-run resumes it) and record the backup's images for the new nodes."""
    from dcx.images import add_image

    state = session.state
    if not (state.resources.get(MARKER) or {}).get("archive") == backup.sha256:
        state.resources[MARKER] = {"archive": backup.sha256, "from": backup.manifest.get("cluster"),
                                   "from_id": backup.manifest.get("cluster_id"),
                                   "taken_at": backup.manifest.get("created_at"), "done": False}
    for kind, refs, data in backup.images:
        add_image(session.cdir, state, kind, data, refs)
    session.save()
    session.reporter.note(f"restoring {backup.engine_type} cluster {backup.manifest.get('cluster')} (backup of "
                          f"{backup.manifest.get('created_at')} from {backup.engine.source or 'a control node'}"
                          + (f", {len(backup.images)} image(s)" if backup.images else "") + ")")


def finish(session: Any) -> None:
    marker = session.state.resources.get(MARKER)
    if marker and not marker.get("done"):
        marker["done"] = True
        session.save()
