"""A bucket store seen as a directory: one cluster's objects mirrored into a private working
directory (0700, under DCX_HOME/cache/) for the length of one command.

- pull: the cluster's objects are downloaded (sealed secrets opened with DCX_STATE_KEY; without it they
  are left out and asking for them says so), local files the store no longer has are removed;
- push (on every state save and at the end of a locked command): changed files are uploaded, each as
  one whole object, state.json last (it may name the others), vanished files deleted;
- the lock object (lock.json in the cluster's prefix) is held around it all (lock.py).

Host keys learned by read-only commands (status, node run, diagnose, image load: trust on first use,
no lock, so that they work while a `create` holds it; `node ssh` runs OpenSSH, which learns none) are
shared without the lock and without racing its holder: each is written as its own object,
host-keys/NODE.json, with a conditional create (the store's create-if-absent, as the lock): the first
key seen for a node wins, a later run that is shown another key for it refuses the connection. Every
pull merges these objects into the state it reads, so the next run checks the node against that key
instead of trusting again; the next locked run folds them into state.json and deletes them (after
state.json is written: a key is never in neither place).
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from dcx.errors import DcxError, HostKeyMismatch, InputError
from dcx.stores.backend import Backend
from dcx.stores.crypto import Sealers, is_secret, sealer_from_env
from dcx.stores.lock import RemoteLock

LOCK = "lock.json"
STATE = "state.json"
HOST_KEYS = "host-keys/"  # host keys learned by read-only runs, one object per node (see above)

log = logging.getLogger(__name__)


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
        # Held clusters whose pull under the lock completed: only their working copy may be pushed (one
        # half pulled holds files older than the store's, which a push would write over newer ones).
        self.synced: set[str] = set()
        self.shared: dict[str, dict[str, dict[str, str]]] = {}  # cluster -> host keys the store has
        self.pending: dict[str, list[str]] = {}  # cluster -> host-keys/ objects merged at the last pull
        self.conflicts: dict[str, list[str]] = {}  # cluster -> host-keys/ objects that disagree with state
        self._sealer: Sealers | None = None
        self._push_mutex = threading.Lock()

    @property
    def sealer(self) -> Sealers | None:
        if self._sealer is None:
            self._sealer = sealer_from_env(self.url.split("://", 1)[0])
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
        keys = "DCX_STATE_KEY or DCX_STATE_KMS_KEY" if self.url.startswith("s3://") else "DCX_STATE_KEY"
        raise InputError(f"{what} {state} in {self.url}: set {keys} (the key the cluster was made with)")

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
        self._merge_host_keys(name, path, sorted(r for r in wanted if r.startswith(HOST_KEYS)))
        self.pulled.add(name)

    def pull_once(self, name: str, path: Path) -> None:
        if name not in self.pulled:
            self.pull(name, path)

    # push ----------------------------------------------------------------------------------------

    def push(self, name: str, path: Path) -> None:
        with self._push_mutex:  # (checked inside: a lock given up by another thread stops every push)
            lock = self.locks.get(name)
            if lock is None:  # only the holder of the lock writes state; read-only runs share host keys
                self._share_host_keys(name, path)
                return
            if lock.lost:
                raise DcxError(f"the lock on cluster '{name}' in {self.url} was broken (`dcx cluster unlock`) "
                               "while this run held it: not writing its state there")
            if name in self.synced:
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

    # host keys learned without the lock ------------------------------------------------------------

    def _merge_host_keys(self, name: str, path: Path, rels: list[str]) -> None:
        """Fold the pulled host-keys/ objects into the local state.json (this run's view of the cluster):
        a node's key there stays; one that disagrees with it is a conflict, reported by the next locked run."""
        from dcx.state import atomic_write

        self.pending[name], self.conflicts[name] = rels, []
        state = _read_json(path / STATE)
        keys = state.get("host_keys") if state else None
        if not isinstance(keys, dict):
            self.shared[name] = {}
            return
        changed = False
        for rel in rels:
            entry = _read_json(path / rel) or {}
            node = urllib.parse.unquote(rel[len(HOST_KEYS):].removesuffix(".json"))
            if entry.get("node") != node or not all(isinstance(entry.get(k), str) for k in ("type", "key")):
                self.conflicts[name].append(f"{rel}: not a host key entry (ignored)")
                continue
            known = keys.get(node)
            if not isinstance(known, dict):
                keys[node] = {"address": str(entry.get("address", "")), "type": entry["type"], "key": entry["key"]}
                changed = True
            elif (known.get("type"), known.get("key")) != (entry["type"], entry["key"]):
                self.conflicts[name].append(
                    f"host key of {node} seen by {entry.get('seen_by', '?')} at {entry.get('seen_at', '?')} "
                    f"({entry['type']}) differs from the one recorded: kept the recorded one")
        if changed:
            atomic_write(path / STATE, json.dumps(state, indent=2, sort_keys=True) + "\n")
        self.shared[name] = {n: dict(k) for n, k in keys.items() if isinstance(k, dict)}

    def _share_host_keys(self, name: str, path: Path) -> None:
        """A read-only run saved host keys it learned: each new one goes to the store as host-keys/NODE.json,
        created only if absent (never overwritten, no lock needed). A key the store already has for the
        node (in state.json or such an object) that differs refuses the connection (HostKeyMismatch)."""
        keys = (_read_json(path / STATE) or {}).get("host_keys")
        known = self.shared.setdefault(name, {})
        new = {n: k for n, k in (keys if isinstance(keys, dict) else {}).items()
               if n not in known and isinstance(k, dict)}
        if not new:
            return
        for node, key in sorted(new.items()):
            recorded = self._record_host_key(name, node, key)
            if recorded is not None and (recorded.get("type"), recorded.get("key")) != (key.get("type"),
                                                                                       key.get("key")):
                raise HostKeyMismatch(
                    f"host key of {node}: another run recorded a {recorded.get('type')} key for it in {self.url}, "
                    f"which differs from the {key.get('type')} key now presented; refusing to connect",
                    hint=f"if the machine was rebuilt on purpose, run `dcx node forget-key {name} {node}` and "
                    "retry; otherwise something may be intercepting the connection")
            known[node] = dict(key)
            log.info("%s: host key shared in %s (first use)", node, self.url)

    def _record_host_key(self, name: str, node: str, key: dict) -> dict | None:
        """The key the store already holds for the node (state.json, or its host-keys/ object), or None
        when this run's key is now the one recorded (created if absent: never overwritten)."""
        prefix = self.prefix(name)
        obj = prefix + HOST_KEYS + urllib.parse.quote(node, safe="") + ".json"
        entry = {"node": node, "address": key.get("address", ""), "type": key.get("type", ""),
                 "key": key.get("key", ""), "seen_by": f"{getpass.getuser()}@{socket.gethostname()}",
                 "seen_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for _ in range(3):
            got = self.backend.get(prefix + STATE)  # written by a locked run since this one pulled?
            keys = ((_loads(got[0]) or {}).get("host_keys") if got else None) or {}
            recorded = keys.get(node) if isinstance(keys, dict) else None
            if isinstance(recorded, dict):
                return recorded
            if self.backend.create(obj, json.dumps(entry, indent=2).encode()) is not None:
                return None
            other = self.backend.get(obj)  # another run recorded this node first: its key stands
            if other is not None:
                return _loads(other[0]) or {}
            # gone between the two: a locked run folded it into state.json just now: read that again
        raise DcxError(f"state store {self.url}: the host key of {node} kept changing while being recorded")

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
            for problem in self.conflicts.get(name, []):
                log.warning("cluster %s: %s", name, problem)
            for rel in self.pending.get(name, []):  # folded into state.json: deleted after it is written
                (path / rel).unlink(missing_ok=True)
            self.synced.add(name)
            yield
            self.push(name, path)
        except BaseException:
            with contextlib.suppress(DcxError):
                self.push(name, path)  # write-ahead state of a failed run is what the next run resumes from
            raise
        finally:
            self.synced.discard(name)
            self.locks.pop(name, None)  # (gone already when --timeout gave it up)
            lock.release()

    def give_up(self, patience: float = 20.0) -> list[str]:
        """The command is being ended (--timeout): each held cluster's files as saved go to the store, then
        its lock is released; pushes after this write nothing more. The clusters left locked."""
        if not self._push_mutex.acquire(timeout=patience):  # a push under way that does not end
            return sorted(self.locks)
        try:
            left = []
            for name, lock in list(self.locks.items()):
                if not lock.lost and name in self.synced:
                    with contextlib.suppress(Exception):
                        self._push(name, self.cache_root / "clusters" / name)
                self.synced.discard(name)
                del self.locks[name]
                try:
                    lock.release()
                except Exception:  # noqa: BLE001 - reported: the lock stays until unlocked or stale
                    left.append(name)
            return left
        finally:
            self._push_mutex.release()


def _loads(data: bytes) -> dict | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _read_json(path: Path) -> dict | None:
    try:
        return _loads(path.read_bytes())
    except OSError:
        return None
