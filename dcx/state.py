"""Per-cluster local state: one directory per cluster, atomic JSON writes, an exclusive lock, keys.

Layout under $DCX_HOME (default: the platform's user data dir):
    clusters/NAME/state.json     versioned document (schema_version), written atomically, 0600
    clusters/NAME/lock           flock'd by the running command; lock.json names the holder
    clusters/NAME/ssh/           the cluster's ed25519 key pair (0600) and known_hosts
    clusters/NAME/logs/          one log file per run
    clusters/NAME/providers/P/   each provider's own files
Directories are 0700. The lock is an flock: it dies with its process, so a killed run never leaves
the cluster locked; lock.json is only there to name the holder in the message.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock
import platformdirs

from dcx.errors import DcxError, LockHeld

SCHEMA_VERSION = 1


def dcx_home() -> Path:
    env = os.environ.get("DCX_HOME")
    return Path(env) if env else Path(platformdirs.user_data_dir("dcx"))


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ensure_private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


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
    status: str = "new"  # new | provisioned | ready | failed | destroying
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> Node.to_dict()
    resources: dict[str, Any] = field(default_factory=dict)  # provider write-ahead journal
    host_keys: dict[str, dict[str, str]] = field(default_factory=dict)  # node -> {address, type, key}
    spec: dict[str, Any] = field(default_factory=dict)  # the last applied spec, for destroy/status by name
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> ClusterState:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DcxError(f"{where}: state file is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls(**migrate(data, where))


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

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.path = root / "clusters" / name

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def ssh_dir(self) -> Path:
        return self.path / "ssh"

    @property
    def private_key(self) -> Path:
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
        return ensure_private_dir(self.path / "providers" / provider)

    def secret_file(self, name: str) -> Path:
        return ensure_private_dir(self.path / "secrets") / name

    def exists(self) -> bool:
        return self.state_file.exists()

    def create_dirs(self) -> None:
        for d in (self.path, self.ssh_dir, self.logs_dir):
            ensure_private_dir(d)

    def load(self) -> ClusterState:
        try:
            text = self.state_file.read_text()
        except FileNotFoundError:
            raise DcxError(f"no cluster named '{self.name}' in {self.path.parent}",
                           hint="see `dcx cluster list`, or pass -f FILE") from None
        return ClusterState.from_json(text, str(self.state_file))

    def save(self, state: ClusterState) -> None:
        state.updated_at = now_iso()
        self.create_dirs()
        atomic_write(self.state_file, state.to_json())

    @contextlib.contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """Hold the cluster's exclusive lock; fail at once (exit 3) naming the holder."""
        self.create_dirs()
        info_file = self.path / "lock.json"
        lock = filelock.FileLock(str(self.path / "lock"), timeout=0)
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
        try:
            atomic_write(info_file, json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "started": now_iso(), "command": command}))
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                info_file.unlink()
            lock.release()

    def ensure_ssh_key(self) -> tuple[Path, str]:
        """The cluster's own ed25519 key pair, made on first use. Returns (private key path, public key)."""
        ensure_private_dir(self.ssh_dir)
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
        return self.private_key, self.public_key_file.read_text().strip()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class StateStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or dcx_home()

    def cluster(self, name: str) -> ClusterDir:
        return ClusterDir(self.root, name)

    def names(self) -> list[str]:
        base = self.root / "clusters"
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if (p / "state.json").exists())


def new_cluster_id() -> str:
    return secrets.token_hex(4)
