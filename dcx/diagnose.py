"""`dcx cluster diagnose`: everything about a cluster in one tar.gz for a colleague, secrets redacted,
and a short list of what looks wrong.

Per node, one script gathers every section (engine, mesh, daemon logs, OS, disk and memory, network,
firewall) behind marker lines; facts and the clock offset come from bootstrap's own facts. Secrets
are removed twice: on the node, before anything leaves it, the literal values only the node holds
(its WireGuard private key, k3s's token files) are replaced by awk; here, every member of the archive
passes through `redact_gathered` (registered secrets, token and key forms, password/token assignments).
WireGuard's private key is never read: the mesh section prints `wg show dcx0 dump` without its columns.
"""

from __future__ import annotations

import io
import json
import re
import secrets
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dcx.bootstrap import k3s, mesh, runtime
from dcx.bootstrap.phases import Host, RunContext
from dcx.bootstrap.ssh import connect_with_retry, fan_out
from dcx.errors import DcxError
from dcx.log import log, redact, redact_gathered, register_secret
from dcx.shell import q
from dcx.state import StateStore, atomic_write, check_output_file, now_iso

CLOCK_SKEW_S = 30.0
HANDSHAKE_STALE_S = 180  # WireGuard handshakes again every 2 minutes while traffic flows
DISK_FULL_PCT = 90
LOG_LINES = 2000
LOCAL_LOG_BYTES = 5_000_000  # the end of each of dcx's run logs, at most
DISK_PATHS = ("/", "/var/lib/docker", "/var/lib/rancher", "/var/log")

# Literal values only the node holds, replaced on the node before output leaves it: the mesh's private
# key, k3s's tokens (whole, and their password part after the last `:`).
NODE_SECRETS = (
    f"{mesh.KEY_DIR}/private.key", "/var/lib/rancher/k3s/server/token", "/var/lib/rancher/k3s/server/agent-token",
    "/var/lib/rancher/k3s/server/node-token",
)
SCRUB_PRELUDE = (
    "__dcx_keys=$({ cat " + " ".join(NODE_SECRETS) + f"; wg show {mesh.IFACE} private-key; }} 2>/dev/null "
    "| awk 'length($0) >= 8 { print; n = split($0, p, \":\"); if (n > 1 && length(p[n]) >= 8) print p[n] }')\n"
    "__dcx_scrub() { awk -v ks=\"$__dcx_keys\" 'BEGIN { n = split(ks, K, \"\\n\") } "
    "{ for (i = 1; i <= n; i++) if (K[i] != \"\") while ((p = index($0, K[i])) > 0) "
    "$0 = substr($0, 1, p - 1) \"***\" substr($0, p + length(K[i])); print }'; }\n"
)

# `wg show dump` without secrets: the interface line loses its private key, peer lines their preshared key.
WG_DUMP = (f"wg show {mesh.IFACE} dump | awk -F'\\t' "
           "'NR == 1 && NF == 4 { print \"interface\\t\" $2 \"\\t\" $3; next } "
           "NF >= 8 { print \"peer\\t\" $1 \"\\t\" $3 \"\\t\" $4 \"\\t\" $5 \"\\t\" $6 \"\\t\" $7 \"\\t\" $8; next } "
           "{ print }'; echo \"now=$(date +%s)\"")


def _daemon_logs(units: str, files: list[str]) -> str:
    """The journal where systemd runs, else the log files the daemons were started with."""
    tails = "; ".join(f"[ -f {q(f)} ] && {{ echo {q('--- ' + f)}; tail -n {LOG_LINES} {q(f)}; }}" for f in files)
    journal = " ".join(f"-u {q(u)}" for u in units.split())
    return (f"if [ -d /run/systemd/system ]; then journalctl {journal} --no-pager -n {LOG_LINES}; "
            f"else {tails}; true; fi")


