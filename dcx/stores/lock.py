"""One writer at a time per cluster in a bucket store: a lock object written with a conditional
create (S3 If-None-Match: *), renewed and released only by its holder (If-Match: its etag), never a
read-then-write. The object names the holder and carries a lease: a holder that stops renewing it
(killed) leaves a lock reported as stale, which `dcx cluster unlock NAME` breaks."""

from __future__ import annotations

import getpass
import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

from dcx.errors import LockHeld
from dcx.stores.backend import Backend

log = logging.getLogger(__name__)

DEFAULT_LEASE = 60.0


def lease_seconds() -> float:
    return float(os.environ.get("DCX_STATE_LEASE", DEFAULT_LEASE))


def lock_timeout() -> float:
    """--lock-timeout S (DCX_LOCK_TIMEOUT): how long to wait for a held lock; 0 fails at once."""
    return float(os.environ.get("DCX_LOCK_TIMEOUT", "0") or 0)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def holder_line(cluster: str, info: dict[str, Any], now: float | None = None) -> str:
    """`cluster 'x' is locked by USER@HOST PID N (COMMAND) since T`, and whether it is stale."""
    now = time.time() if now is None else now
    who = f"{info.get('user', '?')}@{info.get('host', '?')} PID {info.get('pid', '?')}"
    text = f"cluster '{cluster}' is locked by {who} ({info.get('command', '?')}) since {info.get('since', '?')}"
    renewed, lease = info.get("renewed_at"), info.get("lease_seconds")
    if isinstance(renewed, (int, float)) and isinstance(lease, (int, float)) and now > renewed + lease:
        text += f"; stale: not renewed since {_iso(renewed)} (lease {lease:g} s)"
    return text


def is_stale(info: dict[str, Any], now: float | None = None) -> bool:
    return "; stale:" in holder_line("", info, now)


def read_holder(backend: Backend, key: str) -> tuple[dict[str, Any], str] | None:
    got = backend.get(key)
    if got is None:
        return None
    try:
        info = json.loads(got[0])
    except ValueError:
        info = {}
    return (info if isinstance(info, dict) else {}), got[1]


class RemoteLock:
    def __init__(self, backend: Backend, key: str, cluster: str, command: str) -> None:
        self.backend, self.key, self.cluster = backend, key, cluster
        self.lease = lease_seconds()
        now = time.time()
        self.info = {"user": getpass.getuser(), "host": socket.gethostname(), "pid": os.getpid(),
                     "command": command, "since": _iso(now), "renewed_at": now, "lease_seconds": self.lease,
                     "id": secrets.token_hex(8)}
        self.etag = ""
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def acquire(self, timeout: float | None = None) -> None:
        """Take the lock, waiting up to `timeout` seconds (default --lock-timeout) for its holder."""
        deadline = time.monotonic() + (lock_timeout() if timeout is None else timeout)
        while True:
            self.info["renewed_at"] = time.time()
            etag = self.backend.create(self.key, json.dumps(self.info).encode())
            held = None if etag else read_holder(self.backend, self.key)
            if held is not None and held[0].get("id") == self.info["id"]:
                etag = held[1]  # our own write, answered 412 on the SDK's retry of it: ours all the same
            if etag:
                self.etag = etag
                self._thread = threading.Thread(target=self._renew_loop, name="dcx-lock-lease", daemon=True)
                self._thread.start()
                return
            if held is None:
                continue  # released between our write and our read: try again
            if time.monotonic() >= deadline:
                hint = (f"if that run is dead: `dcx cluster unlock {self.cluster}`" if is_stale(held[0]) else
                        f"wait (--lock-timeout S), or if that run is dead: `dcx cluster unlock {self.cluster}`")
                raise LockHeld(holder_line(self.cluster, held[0]), hint=hint)
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease / 3):
            try:
                self.renew()
            except Exception as exc:  # the store unreachable for a moment: try again at the next tick
                log.warning("could not renew the lock on cluster %s: %s", self.cluster, exc)

    def renew(self) -> bool:
        with self._mutex:
            if self.lost or not self.etag:
                return False
            self.info["renewed_at"] = time.time()
            etag = self.backend.replace(self.key, json.dumps(self.info).encode(), self.etag)
            if etag is None:
                self.lost = True  # broken by `cluster unlock`: from now on this run writes nothing
                return False
            self.etag = etag
            return True

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._mutex:
            if self.etag and not self.lost:
                self.backend.delete_if(self.key, self.etag)
            self.etag = ""
