"""Moving clusters between stores: export to one tar.gz, import from it, migrate a whole store; and
breaking a dead holder's lock."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dcx.errors import InputError
from dcx.state import (
    CLUSTER_NAME_MAX,
    CLUSTER_NAME_RE,
    ClusterDir,
    ClusterState,
    StateStore,
    atomic_write,
    check_output_file,
    ensure_private_dir,
)
from dcx.stores.lock import holder_line, read_holder
from dcx.stores.mirror import LOCK, local_only

MAX_ARCHIVE_BYTES = 256 * 1024 * 1024


def cluster_files(cdir: ClusterDir) -> dict[str, bytes]:
    """Everything of a cluster (state, keys, known_hosts, secrets, logs) by relative path, read under
    its lock. A bucket store's sealed secrets need DCX_STATE_KEY: a copy without them could not run."""
    if cdir.mirror is not None:
        for rel in sorted(cdir.mirror.sealed.get(cdir.name, set())):
            cdir.mirror.need_secret(cdir.name, rel)
    out: dict[str, bytes] = {}
    for f in sorted(cdir.path.rglob("*")) if cdir.path.is_dir() else []:
        rel = f.relative_to(cdir.path).as_posix()
        if f.is_file() and not local_only(rel):
            out[rel] = f.read_bytes()
    return out


def write_cluster_files(cdir: ClusterDir, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        target = cdir.path / rel
        ensure_private_dir(target.parent, cdir.root / "clusters")
        atomic_write(target, data, 0o600)


def export_cluster(store: StateStore, name: str, file: Path) -> int:
    """Write the cluster to `file` (tar.gz, 0600: it holds the private key in clear). Files written."""
    cdir = store.cluster(name)
    check_output_file(file.expanduser(), "the export")
    with cdir.lock("cluster export"):
        cdir.load()  # an unknown or damaged cluster says so here
        files = cluster_files(cdir)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for rel, data in files.items():
            info = tarfile.TarInfo(f"{name}/{rel}")
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
    file = file.expanduser()
    fd, tmp = tempfile.mkstemp(dir=file.parent if str(file.parent) else ".", prefix=f".{file.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(buf.getvalue())
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(files)


def read_archive(file: Path) -> tuple[str, dict[str, bytes]]:
    """(cluster name, files) of an export, or an InputError naming what is wrong with it. Only regular
    files under one cluster-named directory are taken: no links, no absolute or `..` paths."""
    where = str(file)
    try:
        info = file.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block tarfile.open, a device never end
            raise InputError(f"{where}: is not a regular file (a device, pipe or socket)")
        if info.st_size > MAX_ARCHIVE_BYTES:
            raise InputError(f"{where}: larger than {MAX_ARCHIVE_BYTES >> 20} MiB: not a dcx export")
        tar = tarfile.open(file, mode="r:gz")
    except (OSError, tarfile.TarError) as exc:
        raise InputError(f"{where}: not a readable tar.gz ({type(exc).__name__})") from None
    names: set[str] = set()
    files: dict[str, bytes] = {}
    # A truncated gzip raises EOFError, which click would turn into "interrupted" (exit 130).
    with tar, reading_tar(where):
        for m in tar.getmembers():
            parts = m.name.split("/")
            if m.isdir():
                continue
            if not m.isfile() or m.name.startswith("/") or ".." in parts or len(parts) < 2 or "" in parts:
                raise InputError(f"{where}: {m.name!r}: not a file of a dcx export")
            names.add(parts[0])
            fh = tar.extractfile(m)
            assert fh is not None
            files["/".join(parts[1:])] = fh.read()
    if len(names) != 1:
        raise InputError(f"{where}: a dcx export holds one cluster's directory (found {len(names)})")
    name = names.pop()
    if not CLUSTER_NAME_RE.match(name) or len(name) > CLUSTER_NAME_MAX:
        raise InputError(f"{where}: '{name[:40]}' is not a cluster name")
    if "state.json" not in files:
        raise InputError(f"{where}: {name}/state.json: missing: not a dcx export")
    state = ClusterState.from_json(files["state.json"].decode("utf-8", "replace"), f"{where}: {name}/state.json")
    if state.name != name:
        raise InputError(f"{where}: {name}/state.json: names cluster '{state.name[:40]}', not '{name}'")
    return name, {rel: data for rel, data in files.items() if not local_only(rel)}


@contextlib.contextmanager
def reading_tar(where: str) -> Iterator[None]:
    try:
        yield
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise InputError(f"{where}: damaged tar.gz ({type(exc).__name__}: {exc})") from None


def import_cluster(store: StateStore, file: Path) -> str:
    name, files = read_archive(file.expanduser())
    cdir = store.cluster(name)
    with cdir.lock("cluster import"):
        if cdir.exists():
            raise InputError(f"cluster '{name}' already exists in {store.url}: not overwriting it",
                             hint="destroy it first, or import into another store (--state)")
        write_cluster_files(cdir, files)
    return name


def migrate(source: StateStore, target: StateStore) -> list[tuple[str, str]]:
    """Copy every cluster of `source` to `target`: (name, what happened) each. The source is kept."""
    if source.url == target.url:
        raise InputError(f"--to: {target.url} is the store in use already")
    done: list[tuple[str, str]] = []
    for name in source.names():
        src, dst = source.cluster(name), target.cluster(name)
        with src.lock("state migrate"), dst.lock("state migrate"):
            if dst.exists():
                done.append((name, "skipped: already in the target store"))
                continue
            src.load()
            write_cluster_files(dst, cluster_files(src))
        done.append((name, "copied"))
    return done


def lock_holder(store: StateStore, name: str) -> tuple[dict[str, Any], str, str] | None:
    """(holder, etag, the line describing it) of a bucket store's lock on the cluster, or None."""
    cdir = store.cluster(name)
    if cdir.mirror is None:
        return None
    held = read_holder(cdir.mirror.backend, cdir.mirror.prefix(name) + LOCK)
    if held is None:
        return None
    return held[0], held[1], holder_line(name, held[0])


def break_lock(store: StateStore, name: str, etag: str) -> bool:
    """Delete the lock object only if it is still the one shown (If-Match): a lock taken since stays."""
    cdir = store.cluster(name)
    assert cdir.mirror is not None
    return cdir.mirror.backend.delete_if(cdir.mirror.prefix(name) + LOCK, etag)