COMMON_SECTIONS = [
    ("os", "uname -a; cat /etc/os-release; uptime; hostname"),
    ("resources", "df -hP; echo; free -m 2>/dev/null || cat /proc/meminfo"),
    ("disk", "df -P " + " ".join(DISK_PATHS) + " 2>/dev/null"),
    ("network", "ip -brief addr; ip route; ss -tulpn"),
    ("firewall", "iptables-save; ip6tables-save; nft list ruleset"),
    ("mesh", WG_DUMP + f"; ip addr show {mesh.IFACE}; cat {q(mesh.PUBLIC_CONF)}"),
]
SWARM_SECTIONS = [
    ("engine", "docker info; docker node ls; docker service ls; docker ps -a; "
               "for s in $(docker service ls -q 2>/dev/null); do docker service ps --no-trunc \"$s\"; done"),
    ("daemon-log", _daemon_logs("docker containerd", [runtime.DOCKERD_LOG, "/var/log/docker.log"])),
    ("config", "cat /etc/docker/daemon.json"),
]
K3S_SECTIONS = [
    ("engine", f"{k3s.kubectl('get', 'nodes', '-o', 'wide')}; {k3s.kubectl('get', 'pods', '-A', '-o', 'wide')}; "
               f"{k3s.kubectl('get', 'events', '-A')}; "
               f"{k3s.BIN} check-config 2>&1 | grep -Ei 'missing|fail|warn|STATUS' | head -n 100"),
    ("daemon-log", _daemon_logs("k3s k3s-agent", [k3s.LOG, "/var/log/k3s.log", "/var/log/k3s-agent.log"])),
    ("config", f"cat {q(k3s.CONFIG)}"),
]


def sections(engine: str) -> list[tuple[str, str]]:
    return COMMON_SECTIONS + (K3S_SECTIONS if engine == "k3s" else SWARM_SECTIONS)


def mesh_pings(name: str, addresses: dict[str, str]) -> str:
    """One ping to every other mesh address first: an idle tunnel handshakes now, so an old handshake
    in the dump means the peer does not answer, not that nothing was sent lately."""
    if name not in addresses:
        return ""
    pings = " ".join(f"ping -c1 -W2 {q(a)} >/dev/null 2>&1 &" for n, a in sorted(addresses.items()) if n != name)
    return f"{pings} wait; " if pings else ""


def collect_script(items: list[tuple[str, str]], nonce: str) -> str:
    """One script: each section's output behind a marker line, everything through the node-side scrub."""
    body = "\n".join(f"echo {q(marker(nonce, name))}\n( {command} ) 2>&1" for name, command in items)
    return SCRUB_PRELUDE + "{\n" + body + "\n} | __dcx_scrub\n"


def marker(nonce: str, name: str) -> str:
    return f"@@dcx-diagnose {nonce} {name}@@"


def split_sections(text: str, nonce: str) -> dict[str, str]:
    out: dict[str, str] = {}
    current = None
    prefix = f"@@dcx-diagnose {nonce} "
    for line in text.splitlines(keepends=True):
        if line.startswith(prefix) and line.rstrip().endswith("@@"):
            current = line.rstrip()[len(prefix):-2]
            out[current] = ""
        elif current is not None:
            out[current] += line
    return out


# --- reading what came back ---------------------------------------------------------------------------


@dataclass
class NodeReport:
    name: str
    role: str
    reachable: bool = False
    error: str = ""
    facts: dict[str, Any] = field(default_factory=dict)
    clock_offset: float | None = None
    sections: dict[str, str] = field(default_factory=dict)


def parse_wg_dump(text: str) -> tuple[list[dict[str, Any]], int]:
    """Peers (public key, endpoint, allowed IPs, latest handshake epoch) and the node's `now`."""
    peers, now = [], 0
    for line in text.splitlines():
        cols = line.split("\t")
        if line.startswith("now="):
            now = int(line[4:] or 0) if line[4:].strip().isdigit() else 0
        elif cols[0] == "peer" and len(cols) >= 6:
            peers.append({"public_key": cols[1], "endpoint": cols[2], "allowed_ips": cols[3],
                          "latest_handshake": int(cols[4]) if cols[4].isdigit() else 0})
    return peers, now


def disk_usage(text: str) -> dict[str, int]:
    """Mount point -> percent used, from `df -P`."""
    out = {}
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 6 and cols[4].endswith("%") and cols[4][:-1].isdigit():
            out[cols[5]] = int(cols[4][:-1])
    return out


