"""WireGuard mesh between nodes that sit in networks that cannot reach each other.

With `network.mesh: auto` a mesh is built when the cluster's nodes span more than one network
(providers, VPCs, subnets, sites); `wireguard` forces it, `none` turns it off. Every node gets the
interface `dcx0` with an address from `network.meshCIDR` (kept in state, so adding nodes never
renumbers), a key pair made on the node itself (the private key never leaves it; dcx collects the
public key), and every other node as a peer: at its private address when both sit in the same
network, else at its declared mesh endpoint, public address or SSH address, with a keepalive so
nodes behind NAT are reachable.

The config is a wg-quick file composed on the node (the private key is read there). wg-quick brings
it up through systemd (wg-quick@dcx0) where systemd runs, directly otherwise; wg-quick itself falls
back to wireguard-go where the kernel has no WireGuard. Peer changes are applied with `wg syncconf`
without restarting the interface. `Table = off`: the interface address covers the whole mesh range,
so no per-peer routes are needed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import time
from typing import Any

from dcx.bootstrap.phases import Host, Phase, RunContext
from dcx.errors import OperationFailed
from dcx.shell import q

IFACE = "dcx0"
KEY_DIR = "/etc/dcx/wireguard"
CONF = f"/etc/wireguard/{IFACE}.conf"
PUBLIC_CONF = f"{KEY_DIR}/{IFACE}.public.conf"  # the config without the private key: what dcx compares
MTU = 1420
KEEPALIVE = 25
HANDSHAKE_FRESH = 180  # seconds: WireGuard re-handshakes every 2 minutes on an active tunnel


def networks(ctx: RunContext) -> set[str]:
    return {h.node.network or f"{h.node.provider}:{h.name}" for h in ctx.hosts}


def mesh_wanted(ctx: RunContext) -> bool:
    mode = ctx.spec.spec.network.mesh
    if mode == "none":
        return False
    if mode == "wireguard":
        return True
    return len(networks(ctx)) > 1


def assign_addresses(cidr: str, names: list[str], taken: dict[str, str]) -> dict[str, str]:
    """Stable mesh addresses: nodes keep theirs; new nodes take the lowest free ones."""
    net = ipaddress.ip_network(cidr)
    out = {n: a for n, a in taken.items() if n in names and ipaddress.ip_address(a) in net}
    used = set(out.values())
    free = (str(ip) for ip in net.hosts() if str(ip) not in used)
    for name in sorted(names):
        if name not in out:
            try:
                out[name] = next(free)
            except StopIteration:
                raise OperationFailed(f"mesh range {cidr} has no free address for {name}") from None
    return out


def private_address(host: Host) -> str:
    """The address other nodes of the same network reach this node on."""
    facts = host.facts
    return host.node.private_address or (facts.primary_ip if facts is not None else "") or host.node.ssh_address


def peer_endpoint(me: Host, peer: Host, port: int) -> str:
    if me.node.network and me.node.network == peer.node.network:
        return f"{private_address(peer)}:{port}"
    if peer.node.mesh_endpoint:
        return peer.node.mesh_endpoint
    return f"{peer.node.public_address or peer.node.ssh_address}:{port}"


def render_public_conf(ctx: RunContext, me: Host) -> str:
    """Everything of dcx0's config but the private key (which the node adds itself)."""
    net = ipaddress.ip_network(ctx.spec.spec.network.meshCIDR)
    port = ctx.spec.spec.network.meshPort
    lines = [f"Address = {me.data['mesh_address']}/{net.prefixlen}", f"ListenPort = {port}", f"MTU = {MTU}",
             "Table = off", ""]
    for peer in sorted(ctx.hosts, key=lambda h: h.name):
        if peer is me:
            continue
        lines += [f"# {peer.name}", "[Peer]", f"PublicKey = {peer.data['mesh_pubkey']}",
                  f"AllowedIPs = {peer.data['mesh_address']}/32", f"Endpoint = {peer_endpoint(me, peer, port)}"]
        if me.node.network != peer.node.network or not me.node.network:
            lines.append(f"PersistentKeepalive = {KEEPALIVE}")
        lines.append("")
    return "\n".join(lines)


