"""A tiny in-process SSH server (paramiko) that limits sessions per connection as OpenSSH's sshd does.

sshd_config(5) MaxSessions: "the maximum number of open shell, login or subsystem (e.g. sftp) sessions
permitted per network connection"; forwarding channels do not count. A session opened past it is
refused with SSH2_OPEN_CONNECT_FAILED (code 2, "open failed": OpenSSH serverloop.c,
server_input_channel_open; seen from OpenSSH 9.2 here). A session counts until the client's CLOSE has
arrived (OpenSSH frees it only then, session_close_by_channel); this double frees it at once, which is
no stricter than sshd (sshd frees it a loop turn later). Commands run for real with /bin/sh on this
machine; unknown global requests are answered with a failure, as sshd does.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import subprocess
import threading
from typing import Any

import paramiko


@functools.cache
def _host_key() -> paramiko.PKey:
    return paramiko.RSAKey.generate(2048)  # one per test session: generating takes a while


class LimitedSSHServer:
    """Listens on 127.0.0.1; accepts one client key; `max_sessions` per connection (None: no limit)."""

    def __init__(self, client_key: paramiko.PKey, max_sessions: int | None, env: dict[str, str] | None = None) -> None:
        self.host_key = _host_key()
        self.env = env  # the commands' environment (None: this process's)
        self.client_key = client_key
        self.max_sessions = max_sessions
        self.refusals = 0
        self.most_at_once = 0  # the most sessions one connection held at once
        self.commands: list[str] = []
        self.connections = 0
        self.forwarded = 0  # direct-tcpip channels opened through this server (as a jump host)
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._transports: list[paramiko.Transport] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="fake-sshd").start()

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        for t in self._transports:
            t.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._sock.accept()
            except OSError:
                return
            transport = paramiko.Transport(sock)
            transport.add_server_key(self.host_key)
            with self._lock:
                self.connections += 1
                self._transports.append(transport)
            # Negotiate off the accept loop: a client that drops the connection mid-handshake (as one
            # does on a changed host key) makes start_server raise, and must not stop later accepts.
            threading.Thread(target=self._serve, args=(transport,), daemon=True).start()

    def _serve(self, transport: paramiko.Transport) -> None:
        handler = _Handler(self, transport)
        try:
            transport.start_server(server=handler)
        except (paramiko.SSHException, OSError, EOFError):
            transport.close()
            return
        handler.serve_forwards()


class _Handler(paramiko.ServerInterface):
    def __init__(self, server: LimitedSSHServer, transport: paramiko.Transport) -> None:
        self.server = server
        self.transport = transport
        self.pending: set[int] = set()  # sessions granted, no request on them yet
        self.sessions: list[paramiko.Channel] = []
        self.forwards: dict[int, tuple[str, int]] = {}  # direct-tcpip channels granted: where to
        self.accepted: list[paramiko.Channel] = []
        self.lock = threading.Lock()

    # --- authentication: the one client key -----------------------------------------------------

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if key.asbytes() == self.server.client_key.asbytes():
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    # --- sessions ----------------------------------------------------------------------------------

    def _live(self) -> int:
        return len(self.pending) + sum(1 for ch in self.sessions if not ch.closed)

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind != "session":
            return paramiko.OPEN_FAILED_UNKNOWN_CHANNEL_TYPE
        with self.lock:
            if self.server.max_sessions is not None and self._live() >= self.server.max_sessions:
                with self.server._lock:
                    self.server.refusals += 1
                return paramiko.OPEN_FAILED_CONNECT_FAILED  # what OpenSSH answers past MaxSessions (code 2)
            self.pending.add(chanid)
            live = self._live()
        with self.server._lock:
            self.server.most_at_once = max(self.server.most_at_once, live)
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        with self.lock:
            self.pending.discard(channel.get_id())
            self.sessions.append(channel)
        with self.server._lock:
            self.server.commands.append(command.decode())
        threading.Thread(target=self._exec, args=(channel, command.decode()), daemon=True).start()
        return True

    def _exec(self, channel: paramiko.Channel, command: str) -> None:
        proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=self.server.env)

        def pump_stdin() -> None:
            assert proc.stdin is not None
            with contextlib.suppress(OSError):
                while data := channel.recv(65536):
                    proc.stdin.write(data)
                    proc.stdin.flush()
            with contextlib.suppress(OSError):
                proc.stdin.close()

        threading.Thread(target=pump_stdin, daemon=True).start()
        assert proc.stdout is not None and proc.stderr is not None
        err: list[bytes] = []
        reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        out = proc.stdout.read()
        reader.join()
        code = proc.wait()
        with contextlib.suppress(OSError, EOFError):
            channel.sendall(out)
            channel.sendall_stderr(b"".join(err))
            channel.send_exit_status(code)
            channel.shutdown_write()  # EOF; the session stays counted until the client closes it

    # --- forwarding (ProxyJump): not sessions, so MaxSessions does not count them ---------------------

    def check_channel_direct_tcpip_request(self, chanid: int, origin: tuple[str, int],
                                           destination: tuple[str, int]) -> int:
        with self.lock:
            self.forwards[chanid] = destination
        with self.server._lock:
            self.server.forwarded += 1
        return paramiko.OPEN_SUCCEEDED

    def serve_forwards(self) -> None:
        """paramiko queues every granted channel for accept(): connect the forwarded ones."""
        while self.transport.is_active():
            chan = self.transport.accept(0.5)
            if chan is None:
                continue
            with self.lock:
                destination = self.forwards.pop(chan.get_id(), None)
            if destination is not None:
                threading.Thread(target=_pump, args=(chan, destination), daemon=True).start()
            else:
                self.accepted.append(chan)  # a session (served by its exec request): a dropped Channel closes

    def check_global_request(self, kind: str, msg: Any) -> bool:
        return False  # sshd answers unknown global requests (keepalive@openssh.com) with a failure


def _pump(chan: paramiko.Channel, destination: tuple[str, int]) -> None:
    try:
        sock = socket.create_connection(destination, timeout=5)
    except OSError:
        chan.close()
        return

    def copy(src: Any, dst: Any) -> None:
        with contextlib.suppress(OSError, EOFError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError, EOFError):
            dst.shutdown(socket.SHUT_WR) if isinstance(dst, socket.socket) else dst.shutdown_write()

    threading.Thread(target=copy, args=(sock, chan), daemon=True).start()
    copy(chan, sock)
