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

Pairs with no direct path (two sites with no inbound path) go through a relay: dcx.bootstrap.relay.

"Configured" is decided from the interface itself (up, its address, MTU and port, its key, every
peer's key, AllowedIPs and keepalive, read with `wg show dcx0 dump` on the node and never printing the
private key) and from the file dcx last applied, renamed into place only after it was applied: a run
killed at any instant leaves something the next run sees as not done.
"""

from __future__ import annotations

import hashlib
import ipaddress
import time
from typing import Any

from dcx.bootstrap.phases import Host, Phase, RunContext, kill_point
from dcx.bootstrap.runtime import DPKG_FINISH
from dcx.errors import OperationFailed
from dcx.shell import q

IFACE = "dcx0"
KEY_DIR = "/etc/dcx/wireguard"
CONF = f"/etc/wireguard/{IFACE}.conf"
PUBLIC_CONF = f"{KEY_DIR}/{IFACE}.public.conf"  # the config without the private key: what dcx compares
MTU = 1420
KEEPALIVE = 25


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
    from dcx.bootstrap.relay import conf_allowed_ips, conf_hooks

    lines = [f"Address = {me.data['mesh_address']}/{net.prefixlen}", f"ListenPort = {port}", f"MTU = {MTU}",
             "Table = off", *conf_hooks(ctx, me), ""]
    allowed = conf_allowed_ips(ctx, me)  # a pair routed through a relay: the relay's entry carries it
    for peer in sorted(ctx.hosts, key=lambda h: h.name):
        if peer is me:
            continue
        ips = ", ".join(f"{a}/32" for a in allowed[peer.name])
        lines += [f"# {peer.name}", "[Peer]", f"PublicKey = {peer.data['mesh_pubkey']}",
                  *([f"AllowedIPs = {ips}"] if ips else []), f"Endpoint = {peer_endpoint(me, peer, port)}"]
        if me.node.network != peer.node.network or not me.node.network:
            lines.append(f"PersistentKeepalive = {KEEPALIVE}")
        lines.append("")
    return "\n".join(lines)


def wireguard_install_commands(facts: Any) -> list[str]:
    go = [] if facts.wg_kernel else ["wireguard-go"]
    family = facts.family
    if family == "debian":
        return ["export DEBIAN_FRONTEND=noninteractive", *DPKG_FINISH, "apt-get update -q",
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


# Made under a temporary name and renamed: a run killed meanwhile never leaves a partial key behind.
KEYGEN = (f"umask 077; mkdir -p {KEY_DIR} /etc/wireguard; [ -s {KEY_DIR}/private.key ] || "
          f"{{ wg genkey > {KEY_DIR}/private.key.new && mv {KEY_DIR}/private.key.new {KEY_DIR}/private.key; }}; "
          f"wg pubkey < {KEY_DIR}/private.key")


STRIPPED = f"{KEY_DIR}/stripped.conf"


def apply_command(init: str, restart: bool) -> str:
    """Compose the config on the node (the private key is read there; the rest arrives on stdin), apply
    it, and only then rename the public copy into place: that copy is what dcx compares next time.

    `restart` (the interface is missing, down or has the wrong address, MTU or port): take it down and
    bring it up from the new file. Otherwise only peers differ: `wg syncconf` changes them without
    restarting the tunnel."""
    compose = (f"umask 077; set -e; mkdir -p /etc/wireguard {KEY_DIR}; cat > {PUBLIC_CONF}.new; "
               f"{{ printf '[Interface]\\nPrivateKey = %s\\n' \"$(cat {KEY_DIR}/private.key)\"; "
               f"cat {PUBLIC_CONF}.new; }} > {CONF}.new; mv {CONF}.new {CONF}")  # wg-quick reads it by name
    if not restart:
        apply = f"wg-quick strip {IFACE} > {STRIPPED}; wg syncconf {IFACE} {STRIPPED}; rm -f {STRIPPED}"
        if init == "systemd":
            apply += f"; systemctl is-enabled -q wg-quick@{IFACE} || systemctl enable -q wg-quick@{IFACE}"
    elif init == "systemd":
        apply = (f"systemctl stop wg-quick@{IFACE} >/dev/null 2>&1 || true; ip link del {IFACE} >/dev/null 2>&1 "
                 f"|| true; systemctl reset-failed wg-quick@{IFACE} >/dev/null 2>&1 || true; "
                 f"systemctl enable --now wg-quick@{IFACE}")
    else:
        apply = (f"wg-quick down {IFACE} >/dev/null 2>&1 || true; ip link del {IFACE} >/dev/null 2>&1 || true; "
                 f"wg-quick up {IFACE}")
    return f"{compose}; {apply}; mv {PUBLIC_CONF}.new {PUBLIC_CONF}; rm -f {STRIPPED}"  # older dcx left it 0644


# What the node's interface holds, without its private key: the dump's first line is the interface
# (private key, public key, port, fwmark), the others are peers (public key, preshared key, endpoint,
# allowed ips, latest handshake, rx, tx, keepalive) -- wg(8), `wg show ... dump`.
FACTS_COMMAND = (
    f"ip -o link show dev {IFACE} 2>/dev/null | sed -n 's/^[0-9]*: [^:]*: <\\([^>]*\\)>.* mtu \\([0-9]*\\).*/"
    f"link=\\1 \\2/p'; "
    f"ip -o -4 addr show dev {IFACE} 2>/dev/null | awk '{{print \"addr=\" $4}}'; "
    f"wg show {IFACE} dump 2>/dev/null | awk -F '\\t' 'NR==1 {{print \"self=\" $2 \" \" $3; next}} "
    f"{{print \"peer=\" $1 \" \" $4 \" \" $8}}'; "
    f"echo \"conf=$(sha256sum {PUBLIC_CONF} 2>/dev/null | cut -d' ' -f1)\"")


def parse_link_facts(text: str) -> dict[str, Any]:
    """FACTS_COMMAND's output: flags, mtu, addresses, self (key, port), peers {key: (ips, keepalive)}, conf."""
    out: dict[str, Any] = {"flags": set(), "mtu": "", "addresses": [], "self": None, "peers": {}, "conf": ""}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "link":
            flags, _, mtu = value.partition(" ")
            out["flags"], out["mtu"] = set(flags.split(",")), mtu
        elif key == "addr":
            out["addresses"].append(value)
        elif key == "self":
            out["self"] = tuple(value.split(" ", 1))
        elif key == "peer":
            fields = value.split(" ")
            if len(fields) == 3:
                out["peers"][fields[0]] = (",".join(sorted(fields[1].split(","))), fields[2])
        elif key == "conf":
            out["conf"] = value
    return out


