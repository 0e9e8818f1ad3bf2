"""Per-cluster local state: one directory per cluster, atomic JSON writes, an exclusive lock, keys.

Layout under $DCX_HOME (default: the platform's user data dir):
    clusters/NAME/state.json     versioned document (schema_version), written atomically, 0600
    clusters/NAME/lock           flock'd by the running command; lock.json names the holder
    clusters/NAME/ssh/           the cluster's ed25519 key pair (0600) and known_hosts
    clusters/NAME/logs/          one log file per run
    clusters/NAME/providers/P/   each provider's own files
Directories are 0700. The lock is an flock: it dies with its process, so a killed run never leaves
the cluster locked; lock.json is only there to name the holder in the message.

With a bucket store (`--state s3://...`, dcx.stores) the same layout lives in a private working
directory under DCX_HOME/cache/, mirrored to the bucket: the bucket's lock object is taken first, the
cluster's objects are pulled, and every save and the end of the command push what changed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import secrets
import socket
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock
import platformdirs

from dcx.errors import DcxError, InputError, LockHeld, read_problem

SCHEMA_VERSION = 1
# Cluster names become directory names, hostnames and cloud resource names: checked (as the spec's
# metadata.name) before any path is made from them.
CLUSTER_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
CLUSTER_NAME_MAX = 24


def check_cluster_name(name: str) -> str:
    """The name, or an InputError (exit 2) when it could not be a cluster's: never a path."""
    if not CLUSTER_NAME_RE.match(name) or len(name) > CLUSTER_NAME_MAX:
        shown = name if len(name) <= 40 and name.isprintable() else repr(name[:40]) + "..."
        raise InputError(f"'{shown}' is not a cluster name: use up to {CLUSTER_NAME_MAX} lowercase letters, "
                         "digits and '-', starting with a letter")
    return name


class UnknownCluster(InputError):
    """A cluster name with no state here: the user's input (exit 2), as the README promises."""


class DamagedState(DcxError):
    """A state file that cannot be read as a cluster's state; the message says what to do."""


def dcx_home() -> Path:
    env = os.environ.get("DCX_HOME")
    return Path(env) if env else Path(platformdirs.user_data_dir("dcx"))


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ensure_private_dir(path: Path, private_from: Path | None = None) -> Path:
    """Make `path` a 0700 directory. Missing parents are made 0700 too (mkdir's own parents would be
    0755); existing ones are left as they are, except those at or below `private_from` (dcx's own)."""
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)
        os.chmod(d, 0o700)
    os.chmod(path, 0o700)
    if private_from is not None and private_from in path.parents:
        for d in path.parents:
            os.chmod(d, 0o700)
            if d == private_from:
                break
    return path