def wireguard_install_commands(facts: Any) -> list[str]:
    go = [] if facts.wg_kernel else ["wireguard-go"]
    family = facts.family
    if family == "debian":
        return ["export DEBIAN_FRONTEND=noninteractive", "apt-get update -q",
                "apt-get install -y -q wireguard-tools " + " ".join(go)]
    if family == "rhel":
        return ["dnf install -y wireguard-tools " + " ".join(go)]
    if family == "alpine":
        return ["apk add --no-cache wireguard-tools " + " ".join(go)]
    if family == "suse":
        return ["zypper --non-interactive install wireguard-tools " + " ".join(go)]
    if family == "arch":
        return ["pacman -Sy --noconfirm wireguard-tools " + " ".join(go)]
    raise OperationFailed(f"unsupported OS '{facts.os_id}' for the WireGuard mesh: install wireguard-tools first")


KEYGEN = (f"umask 077; mkdir -p {KEY_DIR} /etc/wireguard; "
          f"[ -s {KEY_DIR}/private.key ] || wg genkey > {KEY_DIR}/private.key; wg pubkey < {KEY_DIR}/private.key")


def up_commands(init: str) -> str:
    """Apply dcx0.conf: syncconf when the interface exists (peers change, tunnel stays), else bring it up."""
    start = (f"systemctl enable --now wg-quick@{IFACE}" if init == "systemd" else f"wg-quick up {IFACE}")
    return (f"if ip link show {IFACE} >/dev/null 2>&1; then "
            f"wg-quick strip {IFACE} > {KEY_DIR}/stripped.conf && wg syncconf {IFACE} {KEY_DIR}/stripped.conf; "
            f"else {start}; fi")


def write_conf_command() -> str:
    """Compose the config on the node: the private key is read there; the rest arrives on stdin."""
    return (f"umask 077; mkdir -p /etc/wireguard {KEY_DIR}; cat > {PUBLIC_CONF}.new && "
            f"{{ printf '[Interface]\\nPrivateKey = %s\\n' \"$(cat {KEY_DIR}/private.key)\"; cat {PUBLIC_CONF}.new; }}"
            f" > {CONF}.new && chmod 600 {CONF}.new && mv {CONF}.new {CONF} && mv {PUBLIC_CONF}.new {PUBLIC_CONF}")


class InstallWireGuard(Phase):
    title = "Install WireGuard"

    def needs_run(self, ctx: RunContext, host: Host) -> bool:
        return not host.facts.wg_bin or (not host.facts.wg_kernel and not host.facts.wggo_bin)

    def run(self, ctx: RunContext, host: Host) -> None:
        host.run("set -e; " + "; ".join(wireguard_install_commands(host.facts)), timeout=600, check=True,
                 what="installing wireguard")


class MeshKeys(Phase):
    title = "Make WireGuard keys on each node"

    def run(self, ctx: RunContext, host: Host) -> None:
        out = host.run(KEYGEN, timeout=60, check=True, what="making the WireGuard key").stdout.strip()
        host.data["mesh_pubkey"] = out.splitlines()[-1].strip()


class MeshConfigure(Phase):
    title = "Configure the WireGuard mesh"

    def needs_run(self, ctx: RunContext, host: Host) -> bool:
        want = hashlib.sha256(render_public_conf(ctx, host).encode()).hexdigest()
        probe = host.run(f"sha256sum {PUBLIC_CONF} 2>/dev/null; ip link show {IFACE} >/dev/null 2>&1 && echo up",
                         timeout=30).stdout
        return not (probe.startswith(want) and probe.rstrip().endswith("up"))

    def run(self, ctx: RunContext, host: Host) -> None:
        host.run(write_conf_command(), stdin=render_public_conf(ctx, host), timeout=60, check=True,
                 what="writing the WireGuard config")
        host.run(up_commands(host.facts.init), timeout=120, check=True, what="bringing up WireGuard")