def findings(reports: list[NodeReport], health: dict[str, Any], mesh_addresses: dict[str, str],
             engine: str) -> list[str]:
    """What looks wrong, one line each: unreachable, daemon down, not Ready, mesh peer without a recent
    handshake, clock skew, a full disk."""
    lines = []
    by_address = {a: n for n, a in mesh_addresses.items()}
    for r in reports:
        if not r.reachable:
            lines.append(f"{r.name}: unreachable: {r.error}")
            continue
        if r.error:  # reached, but gathering failed part way (sudo refused, a command timed out)
            lines.append(f"{r.name}: {r.error}")
            if not r.facts:
                continue
        if engine == "swarm" and not r.facts.get("docker_running"):
            lines.append(f"{r.name}: docker is not running")
        if engine == "k3s" and "running=1" not in r.sections.get("k3s-state", ""):
            lines.append(f"{r.name}: k3s is not running")
        h = health.get(r.name)
        if h is not None and not h.get("ready"):
            lines.append(f"{r.name}: not Ready ({h.get('state') or 'unknown'}"
                         + (f": {h['detail']}" if h.get("detail") else "") + ")")
        if r.name in mesh_addresses:
            peers, now = parse_wg_dump(r.sections.get("mesh", ""))
            if not peers and len(mesh_addresses) > 1:
                lines.append(f"{r.name}: mesh interface {mesh.IFACE} has no peers")
            for p in peers:
                if p["allowed_ips"] in ("", "(none)"):
                    continue  # a pair routed through a relay (dcx.bootstrap.relay): no direct handshake expected
                age = now - p["latest_handshake"] if p["latest_handshake"] else None
                if age is None or age > HANDSHAKE_STALE_S:
                    ip = p["allowed_ips"].split(",")[0].split("/")[0]
                    who = by_address.get(ip, p["endpoint"])
                    when = "never" if age is None else f"{age} s ago"
                    lines.append(f"{r.name}: mesh peer {who} ({ip}): last handshake {when}")
        if r.clock_offset is not None and abs(r.clock_offset) > CLOCK_SKEW_S:
            lines.append(f"{r.name}: clock is {abs(r.clock_offset):.0f} s "
                         f"{'ahead of' if r.clock_offset > 0 else 'behind'} this machine's")
        for mount, pct in sorted(disk_usage(r.sections.get("disk", "")).items()):
            if pct > DISK_FULL_PCT:
                lines.append(f"{r.name}: disk {mount} is {pct}% full")
    return lines


# --- the command --------------------------------------------------------------------------------------


@dataclass
class Diagnosis:
    archive: Path
    findings: list[str]
    nodes: int
    unreachable: int