def check_output_file(path: Path, what: str) -> None:
    """A file the user named for an archive (-o FILE) can be written by atomic_write, or an InputError saying
    why not, before any work. An existing regular file is replaced atomically (as `docker save -o` does: the
    old one stays whole until the new one is complete); a device, pipe or socket is refused, since the
    rename would replace it (as root, `/dev/null` itself)."""
    parent = path.parent if str(path.parent) else Path(".")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise InputError(f"{path}: cannot write {what} there ({exc.strerror})") from None
    if mode is not None and not stat.S_ISREG(mode):
        raise InputError(f"{path}: is not a regular file: give a new file name for {what}")
    if not parent.is_dir():
        raise InputError(f"{path}: directory {parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise InputError(f"{path}: cannot write {what} there ({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def atomic_write(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    """Write via a temp file in the same directory, fsync, then rename: readers see old or new."""
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass
class ClusterState:
    """The recorded facts about one cluster. Anything that can be re-read from hosts is not here."""

    name: str
    id: str
    engine: str = "swarm"
    spec_file: str = ""
    created_at: str = field(default_factory=now_iso)
    updated_at: str = field(default_factory=now_iso)
    status: str = "new"  # new | provisioned | ready | failed | destroying | destroy-failed
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> Node.to_dict()
    resources: dict[str, Any] = field(default_factory=dict)  # provider write-ahead journal
    host_keys: dict[str, dict[str, str]] = field(default_factory=dict)  # node -> {address, type, key}
    spec: dict[str, Any] = field(default_factory=dict)  # the last applied spec, for destroy/status by name
    # Images put on the nodes (`dcx image import|load`), by tarball SHA-256: {kind, refs, file}; nodes that
    # join later get them (dcx.images). The tarballs are kept in the cluster directory (images/, 0600).
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> ClusterState:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DcxError(f"{where}: state file is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        problem = shape_problem(data)
        if problem:
            raise DcxError(f"{where}: {problem}")
        return cls(**migrate(data, where))


# What each field of a state document must be; a document that is not this was not written by dcx.
_SHAPE: dict[str, type | tuple[type, ...]] = {
    "name": str, "id": str, "engine": str, "spec_file": str, "created_at": str, "updated_at": str,
    "status": str, "nodes": dict, "resources": dict, "host_keys": dict, "spec": dict, "schema_version": int,
    "images": dict,
}


def shape_problem(data: Any) -> str:
    """Why `data` is not a state document, or "" when it is one."""
    if not isinstance(data, dict):
        return f"state is a JSON {type(data).__name__.replace('dict', 'object')}, not an object"
    for key in ("name", "id"):
        if key not in data:
            return f"state has no '{key}'"
    for key, kind in _SHAPE.items():
        if key in data and (not isinstance(data[key], kind) or isinstance(data[key], bool)):
            return f"state field '{key}' has the wrong type"
    for key in ("nodes", "host_keys"):
        for name, value in data.get(key, {}).items():
            if not isinstance(value, dict):
                return f"state field '{key}.{name}' has the wrong type"
    for name, node in data.get("nodes", {}).items():
        for field_name in ("name", "pool", "provider", "role", "ssh_address"):
            if not isinstance(node.get(field_name), str):
                return f"state field 'nodes.{name}.{field_name}' is missing or has the wrong type"
    return ""


def migrate(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Bring an older state document up to SCHEMA_VERSION (none yet: version 1 is the first)."""
    version = data.get("schema_version", 1)
    if version > SCHEMA_VERSION:
        raise DcxError(
            f"{where}: state schema_version {version} is newer than this dcx understands "
            f"({SCHEMA_VERSION})",
            hint="upgrade dcx",
        )
    known = set(ClusterState.__dataclass_fields__)
    return {k: v for k, v in data.items() if k in known}


class ClusterDir:
    """One cluster's directory and everything in it."""

    def __init__(self, root: Path, name: str, mirror: Any = None) -> None:
        self.name = check_cluster_name(name)
        self.root = root
        self.path = root / "clusters" / name
        self.mirror = mirror  # dcx.stores.mirror.Mirror of a bucket store, else None
        self._held = False  # this run holds the cluster's lock (through this object)
        self._removed = False  # remove() ran under the lock: the directory goes when the lock is released

    def _pulled(self) -> None:
        """A bucket store's objects of this cluster, downloaded once per run (a locked run pulls again)."""
        if self.mirror is not None:
            self.mirror.pull_once(self.name, self.path)

    def _need_secret(self, rel: str) -> None:
        if self.mirror is not None:
            self._pulled()
            self.mirror.need_secret(self.name, rel)

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def ssh_dir(self) -> Path:
        return self.path / "ssh"

    @property
    def private_key(self) -> Path:
        self._need_secret("ssh/id_ed25519")  # a bucket store without DCX_STATE_KEY: one line, exit 2
        return self.ssh_dir / "id_ed25519"

    @property
    def public_key_file(self) -> Path:
        return self.ssh_dir / "id_ed25519.pub"

    @property
    def known_hosts(self) -> Path:
        return self.ssh_dir / "known_hosts"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    def provider_dir(self, provider: str) -> Path:
        if self.mirror is not None:
            # A bucket store's clusters keep provider files on this machine, never in the bucket: they are
            # machines' own disks (the local provider's nodes), not state. One place per store and name,
            # whatever DCX_HOME a run uses, so another runner here finds the same nodes.
            path = self.mirror.machine_root / self.name / provider
            return ensure_private_dir(path, self.mirror.machine_root) if self.path.is_dir() else path
        path = self.path / "providers" / provider
        # Planning a cluster that does not exist yet writes nothing: the directory comes with the state.
        return ensure_private_dir(path, self.root / "clusters") if self.path.is_dir() else path

    def secret_file(self, name: str) -> Path:
        self._need_secret(f"secrets/{name}")
        return ensure_private_dir(self.path / "secrets") / name

    def exists(self) -> bool:
        self._pulled()
        return self.state_file.exists()

    def create_dirs(self) -> None:
        for d in (self.path, self.ssh_dir, self.logs_dir):
            ensure_private_dir(d, self.root / "clusters")

    def load(self) -> ClusterState:
        self._pulled()
        try:
            text = self.state_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UnknownCluster(f"no cluster named '{self.name}' in {self.path.parent} "
                                 "(see `dcx cluster list`)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise self.damaged(read_problem(exc)) from None
        try:
            return ClusterState.from_json(text, str(self.state_file))
        except DcxError as exc:
            if exc.message.startswith(f"{self.state_file}: state schema_version"):
                raise
            raise self.damaged(exc.message.removeprefix(f"{self.state_file}: ")) from None

    def damaged(self, problem: str) -> DamagedState:
        """One line: which file, what is wrong, and the two ways out."""
        return DamagedState(f"{self.state_file}: {problem}; the cluster's state is damaged: remove the cluster "
                            f"with `dcx cluster destroy -f SPEC` (it works from the spec alone), "
                            f"or move {self.path} aside")

    def damage(self) -> str:
        """Why the state cannot be read ("" when it can, or when there is none)."""
        try:
            self.load()
        except DamagedState as exc:
            return exc.message
        except DcxError:  # no state, or one from a newer dcx: not damage
            return ""
        return ""

    def set_aside_if_damaged(self) -> Path | None:
        """A destroy from the spec must not depend on a damaged state: move it aside (kept, for the
        curious) and return where it went; None when the state is readable or absent."""
        if not self.damage():
            return None
        aside = self.path / f"state.json.damaged-{now_iso().replace(':', '')}"
        os.replace(self.state_file, aside)
        return aside

    def save(self, state: ClusterState) -> None:
        state.updated_at = now_iso()
        self.create_dirs()
        atomic_write(self.state_file, state.to_json())
        if self.mirror is not None:
            self.mirror.push(self.name, self.path)

    @contextlib.contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """Hold the cluster's exclusive lock; fail at once (exit 3) naming the holder. A command that
        ends without having written state (an unknown name, input refused) leaves no directory behind."""
        remote = (self.mirror.locked(self.name, self.path, command) if self.mirror is not None
                  else contextlib.nullcontext())
        with remote:  # a bucket store: its lock first, then its objects pulled; pushed when done
            made = ([d for d in reversed(self.path.parents) if not d.exists()]
                    + ([] if self.path.exists() else [self.path]))
            self.create_dirs()
            try:
                with self._locked(command):
                    yield
            finally:
                if self._removed:  # still inside a bucket store's lock: no other run takes it before
                    self._remove_local()
                elif self.path in made and not self.state_file.exists() and self.path.is_dir():
                    import shutil

                    shutil.rmtree(self.path, ignore_errors=True)
                    for d in reversed(made[:-1]):  # DCX_HOME, clusters/ (...) when this made them, if still empty
                        with contextlib.suppress(OSError):
                            d.rmdir()

    def remove(self) -> None:
        """The cluster is gone: its state (a bucket store's objects) and its directory. Called by the
        holder of the cluster's lock (destroy), the objects go at once and the directory when the lock
        is released, so the removal and the release are one locked sequence: no other run can take the
        lock in between. Called without the lock, it takes it for that."""
        held = self._held or (self.mirror is not None and self.name in self.mirror.locks)
        if not held:
            if self.mirror is None:
                self._remove_local()
                return
            with self.lock("destroy (removing state)"):
                self.remove()
            return
        if self.mirror is not None:
            self.mirror.remove_objects(self.name)
        self._removed = True

    def _remove_local(self) -> None:
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)
        if self.mirror is not None:
            shutil.rmtree(self.mirror.machine_root / self.name, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.mirror.machine_root.rmdir()  # the store's, when no cluster of it is left here

    @contextlib.contextmanager
    def _locked(self, command: str) -> Iterator[None]:
        info_file = self.path / "lock.json"
        from dcx.stores.lock import lock_timeout

        lock = filelock.FileLock(str(self.path / "lock"), timeout=lock_timeout(), mode=0o600)
        try:
            lock.acquire()
        except filelock.Timeout:
            holder = _read_json(info_file)
            who = f"PID {holder.get('pid', '?')} on {holder.get('host', '?')}" if holder else "another process"
            since = f" since {holder['started']}" if holder.get("started") else ""
            cmd = f" ({holder['command']})" if holder.get("command") else ""
            raise LockHeld(
                f"cluster '{self.name}' is locked by {who}{cmd}{since}",
                hint="wait for it to finish; the lock is released when that process exits",
            ) from None
        self._held = True
        try:
            atomic_write(info_file, json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "started": now_iso(), "command": command}))
            yield
        finally:
            self._held = False
            with contextlib.suppress(FileNotFoundError):
                info_file.unlink()
            lock.release()

    def ensure_ssh_key(self) -> tuple[Path, str]:
        """The cluster's own ed25519 key pair, made on first use. Returns (private key path, public key)."""
        ensure_private_dir(self.ssh_dir, self.root / "clusters")
        if self.private_key.exists() and not self.public_key_file.exists():
            self._restore_public_key()
        if not self.private_key.exists():
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            key = Ed25519PrivateKey.generate()
            private = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
            public = key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
            atomic_write(self.private_key, private, 0o600)
            atomic_write(self.public_key_file, f"{public} dcx-{self.name}\n", 0o600)
        try:
            return self.private_key, self.public_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise DamagedState(f"{self.public_key_file}: {read_problem(exc)}; delete it and dcx derives it "
                               f"again from {self.private_key}") from None

    def _restore_public_key(self) -> None:
        """A lost public key file is derived again from the private key (which is what matters)."""
        from cryptography.hazmat.primitives import serialization

        try:
            key = serialization.load_ssh_private_key(self.private_key.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise DamagedState(f"{self.private_key}: not an unencrypted OpenSSH private key ({read_problem(exc)}); "
                               f"the cluster's nodes cannot be reached with it: remove the cluster with "
                               f"`dcx cluster destroy -f SPEC`, or move {self.path} aside") from None
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        atomic_write(self.public_key_file, f"{public.decode()} dcx-{self.name}\n", 0o600)




def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class StateStore:
    """Where clusters' state lives: `root` when given, else --state/DCX_STATE (a directory, or a bucket
    mirrored through DCX_HOME/cache/), else DCX_HOME."""

    def __init__(self, root: Path | None = None, url: str | None = None) -> None:
        from dcx.stores import is_remote, open_mirror, parse_url, state_url

        url = state_url() if url is None and root is None else (url or "")
        self.mirror: Any = None
        if url and is_remote(url):
            self.mirror = open_mirror(url, dcx_home())
            root = self.mirror.cache_root
        elif url:
            root = Path(parse_url(url).path)
        self.root = root or dcx_home()
        self.url = url or str(self.root)

    def cluster(self, name: str) -> ClusterDir:
        return ClusterDir(self.root, name, self.mirror)

    def names(self) -> list[str]:
        """Clusters with a state file here (readable or not). Entries that could not be dcx's (names a
        cluster cannot have) are not listed."""
        if self.mirror is not None:
            return [n for n in self.mirror.names() if CLUSTER_NAME_RE.match(n) and len(n) <= CLUSTER_NAME_MAX]
        base = self.root / "clusters"
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir()
                      if CLUSTER_NAME_RE.match(p.name) and len(p.name) <= CLUSTER_NAME_MAX
                      and (p / "state.json").exists())

    def others_writable(self) -> str:
        """Why files under this DCX_HOME could be someone else's doing ("" when only we can write there)."""
        for path in (self.root, self.root / "clusters"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                return f"{path} is writable by other users"
            if st.st_uid != os.getuid():
                return f"{path} belongs to another user"
        return ""


def new_cluster_id() -> str:
    return secrets.token_hex(4)