class MeshVerify(Phase):
    """Every node must have a fresh handshake with every peer before the engine relies on the mesh."""

    title = "Verify the mesh (handshakes with every peer)"
    read_only = True
    timeout = 60.0

    def run(self, ctx: RunContext, host: Host) -> None:
        expected = {h.data["mesh_pubkey"]: h.name for h in ctx.hosts if h is not host}
        deadline = time.monotonic() + self.timeout
        while True:
            # Traffic makes handshakes happen now rather than at the next keepalive.
            pings = " ".join(f"ping -c1 -W1 {q(h.data['mesh_address'])} >/dev/null 2>&1 &" for h in ctx.hosts
                             if h is not host)
            host.run(f"{pings} wait", timeout=30)
            fresh = handshakes(host)
            missing = [name for key, name in expected.items() if key not in fresh]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise OperationFailed(
                    f"no WireGuard handshake with {', '.join(sorted(missing))} after {self.timeout:.0f}s: check that "
                    f"UDP {ctx.spec.spec.network.meshPort} reaches those nodes (firewall, NAT port forward, or set "
                    "their mesh endpoint: inventory dcx_mesh_endpoint=HOST:PORT)")
            time.sleep(1.0)


def handshakes(host: Host) -> dict[str, int]:
    """Peers (public keys) with a handshake in the last HANDSHAKE_FRESH seconds -> age in seconds."""
    out = host.run(f"wg show {IFACE} latest-handshakes; echo now=$(date +%s)", timeout=30).stdout
    now = 0
    rows = []
    for line in out.splitlines():
        if line.startswith("now="):
            now = int(line[4:] or 0)
        elif line.strip():
            key, _, stamp = line.partition("\t")
            rows.append((key.strip(), int(stamp.strip() or 0)))
    return {k: now - t for k, t in rows if t and now - t <= HANDSHAKE_FRESH}


def mesh_phases(ctx: RunContext) -> list[Phase]:
    if not mesh_wanted(ctx):
        return []
    return [InstallWireGuard(), MeshKeys(), MeshConfigure(), MeshVerify()]


class MeshReset(Phase):
    title = "Remove the WireGuard mesh"

    def run(self, ctx: RunContext, host: Host) -> None:
        host.run(f"systemctl disable --now wg-quick@{IFACE} >/dev/null 2>&1; "
                 f"wg-quick down {IFACE} >/dev/null 2>&1; ip link del {IFACE} >/dev/null 2>&1; "
                 f"rm -rf {KEY_DIR} {CONF}; true", timeout=60)


def mesh_reset_phases(ctx: RunContext) -> list[Phase]:
    return [MeshReset()]


def mesh_health(ctx: RunContext, addresses: dict[str, str], timeout: float = 10.0) -> dict[str, dict[str, Any]]:
    """For `dcx cluster status`: per node, how many of its expected peers had a recent handshake.

    A quick ping to every peer first, so an idle but healthy tunnel handshakes now rather than being
    reported stale. Peers are counted by what the node's interface holds; expected is every other
    node with a mesh address."""
    from dcx.bootstrap.ssh import connect_with_retry, fan_out

    def one(host: Host) -> dict[str, Any]:
        row: dict[str, Any] = {"address": addresses.get(host.name, ""), "peers_expected": 0, "peers_up": 0}
        if not row["address"]:
            return row
        peers = [a for n, a in addresses.items() if n != host.name]
        row["peers_expected"] = len(peers)
        try:
            connect_with_retry(host.conn, timeout)
            pings = " ".join(f"ping -c1 -W1 {q(a)} >/dev/null 2>&1 &" for a in peers)
            host.run(f"{pings} wait", timeout=30)
            row["peers_up"] = len(handshakes(host))
        except Exception as exc:  # noqa: BLE001 - reported in the row
            row["error"] = getattr(exc, "message", str(exc))
        return row

    return {h.name: row or {"error": str(err)} for h, row, err in fan_out(one, ctx.hosts, ctx.parallel)}