def wanted_link(conf: str, pubkey: str) -> dict[str, Any]:
    """What the interface must hold for the public config `conf` (as render_public_conf makes it)."""
    want: dict[str, Any] = {"peers": {}}
    peer: dict[str, str] | None = None
    for raw in conf.splitlines() + ["[Peer]"]:
        line = raw.strip()
        if line == "[Peer]":
            if peer and peer.get("PublicKey"):
                ips = ",".join(sorted(a.strip() for a in peer.get("AllowedIPs", "").split(",") if a.strip()))
                want["peers"][peer["PublicKey"]] = (ips or "(none)", peer.get("PersistentKeepalive", "off"))
            peer = {}
            continue
        key, sep, value = line.partition(" = ")
        if not sep:
            continue
        if peer is None:
            want[key] = value
        else:
            peer[key] = value
    want["self"] = (pubkey, want.get("ListenPort", ""))
    return want


def link_differences(facts: dict[str, Any], want: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(what needs the interface restarted, what `wg syncconf` fixes): empty lists when it is as configured."""
    restart = []
    if facts["self"] is None:
        restart.append(f"{IFACE} is missing" if not facts["flags"] else f"{IFACE} has no WireGuard device behind it")
    elif facts["self"] != want["self"]:
        restart.append(f"{IFACE} has another key or port")
    if facts["flags"] and "UP" not in facts["flags"]:
        restart.append(f"{IFACE} is down")
    if facts["flags"] and facts["addresses"] != [want.get("Address")]:
        restart.append(f"{IFACE} has address {' '.join(facts['addresses']) or 'none'}, not {want.get('Address')}")
    if facts["flags"] and facts["mtu"] != want.get("MTU"):
        restart.append(f"{IFACE} has MTU {facts['mtu']}, not {want.get('MTU')}")
    sync = []
    if facts["peers"] != want["peers"]:
        have, need = set(facts["peers"].items()), set(want["peers"].items())
        sync.append(f"{len(need - have)} peer(s) to set, {len(have - need)} to change or remove")
    return restart, sync


def read_link(host: Host) -> dict[str, Any]:
    return parse_link_facts(host.run(FACTS_COMMAND, timeout=30).stdout)


class InstallWireGuard(Phase):
    title = "Install WireGuard"
    pipelined = True  # after its own runtime

    def needs_run(self, ctx: RunContext, host: Host) -> bool:
        return (not host.facts.wg_bin or (not host.facts.wg_kernel and not host.facts.wggo_bin)
                or host.facts.packages_interrupted)

    def run(self, ctx: RunContext, host: Host) -> None:
        host.run("set -e; " + "; ".join(wireguard_install_commands(host.facts)), timeout=600, check=True,
                 what="installing wireguard")


class MeshKeys(Phase):
    """Done when the node has a key whose public half can be read (dcx collects it either way)."""

    title = "Make WireGuard keys on each node"
    pipelined = True  # the key exchange (Configure) is the barrier

    def needs_run(self, ctx: RunContext, host: Host) -> bool:
        out = host.run(f"wg pubkey < {KEY_DIR}/private.key", timeout=60)
        if out.ok and out.stdout.strip():
            host.data["mesh_pubkey"] = out.stdout.strip().splitlines()[-1].strip()
            return False
        return True

    def run(self, ctx: RunContext, host: Host) -> None:
        out = host.run(KEYGEN, timeout=60, check=True, what="making the WireGuard key").stdout.strip()
        host.data["mesh_pubkey"] = out.splitlines()[-1].strip()


class MeshConfigure(Phase):
    """Done when the interface holds the config (see link_differences) and the file dcx applied last is
    the one wanted; a node where either differs gets the config written and applied again."""

    title = "Configure the WireGuard mesh"

    def needs_run(self, ctx: RunContext, host: Host) -> bool:
        conf = render_public_conf(ctx, host)
        facts = read_link(host)
        restart, sync = link_differences(facts, wanted_link(conf, host.data["mesh_pubkey"]))
        host.data["mesh_restart"] = bool(restart)
        return bool(restart or sync) or facts["conf"] != hashlib.sha256(conf.encode()).hexdigest()

    def run(self, ctx: RunContext, host: Host) -> None:
        conf = render_public_conf(ctx, host)
        kill_point("mesh:before-apply")
        host.run(apply_command(host.facts.init, host.data.get("mesh_restart", True)), stdin=conf, timeout=120,
                 check=True, what="applying the WireGuard config")
        kill_point("mesh:after-apply")
        restart, sync = link_differences(read_link(host), wanted_link(conf, host.data["mesh_pubkey"]))
        if restart or sync:
            raise OperationFailed(f"the WireGuard config was applied but {IFACE} does not hold it: "
                                  + "; ".join(restart + sync))


PING_WAIT = 2  # seconds a peer has to answer over the mesh (one ping a second until then)


def ping_command(addresses: list[str]) -> str:
    """One ping per peer, all at once; prints `up ADDR` or `down ADDR` for each. A reply means the peer
    answers over the tunnel now (a handshake can be minutes old on a path that is gone)."""
    each = [f"{{ ping -n -q -c 1 -w {PING_WAIT} {q(a)} >/dev/null 2>&1 && echo up {q(a)} || echo down {q(a)}; }} &"
            for a in addresses]
    return " ".join(each + ["wait"])


def parse_pings(text: str) -> dict[str, bool]:
    return {parts[1]: parts[0] == "up" for parts in (line.split() for line in text.splitlines())
            if len(parts) == 2 and parts[0] in ("up", "down")}


class MeshVerify(Phase):
    """Every node must reach every peer over the mesh before the engine relies on it."""

    title = "Verify the mesh (every peer answers)"
    read_only = True
    timeout = 60.0

    def run(self, ctx: RunContext, host: Host) -> None:
        peers = {h.data["mesh_address"]: h for h in ctx.hosts if h is not host}
        deadline = time.monotonic() + self.timeout
        while True:
            # The first packets also make WireGuard handshake now rather than at the next keepalive.
            answered = parse_pings(host.run(ping_command(list(peers)), timeout=30).stdout)
            missing = [h for a, h in peers.items() if not answered.get(a)]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise OperationFailed(self._why(ctx, host, missing))
            time.sleep(1.0)

    def _why(self, ctx: RunContext, host: Host, missing: list[Host]) -> str:
        """A node whose interface is down is named as such; only then are UDP paths suspected."""
        names = ", ".join(sorted(h.name for h in missing))
        down = [h.name for h in [host, *missing] if not link_up(h)]
        if down:
            return (f"no answer over the mesh from {names} after {self.timeout:.0f}s: {IFACE} is not up on "
                    f"{', '.join(down)} (a re-run brings it up)")
        relay = ("; or let dcx route such pairs through a node both reach: spec.network.relays: auto"
                 if ctx.spec.spec.network.relays == "none"
                 else "; no node allowed by spec.network.relays reaches both directly")
        return (f"no answer over the mesh from {names} after {self.timeout:.0f}s: check that UDP "
                f"{ctx.spec.spec.network.meshPort} reaches those nodes (firewall, NAT port forward, or set their "
                "mesh endpoint: inventory dcx_mesh_endpoint=HOST:PORT)" + relay)


def link_up(host: Host) -> bool:
    try:
        facts = read_link(host)
    except Exception:  # noqa: BLE001 - a node that cannot be asked is not up either
        return False
    return "UP" in facts["flags"] and facts["self"] is not None


def mesh_phases(ctx: RunContext) -> list[Phase]:
    if not mesh_wanted(ctx):
        return []
    from dcx.bootstrap.relay import relay_phases

    return [InstallWireGuard(), MeshKeys(), MeshConfigure(), *relay_phases(ctx), MeshVerify()]


class MeshReset(Phase):
    title = "Remove the WireGuard mesh"

    def run(self, ctx: RunContext, host: Host) -> None:
        host.run(f"systemctl disable --now wg-quick@{IFACE} >/dev/null 2>&1; "
                 f"wg-quick down {IFACE} >/dev/null 2>&1; ip link del {IFACE} >/dev/null 2>&1; "
                 f"rm -rf {KEY_DIR} {CONF}; true", timeout=60)


def mesh_reset_phases(ctx: RunContext) -> list[Phase]:
    return [MeshReset()]


def probe_command(peers: list[str]) -> str:
    """For `dcx cluster status`: the interface's state and address, and which peers answer now."""
    return (f"ip -o link show dev {IFACE} 2>/dev/null | sed -n 's/^[0-9]*: [^:]*: <\\([^>]*\\)>.*/link=\\1/p'; "
            f"ip -o -4 addr show dev {IFACE} 2>/dev/null | awk '{{print \"addr=\" $4}}'; " + ping_command(peers))


def parse_probe(text: str, address: str, peers: dict[str, str]) -> dict[str, Any]:
    """The status row of one node: `peers` is name -> mesh address of every other node. A peer is up
    only when it answered a ping over the mesh just now."""
    flags: set[str] = set()
    addresses = []
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "link":
            flags = set(value.split(","))
        elif key == "addr":
            addresses.append(value.split("/")[0])
    answered = parse_pings(text)
    link = "absent" if not flags else ("up" if "UP" in flags and address in addresses else "down")
    down = sorted(n for n, a in peers.items() if not answered.get(a))
    return {"address": address, "link": link, "peers_expected": len(peers), "peers_up": len(peers) - len(down),
            "peers_down": down}
