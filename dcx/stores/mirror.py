"""A bucket store seen as a directory: one cluster's objects mirrored into a private working
directory (0700, under DCX_HOME/cache/) for the length of one command.

- pull: the cluster's objects are downloaded (sealed secrets opened with DCX_STATE_KEY; without it they
  are left out and asking for them says so), local files the store no longer has are removed;
- push (on every state save and at the end of a locked command): changed files are uploaded, each as
  one whole object, state.json last (it may name the others), vanished files deleted;
- the lock object (lock.json in the cluster's prefix) is held around it all (lock.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

from dcx.errors import DcxError, InputError
from dcx.stores.backend import Backend
from dcx.stores.crypto import Sealer, is_secret, sealer_from_env
from dcx.stores.lock import RemoteLock

LOCK = "lock.json"
STATE = "state.json"


def local_only(rel: str) -> bool:
    """The local flock, its holder note, atomic_write's temp files and the ssh config dcx writes for this
    machine (it names this machine's paths; each run writes its own) never go to the store."""
    base = rel.rsplit("/", 1)[-1]
    return rel in ("lock", LOCK, "ssh/config") or (base.startswith(".") and base.endswith(".tmp"))


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Mirror:
    def __init__(self, backend: Backend, cache_root: Path, machine_root: Path) -> None:
        self.backend = backend
        self.url = backend.url
        self.cache_root = cache_root
        self.machine_root = machine_root
        self.pulled: set[str] = set()
        self.sealed: dict[str, set[str]] = {}  # cluster -> secrets left out (no DCX_STATE_KEY)
        self.digests: dict[str, dict[str, str]] = {}  # cluster -> rel -> sha256 of what the store has
        self.locks: dict[str, RemoteLock] = {}
        self._sealer: Sealer | None = None
        self._push_mutex = threading.Lock()

    @property
    def sealer(self) -> Sealer | None:
        if self._sealer is None:
            self._sealer = sealer_from_env()
        return self._sealer

    def prefix(self, name: str) -> str:
        return f"clusters/{name}/"

    def names(self) -> list[str]:
        return sorted({k.split("/")[1] for k in self.backend.list("clusters/")
                       if k.count("/") == 2 and k.endswith(f"/{STATE}")})

    def need_secret(self, name: str, rel: str) -> None:
        """One line, exit 2, when a command needs a secret this run cannot open or seal."""
        if self.sealer is not None:
            return
        what = "the cluster's SSH key" if rel.startswith("ssh/") else f"the cluster's secret {rel}"
        state = "is sealed" if rel in self.sealed.get(name, set()) else "must be sealed"
        raise InputError(f"{what} {state} in {self.url}: set DCX_STATE_KEY (the key the cluster was made with)")

    # pull ----------------------------------------------------------------------------------------

    def pull(self, name: str, path: Path) -> None:
        from dcx.state import atomic_write, ensure_private_dir

        prefix = self.prefix(name)
        keys = [k for k in self.backend.list(prefix) if not local_only(k[len(prefix):])]
        have: dict[str, str] = {}
        sealed: set[str] = set()
        wanted: set[str] = set()
        for key in keys:
            rel = key[len(prefix):]
            if not rel or rel.endswith("/") or ".." in rel.split("/"):
                continue
            if is_secret(rel) and self.sealer is None:
                sealed.add(rel)  # left out: asking for it says DCX_STATE_KEY is needed
                continue
            got = self.backend.get(key)
            if got is None:
                continue  # deleted since listed
            data = got[0]
            if is_secret(rel):
                assert self.sealer is not None
                data = self.sealer.open(rel, data, f"{self.url}/{key}")
            target = path / rel
            ensure_private_dir(target.parent, self.cache_root)
            atomic_write(target, data, 0o600)
            have[rel] = _digest(data)
            wanted.add(rel)
        if path.is_dir():
            for f in path.rglob("*"):
                rel = f.relative_to(path).as_posix()
                if f.is_file() and rel not in wanted and not local_only(rel):
                    f.unlink()
        self.digests[name] = have
        self.sealed[name] = sealed
        self.pulled.add(name)

    def pull_once(self, name: str, path: Path) -> None:
        if name not in self.pulled:
            self.pull(name, path)

    # push ----------------------------------------------------------------------------------------

    def push(self, name: str, path: Path) -> None:
        lock = self.locks.get(name)
        if lock is None:
            return  # only the holder of the lock writes to the store
        if lock.lost:
            raise DcxError(f"the lock on cluster '{name}' in {self.url} was broken (`dcx cluster unlock`) while "
                           "this run held it: not writing its state there")
        with self._push_mutex:
            self._push(name, path)

    def _push(self, name: str, path: Path) -> None:
        prefix = self.prefix(name)
        had = self.digests.setdefault(name, {})
        local: dict[str, bytes] = {}
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                rel = f.relative_to(path).as_posix()
                if f.is_file() and not local_only(rel):
                    with contextlib.suppress(FileNotFoundError):
                        local[rel] = f.read_bytes()
        if STATE not in local and STATE in had:  # destroyed: the cluster leaves the store
            self.remove_objects(name)
            return
        for rel in sorted(local, key=lambda r: r == STATE):  # state.json last
            data = local[rel]
            if had.get(rel) == _digest(data):
                continue
            body = data
            if is_secret(rel):
                self.need_secret(name, rel)
                assert self.sealer is not None
                body = self.sealer.seal(rel, data)
            self.backend.put(prefix + rel, body)
            had[rel] = _digest(data)
        for rel in [r for r in had if r not in local and r not in self.sealed.get(name, set())]:
            self.backend.delete(prefix + rel)
            del had[rel]

    def remove_objects(self, name: str) -> None:
        """Every object of the cluster but its lock (released by its holder)."""
        prefix = self.prefix(name)
        for key in self.backend.list(prefix):
            if key != prefix + LOCK:
                self.backend.delete(key)
        self.digests[name] = {}
        self.sealed[name] = set()

    # lock ----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, name: str, path: Path, command: str) -> Iterator[None]:
        """Hold the cluster's lock in the store; its objects are pulled first and pushed at the end."""
        if name in self.locks:  # nested (a command that locks twice): the outer hold covers it
            yield
            return
        lock = RemoteLock(self.backend, self.prefix(name) + LOCK, name, command)
        lock.acquire()
        self.locks[name] = lock
        try:
            self.pull(name, path)
            yield
            self.push(name, path)
        except BaseException:
            with contextlib.suppress(DcxError):
                self.push(name, path)  # write-ahead state of a failed run is what the next run resumes from
            raise
        finally:
            del self.locks[name]
            lock.release()