def diagnose(name: str, archive: Path | None = None, *, become_password: str | None = None,
             key_passphrase: str | None = None, parallel: int = 20, timeout: float = 120.0,
             store: StateStore | None = None) -> Diagnosis:
    from dcx import fleet
    from dcx.bootstrap.engines import get_engine
    from dcx.bootstrap.runtime import gather_facts

    store = store or StateStore()
    cdir = store.cluster(name)
    state = cdir.load()
    _register_local_secrets(cdir.path / "secrets")
    stamp = now_iso().replace(":", "").replace("-", "")
    archive = archive or Path(f"dcx-{name}-diagnose-{stamp}.tar.gz")
    check_output_file(archive, "the archive")
    nonce = secrets.token_hex(6)
    items = sections(state.engine)
    prefix = "mesh/address/"
    mesh_addresses = {k[len(prefix):]: v for k, v in state.resources.items() if k.startswith(prefix)}
    with fleet.connections(name, fleet.Selection(), parallel=parallel, become_password=become_password,
                           key_passphrase=key_passphrase, store=store, log_as="cluster diagnose") as ctx:

        def one(host: Host) -> NodeReport:
            r = NodeReport(host.name, host.node.role)
            try:
                connect_with_retry(host.conn, 15.0)
                r.reachable = True
                facts = gather_facts(host)
                host.facts = facts
                r.facts, r.clock_offset = asdict(facts), host.data.get("clock_offset")
                node_items = [(n, c) if n != "mesh" else (n, mesh_pings(host.name, mesh_addresses) + c)
                              for n, c in items]
                if state.engine == "k3s":
                    role = k3s.k3s_role(host.node.role)
                    node_items.append(("k3s-state", k3s.running_check(facts.init, role) + " && echo running=1"))
                out = host.run(collect_script(node_items, nonce), timeout=timeout).stdout
                r.sections = split_sections(out, nonce)
            except Exception as exc:  # noqa: BLE001 - an unreachable node is a finding, not a failure
                r.error = redact(getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}")
            return r

        reports = [r for _, r, _ in fan_out(one, ctx.hosts, ctx.parallel) if r is not None]
        health = _engine_health(ctx, state.engine, [r.name for r in reports if r.reachable], get_engine)
    found = findings(reports, health, mesh_addresses, state.engine)
    summary = "\n".join([f"dcx cluster diagnose {name} at {now_iso()}", f"engine: {state.engine}, id {state.id}",
                         f"nodes: {len(reports)}, unreachable: {sum(1 for r in reports if not r.reachable)}", "",
                         "what looks wrong:" if found else "nothing looks wrong"] + [f"  {f}" for f in found]) + "\n"
    members = {"summary.txt": summary,
               "cluster.json": json.dumps(json.loads(state.to_json()), indent=2) + "\n",
               "health.json": json.dumps(health, indent=2) + "\n"}
    for r in reports:
        base = f"nodes/{r.name}/"
        members[base + "facts.json"] = json.dumps({"reachable": r.reachable, "error": r.error, "role": r.role,
                                                   "clock_offset_s": r.clock_offset, "facts": r.facts}, indent=2)
        for section, text in r.sections.items():
            members[base + section + ".txt"] = text
    for path in sorted(cdir.logs_dir.glob("*.log")) if cdir.logs_dir.is_dir() else []:
        members[f"dcx-logs/{path.name}"] = _tail_bytes(path, LOCAL_LOG_BYTES)
    atomic_write(archive, build_archive(f"dcx-{name}-diagnose-{stamp}", members), mode=0o600)
    return Diagnosis(archive, found, len(reports), sum(1 for r in reports if not r.reachable))


def build_archive(top: str, members: dict[str, str]) -> bytes:
    """A tar.gz of text members under `top/`, each redacted, each 0600."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in members.items():
            data = redact_gathered(text).encode()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _engine_health(ctx: RunContext, engine: str, reachable: list[str], get_engine: Any) -> dict[str, Any]:
    """The engine's own view of every node (through a reachable control node), or why it is unknown."""
    hosts = [h for h in ctx.hosts if h.name in reachable]
    if not any(h.node.role == "control" for h in hosts):
        return {h.name: {"ready": False, "state": "unknown", "detail": "no reachable control node"} for h in ctx.hosts}
    sub = RunContext(ctx.cluster_name, ctx.spec, hosts, ctx.sessions, ctx.reporter, ctx.parallel)
    try:
        health = get_engine(engine).health(sub)
    except DcxError as exc:
        return {h.name: {"ready": False, "state": "unknown", "detail": exc.message} for h in ctx.hosts}
    except Exception as exc:  # noqa: BLE001 - the archive is still worth writing
        log.debug("engine health failed", exc_info=exc)
        return {h.name: {"ready": False, "state": "unknown", "detail": f"{type(exc).__name__}: {exc}"}
                for h in ctx.hosts}
    out = {n: {"ready": h.ready, "state": h.state, "detail": h.detail, "role": h.role} for n, h in health.items()}
    for h in ctx.hosts:
        out.setdefault(h.name, {"ready": False, "state": "unknown", "detail": "unreachable"})
    return out


def _register_local_secrets(secrets_dir: Path) -> None:
    """Secrets dcx keeps for the cluster (k3s token, kubeconfig): their values are redacted wherever
    they appear, whole or as any long word of them (a kubeconfig's key data)."""
    for path in sorted(secrets_dir.iterdir()) if secrets_dir.is_dir() else []:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        register_secret(text)
        for word in re.split(r"[\s:\"']+", text):
            if re.fullmatch(r"[A-Za-z0-9+/=_]{20,}", word) and any(c.isdigit() for c in word):
                register_secret(word)


def _tail_bytes(path: Path, limit: int) -> str:
    with path.open("rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(max(0, size - limit))
        return fh.read().decode(errors="replace")
