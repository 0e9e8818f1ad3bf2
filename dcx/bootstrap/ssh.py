"""SSH connections (paramiko): one per host for the whole run, commands with timeouts, sudo, upload,
wait-for-SSH while machines boot, host-key trust on first use, and fan-out over a bounded pool.

A connection never holds more sessions at once than its server accepts (sshd's MaxSessions: 10 by
default, 1 or 2 on hardened hosts): the limit is learned from the first refused session, later opens
queue for a free one, and a refusal is retried, never a failure of its own.

Every command is sent through `sh -c` with PATH extended by the sbin directories (non-login
sessions often lack them), wrapped in `sudo -n` when the login user is not root.
"""

from __future__ import annotations

import base64
import contextlib
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import paramiko

from dcx.errors import HostKeyMismatch, OperationFailed
from dcx.log import log, redact
from dcx.shell import q

PATH_PREFIX = 'PATH="$PATH:/usr/local/sbin:/usr/local/bin:/usr/sbin:/sbin"; export PATH; '
DEFAULT_TIMEOUT = 300.0


@dataclass
class Target:
    """Everything needed to reach one host."""

    name: str  # node identity: host keys are recorded under it
    host: str
    port: int = 22
    user: str = "root"
    key_files: list[str] = field(default_factory=list)
    jump: Target | None = None  # reached through this host (ProxyJump), chained
    become_password: str | None = field(default=None, repr=False)
    agent: bool = True  # also offer keys from ssh-agent
    default_keys: bool = False  # also try ~/.ssh/id_* (OpenSSH's defaults), for machines dcx did not make
    booting: bool = True  # a machine dcx just made: its key may not be installed yet, so auth failures are retried

    @property
    def label(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def tail(self, lines: int = 8) -> str:
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return "\n".join(text[-lines:])


class CommandFailed(OperationFailed):
    def __init__(self, host: str, what: str, result: Result) -> None:
        self.host = host
        self.result = result
        tail = redact(result.tail())
        hint = None
        if "a password is required" in result.stderr:
            hint = (f"sudo on {host} needs a password: pass -K/--ask-become-pass, or set ansible_become_password "
                    "in the inventory")
        super().__init__(f"{what} failed on {host} (exit {result.exit_code})" + (f": {tail}" if tail else ""),
                         hint=hint)


class HostKeyStore:
    """Trust on first use, per node identity. `keys` is the cluster state's host_keys dict."""

    def __init__(self, keys: dict[str, dict[str, str]], on_change: Callable[[], None]) -> None:
        self.keys = keys
        self._on_change = on_change
        self._lock = threading.Lock()

    def check(self, target: Target, key: paramiko.PKey) -> None:
        seen = {"address": f"{target.host}:{target.port}", "type": key.get_name(), "key": key.get_base64()}
        with self._lock:
            known = self.keys.get(target.name)
            if known is None:
                self.keys[target.name] = seen
                log.info("%s: recorded host key %s %s (first use)", target.name, seen["type"], fingerprint(key))
                try:
                    self._on_change()
                except BaseException:  # not recorded (a bucket store holds another key for it): not trusted
                    self.keys.pop(target.name, None)
                    raise
                return
        if known["type"] != seen["type"] or known["key"] != seen["key"]:
            raise HostKeyMismatch(
                f"host key of {target.name} ({target.label}) changed: recorded {known['type']} "
                f"differs from the {seen['type']} {fingerprint(key)} now presented; refusing to connect",
                hint=f"if the machine was rebuilt on purpose, run `dcx node forget-key CLUSTER {target.name}`"
                " and retry; otherwise something may be intercepting the connection",
            )

    def forget(self, name: str) -> None:
        with self._lock:
            if self.keys.pop(name, None) is not None:
                self._on_change()


def fingerprint(key: paramiko.PKey) -> str:
    import hashlib

    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class _TofuPolicy(paramiko.MissingHostKeyPolicy):
    """Runs before authentication, so no credential is offered to an impostor."""

    def __init__(self, store: HostKeyStore, target: Target) -> None:
        self.store = store
        self.target = target

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.store.check(self.target, key)


# OpenSSH refuses a session past MaxSessions with SSH2_OPEN_CONNECT_FAILED (code 2, text "open failed";
# serverloop.c server_input_channel_open; paramiko says "Connect failed"). RFC 4254 section 5.1 also
# names SSH_OPEN_RESOURCE_SHORTAGE (4), which other servers may answer.
SESSION_REFUSED_CODES = (2, 4)
# Refusals while none of dcx's sessions is open on the connection (so no queue can help): give up after.
REFUSAL_PATIENCE = 20.0


def _is_refusal(exc: paramiko.SSHException, transport: paramiko.Transport | None) -> bool:
    """The server answered a session open with a refusal. paramiko keeps the last refusal's exception on
    the transport, not per channel: with several opens refused at once, only one caller gets it and the
    others get "Unable to open channel." from a transport that is still up."""
    if isinstance(exc, paramiko.ChannelException):
        return exc.code in SESSION_REFUSED_CODES
    return str(exc) == "Unable to open channel." and transport is not None and transport.is_active()


class SessionRefused(OperationFailed):
    """The server of this connection keeps refusing sessions: names that host, not the caller's."""

    def __init__(self, target: Target, exc: paramiko.SSHException, seconds: float) -> None:
        why = f"ChannelException({exc.code}, {exc.text!r})" if isinstance(exc, paramiko.ChannelException) else str(exc)
        super().__init__(
            f"{target.name} ({target.label}) refused every new SSH session for {seconds:.0f}s ({why}) "
            "with none of dcx's sessions open on the connection",
            hint=f"check MaxSessions in {target.name}'s sshd_config (0 allows no sessions at all)")


class SessionGate:
    """How many sessions one connection may hold at once, learned from the server's refusals.

    Until a refusal the limit is unknown and opens go straight through. After one, the limit is the most
    sessions that were ever open at once (the server accepted that many, so it never drops below what
    worked), and opens queue here for a free slot instead of being refused again.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.limit: int | None = None
        self.open = 0  # confirmed by the server, not yet released
        self.opening = 0  # asked for, no answer yet
        self.most = 0

    def acquire(self, deadline: float) -> bool:
        """Take a slot; False when none came free before `deadline`."""
        with self._cond:
            while self.limit is not None and self.open + self.opening >= self.limit:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            self.opening += 1
            return True

    def opened(self) -> None:
        with self._cond:
            self.opening -= 1
            self.open += 1
            self.most = max(self.most, self.open)
            self._cond.notify_all()

    def failed(self) -> None:
        with self._cond:
            self.opening -= 1
            self._cond.notify_all()

    def refused(self) -> int:
        """Learn from a refusal. Returns how many of our sessions are open (0: the refusal was not about
        ours, or about one the server had not freed yet)."""
        with self._cond:
            self.opening -= 1
            self.limit = max(1, self.most)  # for now: no new opens while those in flight are answered
            # Opens sent before this one may still be confirmed: the server counted them.
            deadline = time.monotonic() + 5.0
            while self.opening > 0 and time.monotonic() < deadline:
                self._cond.wait(0.1)
            self.limit = max(1, self.most)
            self._cond.notify_all()
            return self.open

    def release(self) -> None:
        with self._cond:
            self.open -= 1
            self._cond.notify_all()


class Connection:
    def __init__(self, target: Target, keys: HostKeyStore, key_passphrase: str | None = None,
                 jumps: Callable[[Target], Connection] | None = None) -> None:
        self.target = target
        self._keys = keys
        self._passphrase = key_passphrase
        self._client: paramiko.SSHClient | None = None
        self._jumps = jumps  # where a jump host's connection comes from (shared), else one of our own
        self._jump: Connection | None = None
        self._lock = threading.Lock()
        self._gate = SessionGate()
        self._round_trip_lock = threading.Lock()  # paramiko waits for one global reply at a time

    @property
    def is_root(self) -> bool:
        return self.target.user == "root"

    def _socket(self, timeout: float) -> Any:
        t = self.target
        if t.jump is not None:
            if self._jump is None:
                self._jump = self._jumps(t.jump) if self._jumps else Connection(t.jump, self._keys, self._passphrase)
            jump_client = self._jump.client(timeout)
            transport = jump_client.get_transport()
            assert transport is not None
            return transport.open_channel("direct-tcpip", (t.host, t.port), ("127.0.0.1", 0), timeout=timeout)
        sock = socket.create_connection((t.host, t.port), timeout=timeout)
        # paramiko leaves Nagle on: ~40 ms per exchange; off, a round trip is ~2.5 ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def client(self, timeout: float = 15.0) -> paramiko.SSHClient:
        with self._lock:
            if self._client is not None:
                transport = self._client.get_transport()
                if transport is not None and transport.is_active():
                    return self._client
                self._client.close()
                self._client = None
            c = paramiko.SSHClient()
            c.set_missing_host_key_policy(_TofuPolicy(self._keys, self.target))
            try:
                c.connect(
                    self.target.host,
                    port=self.target.port,
                    username=self.target.user,
                    key_filename=self.target.key_files or None,
                    passphrase=self._passphrase,
                    sock=self._socket(timeout),
                    timeout=timeout,
                    banner_timeout=timeout,
                    auth_timeout=timeout,
                    allow_agent=self.target.agent,
                    look_for_keys=self.target.default_keys,
                )
            except BaseException:
                c.close()
                raise
            transport = c.get_transport()
            if transport is not None:
                transport.set_keepalive(15)
            self._client = c
            return c

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
        if self._jump is not None:
            if self._jumps is None:  # a shared jump connection is closed by its Sessions
                self._jump.close()
            self._jump = None

    def wrap(self, command: str, sudo: bool = True) -> tuple[str, bytes]:
        """The exact string sent to the remote shell, and any stdin prefix (the sudo password)."""
        inner = PATH_PREFIX + command
        if not sudo or self.is_root:
            return "sh -c " + q(inner), b""
        if self.target.become_password is not None:
            # -S reads the password from stdin: it never appears in a process list or a log.
            return "sudo -S -p '' -H -- sh -c " + q(inner), (self.target.become_password + "\n").encode()
        return "sudo -n -H -- sh -c " + q(inner), b""

    def run(
        self,
        command: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        sudo: bool = True,
        stdin: bytes | str | None = None,
        check: bool = False,
        what: str | None = None,
    ) -> Result:
        data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
        log.debug("%s: run: %s", self.target.name, command)
        started = time.monotonic()
        code, out, err = self._execute(command, data, started + timeout, sudo=sudo, close_stdin=True)
        result = Result(code, out.decode(errors="replace"), err.decode(errors="replace"))
        log.debug("%s: exit %d in %.2fs%s", self.target.name, code, time.monotonic() - started,
                  ("\n" + result.tail(20)) if code else "")
        if check and not result.ok:
            raise CommandFailed(self.target.name, what or command.split()[0], result)
        return result

    def exchange(self, command: str, request: bytes, *, timeout: float, sudo: bool = True) -> tuple[int, bytes, bytes]:
        """Run `command`, write `request` to its stdin and keep stdin open until the command exits: for a
        conversation with a program that ends it itself (an HTTP exchange over `docker system dial-stdio`).
        Returns (exit code, stdout, stderr) as bytes."""
        log.debug("%s: exchange over: %s", self.target.name, command)
        return self._execute(command, request, time.monotonic() + timeout, sudo=sudo, close_stdin=False)

    def _execute(self, command: str, data: bytes, deadline: float, *, sudo: bool,
                 close_stdin: bool) -> tuple[int, bytes, bytes]:
        wrapped, prefix = self.wrap(command, sudo)
        chan = self._open_session(deadline)
        try:
            chan.exec_command(wrapped)
            if prefix or data:
                chan.sendall(prefix + data)
            if close_stdin:
                chan.shutdown_write()
            out, err = _drain(chan, deadline, self.target.name)
            return chan.recv_exit_status(), out, err
        finally:
            self._close_session(chan)

    def _open_session(self, deadline: float) -> paramiko.Channel:
        """A session channel within what the server accepts: wait for a free slot, retry refusals."""
        delay = 0.01
        refused_alone_since: float | None = None
        while True:
            if not self._gate.acquire(deadline):
                raise OperationFailed(f"timed out waiting for a free SSH session on {self.target.name} "
                                      f"({self.target.label}): its sshd allows {self._gate.limit} at once")
            transport = None
            try:
                transport = self.client().get_transport()
                assert transport is not None
                chan = transport.open_session(timeout=30)
            except paramiko.SSHException as exc:
                if not _is_refusal(exc, transport):
                    self._gate.failed()
                    raise
                ours = self._gate.refused()
                log.debug("%s: session refused (%s) with %d of dcx's open; limit now %s", self.target.name, exc,
                          ours, self._gate.limit)
                now = time.monotonic()
                if ours:
                    refused_alone_since = None
                else:
                    # Nothing of ours is open: a session the server has not freed yet, or none allowed at all.
                    refused_alone_since = refused_alone_since or now
                    if now - refused_alone_since > REFUSAL_PATIENCE or now + delay > deadline:
                        raise SessionRefused(self.target, exc, now - refused_alone_since) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            except BaseException:
                self._gate.failed()
                raise
            self._gate.opened()
            return chan

    def _close_session(self, chan: paramiko.Channel) -> None:
        try:
            chan.close()
            transport = chan.get_transport()
            if self._gate.limit is not None and transport is not None and transport.is_active():
                # sshd frees a closed session on its next loop turn, after reading our CLOSE: an open sent
                # right behind it is refused. A round trip (a keepalive it answers) orders the next open
                # after that turn; paid only on connections whose limit binds.
                with self._round_trip_lock:
                    transport.global_request("keepalive@openssh.com", wait=True)
        finally:
            self._gate.release()

    @contextlib.contextmanager
    def _sftp(self) -> Iterator[paramiko.SFTPClient]:
        """An SFTP client on a session of its own (it counts against MaxSessions like any other)."""
        chan = self._open_session(time.monotonic() + DEFAULT_TIMEOUT)
        try:
            chan.invoke_subsystem("sftp")
            sftp = paramiko.SFTPClient(chan)
            try:
                yield sftp
            finally:
                sftp.close()
        finally:
            self._close_session(chan)

    def upload(self, data: bytes, dest: str, mode: int = 0o644) -> None:
        """Write `data` to `dest` atomically (temp file, then rename), as root when sudo is needed."""
        if self.is_root:
            tmp = f"{dest}.dcx-tmp"
            with self._sftp() as sftp:
                with sftp.open(tmp, "wb") as fh:
                    fh.set_pipelined(True)
                    fh.write(data)
                sftp.chmod(tmp, mode)
                sftp.posix_rename(tmp, dest)
            return
        tmp = f"/tmp/.dcx-upload-{time.monotonic_ns()}"
        with self._sftp() as sftp:
            with sftp.open(tmp, "wb") as fh:
                fh.set_pipelined(True)
                fh.write(data)
            sftp.chmod(tmp, 0o600)
        self.run(f"install -m {mode:o} {q(tmp)} {q(dest)}; rc=$?; rm -f {q(tmp)}; exit $rc",
                 check=True, what=f"install {dest}")

    def download(self, path: str) -> bytes:
        """The bytes of the remote file `path` over SFTP (upload's counterpart); a file only root may read
        is copied first to a private temporary file the login user owns."""
        if self.is_root:
            with self._sftp() as sftp, sftp.open(path, "rb") as fh:
                fh.prefetch()
                return fh.read()
        tmp = f"/tmp/.dcx-download-{time.monotonic_ns()}"
        user = q(self.target.user)
        self.run(f"install -m 600 -o {user} {q(path)} {q(tmp)}", check=True, what=f"reading {path}")
        try:
            with self._sftp() as sftp, sftp.open(tmp, "rb") as fh:
                fh.prefetch()
                return fh.read()
        finally:
            self.run(f"rm -f {q(tmp)}", timeout=60)


def _drain(chan: paramiko.Channel, deadline: float, host: str) -> tuple[bytes, bytes]:
    out, err = bytearray(), bytearray()
    while True:
        progressed = False
        while chan.recv_ready():
            out += chan.recv(65536)
            progressed = True
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(65536)
            progressed = True
        if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
            if chan.eof_received or chan.closed:
                break
        if progressed:
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise OperationFailed(f"command timed out on {host}")
        select.select([chan], [], [], min(remaining, 0.2))
    return bytes(out), bytes(err)


RETRYABLE = (
    OSError,
    EOFError,
    paramiko.SSHException,  # banner not ready, connection reset during key exchange
)


def connect_with_retry(conn: Connection, timeout: float, interval: float = 0.5) -> None:
    """Wait for SSH while a machine boots: retry until `timeout`, backing off up to 5 s.

    Authentication failures are retried too (cloud-init may not have installed the key yet), but a
    changed host key never is.
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            conn.client(timeout=min(15.0, max(1.0, deadline - time.monotonic())))
            return
        except HostKeyMismatch:
            raise
        except paramiko.PasswordRequiredException:
            raise OperationFailed(f"cannot log in to {conn.target.name} as {conn.target.label}: its key file is "
                                  "encrypted", hint="set DCX_SSH_KEY_PASSPHRASE, or load the key into ssh-agent"
                                  ) from None
        except paramiko.AuthenticationException as exc:
            if not conn.target.booting:
                raise OperationFailed(f"cannot log in to {conn.target.name} as {conn.target.label}: {exc}",
                                      hint="check the user and key (inventory, ~/.ssh/config, ssh-agent)") from None
            last = exc
        except RETRYABLE as exc:
            if str(exc) == "No authentication methods available":
                # paramiko has no key at all to offer (none named, none found, no agent): waiting will
                # not change that, so say so now instead of retrying until the timeout.
                raise OperationFailed(f"cannot log in to {conn.target.name} as {conn.target.label}: no key to "
                                      "offer", hint="name a key (ansible_ssh_private_key_file, IdentityFile in "
                                      "~/.ssh/config, spec.ssh.privateKey) or load one into ssh-agent") from None
            last = exc
        if time.monotonic() + interval > deadline:
            reason = f"{type(last).__name__}: {last}" if last else "no answer"
            raise OperationFailed(
                f"cannot reach {conn.target.name} over SSH at {conn.target.label}: {redact(reason)}")
        time.sleep(interval)
        interval = min(interval * 2, 5.0)


class Sessions:
    """One Connection per host, reused for the whole run, and one per jump host, shared by every host
    reached through it: a bastion sees one login, not one per host behind it (its sshd's MaxStartups
    drops logins that arrive together, 3:50:6 on hardened hosts). Forwarded connections do not count
    against its MaxSessions (sshd_config(5))."""

    def __init__(self, keys: HostKeyStore, key_passphrase: str | None = None) -> None:
        self.keys = keys
        self._passphrase = key_passphrase
        self._conns: dict[str, Connection] = {}
        self._jump_conns: dict[tuple[Any, ...], Connection] = {}
        self._lock = threading.Lock()

    def get(self, target: Target) -> Connection:
        with self._lock:
            conn = self._conns.get(target.name)
            if conn is None or conn.target != target:
                if conn is not None:
                    conn.close()
                conn = Connection(target, self.keys, self._passphrase, jumps=self._jump)
                self._conns[target.name] = conn
            return conn

    def _jump(self, target: Target) -> Connection:
        key = _login_identity(target)
        with self._lock:
            conn = self._jump_conns.get(key)
            if conn is None:
                conn = self._jump_conns[key] = Connection(target, self.keys, self._passphrase, jumps=self._jump)
            return conn

    def drop(self, name: str) -> None:
        with self._lock:
            conn = self._conns.pop(name, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        with self._lock:
            conns = list(self._conns.values()) + list(self._jump_conns.values())
            self._conns.clear()
            self._jump_conns.clear()
        for c in conns:  # hosts before the jump hosts they go through
            c.close()


def _login_identity(t: Target) -> tuple[Any, ...]:
    """Two jump targets with the same identity log in the same way: one connection serves both."""
    return (t.host, t.port, t.user, tuple(t.key_files), t.agent, t.default_keys,
            _login_identity(t.jump) if t.jump else None)


T = TypeVar("T")
R = TypeVar("R")


def fan_out(fn: Callable[[T], R], items: Iterable[T], parallel: int) -> list[tuple[T, R | None, BaseException | None]]:
    """Run fn over items on a bounded thread pool; return (item, result, error) in input order."""
    items = list(items)
    if not items:
        return []
    results: list[tuple[T, R | None, BaseException | None]] = []
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(items))), thread_name_prefix="dcx") as pool:
        futures = [pool.submit(fn, item) for item in items]
        for item, fut in zip(items, futures, strict=True):
            try:
                results.append((item, fut.result(), None))
            except BaseException as exc:  # noqa: BLE001 - reported per host by the caller
                results.append((item, None, exc))
    return results
