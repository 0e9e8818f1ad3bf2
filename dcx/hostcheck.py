"""`dcx inventory show|check`: an inventory's hosts resolved (no connection), and checked (connect to
every host in parallel: reachable, OS, arch, CPUs, memory, init system, docker, clock offset, sudo).

Host keys seen by `check` are trusted on first use and kept in DCX_HOME/inventory-host-keys.json,
keyed by address and port, so a changed key is refused here too."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from dcx.bootstrap.phases import Host, describe_error
from dcx.bootstrap.runtime import gather_facts
from dcx.bootstrap.ssh import Connection, HostKeyStore, Target, connect_with_retry, fan_out
from dcx.inventory import load_inventory
from dcx.log import redact, register_secret
from dcx.providers.base import Node
from dcx.sshconfig import Endpoint, resolve
from dcx.state import atomic_write, dcx_home, ensure_private_dir


def resolved_hosts(path: str | Path, group: str | None, default_user: str = "root",
                   ) -> list[tuple[str, Endpoint, str | None]]:
    """(name, how to reach it, the inventory's sudo password if it gives one) per host."""
    out = []
    for h in load_inventory(path, group):
        ep = resolve(h.name, host=h.address, port=h.port if h.port != 22 else None, user=h.user,
                     key_file=h.private_key_file, proxy_jump=h.proxy_jump, default_user=default_user)
        if h.become_password is not None:
            register_secret(h.become_password)
        out.append((h.name, ep, h.become_password))
    return out


def show(path: str | Path, group: str | None) -> list[dict[str, Any]]:
    return [{"name": name, "address": ep.host, "port": ep.port, "user": ep.user, "keys": ep.key_files,
             "jumps": [f"{j.user}@{j.host}:{j.port}" for j in ep.jumps]} for name, ep, _ in resolved_hosts(path, group)]


class _KeyFile:
    def __init__(self) -> None:
        self.path = dcx_home() / "inventory-host-keys.json"
        self.keys: dict[str, dict[str, str]] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self._lock = threading.Lock()

    def save(self) -> None:
        with self._lock:
            ensure_private_dir(self.path.parent)
            atomic_write(self.path, json.dumps(self.keys, indent=2))


def _one_line(exc: BaseException) -> str:
    error, output = describe_error(exc)
    return f"{error}: {output.splitlines()[-1]}" if output.strip() else error


def check(path: str | Path, group: str | None, parallel: int = 20, timeout: float = 15.0,
          become_password: str | None = None, key_passphrase: str | None = None) -> list[dict[str, Any]]:
    from dcx.lifecycle.session import target_for_endpoint

    store = _KeyFile()
    keys = HostKeyStore(store.keys, store.save)
    # One connection per inventory entry: two entries may name the same machine (another user, another
    # key), and host keys are recorded per address, so the entry's name cannot key a shared session.
    conns: list[Connection] = []

    def one(item: tuple[str, Endpoint, str | None]) -> dict[str, Any]:
        name, ep, inventory_password = item
        target: Target = target_for_endpoint(f"{ep.host}:{ep.port}", ep, inventory_password or become_password)
        row: dict[str, Any] = {"name": name, "address": f"{ep.host}:{ep.port}", "reachable": False}
        conn = Connection(target, keys, key_passphrase)
        conns.append(conn)
        host = Host(node=Node(name=name, pool="", provider="ssh", role="", ssh_address=ep.host), target=target,
                    conn=conn)
        try:
            connect_with_retry(host.conn, timeout)
        except Exception as exc:  # noqa: BLE001 - reported in the row
            row["error"] = _one_line(exc)
            return row
        row["reachable"] = True
        row["sudo"] = host.conn.is_root or host.run("true", timeout=30).ok
        try:
            f = gather_facts(host)
        except Exception as exc:  # noqa: BLE001 - reported in the row
            row["error"] = _one_line(exc)
            return row
        row.update({"os": f"{f.os_id} {f.os_version}".strip(), "arch": f.arch, "cpus": f.cpus,
                    "memory_mib": f.mem_kb // 1024, "init": f.init, "docker": bool(f.docker_bin),
                    "docker_running": f.docker_running, "clock_offset_s": round(host.data.get("clock_offset", 0.0), 2)})
        return row

    try:
        results = fan_out(one, resolved_hosts(path, group), parallel)
    finally:
        for conn in conns:
            conn.close()
    return [r for _, r, _ in results if r is not None]


# --- a cluster's nodes, asked directly (`dcx cluster status`, `dcx cluster plan`) ----------------

PROBE_TIMEOUT = 5.0  # seconds to reach a node over SSH: a node that takes longer is reported unreachable
RUNTIME_PROBE = ("if timeout 10 docker info --format '{{.ServerVersion}}' >/dev/null 2>&1; then echo runtime=ok; "
                 # Without root (sudo wants a password that status does not have) the socket is closed to
                 # us: what an unprivileged user can see is the daemon's pidfile (dcx's own where dcx
                 # started it) naming a live, not zombie, dockerd.
                 "elif [ \"$(id -u)\" -ne 0 ] && pid=$(cat /run/dcx/dockerd.pid /var/run/docker.pid 2>/dev/null "
                 "| head -n1) "
                 "&& [ \"$(cat /proc/$pid/comm 2>/dev/null)\" = dockerd ] "
                 "&& ! grep -q '^State:[[:space:]]*Z' /proc/$pid/status 2>/dev/null; then echo runtime=ok; "
                 "else echo runtime=down; fi")
SUDO_WANTS_PASSWORD = "a password is required"  # sudo -n's refusal (sudo(8)); status then asks unprivileged


def probe_nodes(hosts: list[Host], parallel: int, runtime: bool, mesh_addresses: dict[str, str],
                ) -> dict[str, dict[str, Any]]:
    """Per node, what the node itself says, in one SSH command each, all nodes at once: `ssh` ("ok" or
    why it cannot be reached), `runtime` ("ok", "down", or None when the engine brings its own), and with
    a mesh, `mesh` (its interface, and which peers answer over it now: see dcx.bootstrap.mesh.parse_probe)."""
    from dcx.bootstrap.mesh import parse_probe, probe_command

    def one(host: Host) -> dict[str, Any]:
        row: dict[str, Any] = {"ssh": "ok", "runtime": None}
        address = mesh_addresses.get(host.name, "")
        peers = {n: a for n, a in mesh_addresses.items() if n != host.name} if address else {}
        try:
            host.conn.client(timeout=PROBE_TIMEOUT)  # one attempt: a refused or silent sshd is the answer
        except Exception as exc:  # noqa: BLE001 - reported in the row
            reason = getattr(exc, "message", "") or f"{type(exc).__name__}: {exc}"
            row["ssh"] = redact(f"cannot reach {host.name} over SSH at {host.conn.target.label}: {reason}")
            if address:
                row["mesh"] = {"address": address, "error": "not asked: unreachable over SSH"}
            return row
        parts = ([RUNTIME_PROBE] if runtime else []) + ([probe_command(list(peers.values()))] if address else [])
        try:
            result = host.run("; ".join(parts) or "true", timeout=30)
            if not result.ok and SUDO_WANTS_PASSWORD in result.stderr:
                result = host.run("; ".join(parts) or "true", timeout=30, sudo=False)
            text = result.stdout
        except Exception as exc:  # noqa: BLE001 - reported in the row
            row["ssh"] = _one_line(exc)
            return row
        if runtime:
            row["runtime"] = "ok" if "runtime=ok" in text.split() else "down"
        if address:
            row["mesh"] = parse_probe(text, address, peers)
        return row

    return {h.name: row if row is not None else {"ssh": _one_line(err) if err else "no answer", "runtime": None}
            for h, row, err in fan_out(one, hosts, parallel)}
