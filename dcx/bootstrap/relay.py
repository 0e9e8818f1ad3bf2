"""Relays: mesh pairs with no direct path, routed through a node that both ends reach.

Two sites with no inbound path (a shop behind carrier-grade NAT, a 4G router, an office behind two
NATs) never handshake with each other: each one's packets reach only the other's NAT. After the mesh
is configured, every node pings every peer over dcx0 (`MeshReach`); a pair that never answers in
REACH_WINDOW seconds gets a relay (`MeshRelays`): a node that answered both ends directly, preferring
control nodes with a declared endpoint (public address or a forwarded mesh endpoint), then the fewest
pairs relayed already, so that pairs spread over the candidates.

How a pair A-B goes through R (WireGuard routes by AllowedIPs; `Table = off` and the /16 on dcx0 send
every mesh address into the tunnel):
- on A, R's peer entry also holds B's /32 and B's own entry none (it keeps its endpoint and keepalive:
  WireGuard keeps trying the direct path, nothing is routed over it); on B the same with A;
- R forwards between its peers: net.ipv4.ip_forward=1 and an iptables FORWARD accept for dcx0 -> dcx0
  (Docker sets FORWARD's policy to DROP), applied now and kept in dcx0's config as PostUp/PostDown so
  that a rebooted relay forwards again. R's own entries stay as they are.

The decision is recorded in state (`mesh/relay/A,B` -> R): a re-run keeps a route while its relay is
still in the cluster, allowed by `spec.network.relays` and answered directly by both ends, and while
A and B have no direct path (see DIRECT_TRY); otherwise the pair is decided again (a lost
relay is replaced by another one, a pair that reaches itself again goes direct). Only one hop: a
relay's own legs are direct pairs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from dcx.bootstrap.mesh import IFACE, MeshConfigure, parse_pings, ping_command
from dcx.bootstrap.phases import Host, Phase, RunContext
from dcx.shell import q

Pair = tuple[str, str]
PREFIX = "mesh/relay/"
REACH_WINDOW = 20.0  # seconds a pair has to answer directly before it is relayed (WireGuard retries every 5 s;
#                     under load the first tries can be lost)
# A relayed pair's own entries keep their endpoints and keepalive, so that whether the direct path works
# again can be seen: each run re-creates this node's own entry for a relayed peer (nothing is routed over
# it: no AllowedIPs), which makes WireGuard send a handshake there at once (the keepalive) and again after
# 5 s (REKEY_TIMEOUT). A handshake within DIRECT_TRY seconds means the pair reaches each other directly.
# (A handshake time alone tells nothing: one made over a path that has just gone stays for minutes.)
DIRECT_TRY = 7.0


def pair(a: str, b: str) -> Pair:
    return (a, b) if a < b else (b, a)


@dataclass(frozen=True)
class Candidate:
    """What the choice knows of a node: its role and whether others can reach it at a declared endpoint."""

    name: str
    control: bool = False
    endpoint: bool = False  # a public address or a (forwarded) mesh endpoint


def choose_routes(nodes: list[Candidate], direct: set[Pair], mode: str | list[str],
                  recorded: dict[Pair, str]) -> tuple[dict[Pair, str], list[Pair]]:
    """(routes pair -> relay, pairs left without one) for every pair of `nodes` not in `direct`.

    `direct` holds the pairs that answered each other directly just now; `recorded` the routes of the
    last run, kept while still valid (stable routes); `mode` is spec.network.relays ("auto", "none" or
    the names allowed to relay). A new pair takes, among the nodes both ends reach directly, a control
    node before a worker, one with a declared endpoint before one without, then the one relaying the
    fewest pairs so far, then by name."""
    names = {n.name for n in nodes}
    allowed = set() if mode == "none" else names if mode == "auto" else names & set(mode)
    wanted = sorted(pair(a, b) for a in names for b in names if a < b and pair(a, b) not in direct)

    def reaches_both(r: str, p: Pair) -> bool:
        return r not in p and r in allowed and pair(r, p[0]) in direct and pair(r, p[1]) in direct

    routes = {p: r for p, r in recorded.items() if p in wanted and reaches_both(r, p)}
    load = {n: 0 for n in names}
    for r in routes.values():
        load[r] += 1
    rank = {n.name: (not n.control, not n.endpoint) for n in nodes}
    unroutable = []
    for p in wanted:
        if p in routes:
            continue
        candidates = [r for r in sorted(allowed) if reaches_both(r, p)]
        if not candidates:
            unroutable.append(p)
            continue
        best = min(candidates, key=lambda r: (*rank[r], load[r], r))
        routes[p] = best
        load[best] += 1
    return routes, unroutable


def allowed_ips(me: str, addresses: dict[str, str], routes: dict[Pair, str]) -> dict[str, list[str]]:
    """Per peer of `me`, the mesh addresses its WireGuard entry carries: its own, unless the pair is
    relayed; a relay's entry also carries the address of every node reached through it."""
    out = {p: [] if pair(me, p) in routes else [addresses[p]] for p in addresses if p != me}
    for (a, b), r in sorted(routes.items()):
        if me in (a, b) and r in out:
            other = b if me == a else a
            out[r].append(addresses[other])
    return {p: sorted(ips, key=_ip_key) for p, ips in out.items()}


def _ip_key(address: str) -> tuple[int, ...]:
    return tuple(int(x) for x in address.split(".")) if address.count(".") == 3 else (0,)


def relays_of(routes: dict[Pair, str]) -> set[str]:
    return set(routes.values())


def peer_paths(me: str, peers: list[str], routes: dict[Pair, str]) -> dict[str, Any]:
    """For status: which peers `me` reaches directly and which through which relay."""
    relayed = {p: routes[pair(me, p)] for p in sorted(peers) if pair(me, p) in routes}
    return {"direct": [p for p in sorted(peers) if p not in relayed], "relayed": relayed}


def routes_from_resources(resources: dict[str, Any]) -> dict[Pair, str]:
    out = {}
    for key, relay in resources.items():
        if key.startswith(PREFIX) and isinstance(relay, str):
            a, _, b = key[len(PREFIX):].partition(",")
            if a and b:
                out[pair(a, b)] = relay
    return out


def key(p: Pair) -> str:
    return f"{PREFIX}{p[0]},{p[1]}"


# --- state and the run's context ------------------------------------------------------------------

def load_routes(ctx: RunContext, resources: dict[str, Any], journal: Any, cluster_id: str) -> None:
    """Before the mesh phases: the recorded routes whose ends and relay are still in the cluster (and
    allowed by spec.network.relays) become this run's routes; the others are forgotten."""
    names = {h.name for h in ctx.hosts}
    mode = ctx.spec.spec.network.relays
    routes = {}
    for p, r in routes_from_resources(resources).items():
        usable = {p[0], p[1], r} <= names and mode != "none" and (mode == "auto" or r in mode)
        if usable:
            routes[p] = r
        else:
            journal(key(p), None)
    ctx.shared["mesh_routes"] = routes
    ctx.shared["mesh_journal"] = journal
    ctx.shared["cluster_id"] = cluster_id


def current_routes(ctx: RunContext) -> dict[Pair, str]:
    return ctx.shared.get("mesh_routes", {})


def conf_allowed_ips(ctx: RunContext, me: Host) -> dict[str, list[str]]:
    """render_public_conf's AllowedIPs per peer name, with this run's routes."""
    addresses = {h.name: h.data["mesh_address"] for h in ctx.hosts}
    return allowed_ips(me.name, addresses, current_routes(ctx))


def forward_spec(ctx: RunContext) -> str:
    """The FORWARD rule a relay holds (iptables arguments after the chain), tagged with the cluster."""
    tag = f"dcx relay {ctx.cluster_name} {ctx.shared.get('cluster_id', '')}".strip()
    return f"-i {IFACE} -o {IFACE} -m comment --comment {q(tag)} -j ACCEPT"


def conf_hooks(ctx: RunContext, me: Host) -> list[str]:
    """Interface lines for a relay's dcx0 config: wg-quick runs them when the interface comes up or
    goes down (a rebooted relay forwards again); `wg-quick strip` leaves them out of `wg syncconf`."""
    if me.name not in relays_of(current_routes(ctx)):
        return []
    return [f"PostUp = {enable_forwarding(ctx)}", f"PostDown = {disable_forwarding(ctx)}"]


def enable_forwarding(ctx: RunContext) -> str:
    spec = forward_spec(ctx)
    return ("sysctl -q -w net.ipv4.ip_forward=1; if command -v iptables >/dev/null; then "
            f"iptables -C FORWARD {spec} 2>/dev/null || iptables -I FORWARD 1 {spec}; fi; true")


def disable_forwarding(ctx: RunContext) -> str:
    """Only dcx's rule goes: ip_forward stays as it is (Docker and k3s need it on)."""
    spec = forward_spec(ctx)
    return f"if command -v iptables >/dev/null; then while iptables -D FORWARD {spec} 2>/dev/null; do :; done; fi; true"


def forwarding_command(ctx: RunContext) -> str:
    """Prints `forward=0|1` and `rule=yes|no|none` (none: no iptables on the node)."""
    return (f"echo forward=$(cat /proc/sys/net/ipv4/ip_forward 2>/dev/null); if command -v iptables >/dev/null; "
            f"then iptables -C FORWARD {forward_spec(ctx)} 2>/dev/null && echo rule=yes || echo rule=no; "
            "else echo rule=none; fi")


def forwarding_ok(text: str, relay: bool) -> bool:
    facts = dict(line.partition("=")[::2] for line in text.split())
    if relay:
        return facts.get("forward") == "1" and facts.get("rule") in ("yes", "none")
    return facts.get("rule") != "yes"


# --- phases ---------------------------------------------------------------------------------------

class MeshReach(Phase):
    """Which peers answer this node over the mesh (directly, or through this run's relays): every
    peer is pinged until it answers or REACH_WINDOW passes. Nothing fails here: MeshRelays decides."""

    title = "Find which mesh peers answer"
    read_only = True

    def run(self, ctx: RunContext, host: Host) -> None:
        peers = {h.data["mesh_address"]: h.name for h in ctx.hosts if h is not host}
        relayed = {h.data["mesh_pubkey"]: h.name for h in ctx.hosts
                   if h is not host and pair(host.name, h.name) in current_routes(ctx)}
        answered: set[str] = set()
        started = time.monotonic()
        deadline = started + REACH_WINDOW
        retried = retry_direct(host, relayed)
        while True:
            asked = [a for a, n in peers.items() if n not in answered]
            got = parse_pings(host.run(ping_command(asked), timeout=30).stdout) if asked else {}
            answered |= {peers[a] for a, ok in got.items() if ok and a in peers}
            if len(answered) == len(peers) or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        # A relayed peer answers through its relay: whether the direct path works again shows in the
        # handshakes of its own, re-created entry.
        direct_again: set[str] = set()
        while retried:
            direct_again = handshaken(host, retried)
            if direct_again == set(retried.values()) or time.monotonic() - started > DIRECT_TRY:
                break
            time.sleep(1.0)
        with ctx.lock:
            ctx.shared.setdefault("mesh_answered", {})[host.name] = answered
            ctx.shared.setdefault("mesh_direct_again", {})[host.name] = direct_again


def retry_direct_command(keys: list[str]) -> str:
    """Re-create this node's entry for each peer in `keys` with its endpoint and keepalive as they are and
    no AllowedIPs (as a relayed pair's entry is); prints `reset KEY` for each one re-created."""
    parts = []
    for k in keys:
        key = q(k)
        parts.append(
            f"e=$(wg show {IFACE} endpoints | awk -v k={key} '$1 == k {{print $2}}'); "
            f"ka=$(wg show {IFACE} persistent-keepalive | awk -v k={key} '$1 == k {{print $2}}'); "
            f"[ -n \"$ka\" ] && wg set {IFACE} peer {key} remove && "
            f"wg set {IFACE} peer {key} allowed-ips '' persistent-keepalive \"$ka\" "
            f"$([ \"$e\" != '(none)' ] && [ -n \"$e\" ] && echo endpoint \"$e\") && echo reset {key}")
    return "; ".join(parts) + "; true"


def retry_direct(host: Host, keys: dict[str, str]) -> dict[str, str]:
    """The peers (public key -> name) whose entry was re-created (see DIRECT_TRY)."""
    if not keys:
        return {}
    out = host.run(retry_direct_command(sorted(keys)), timeout=30).stdout
    done = {line.split()[1] for line in out.splitlines() if len(line.split()) == 2 and line.startswith("reset ")}
    return {k: n for k, n in keys.items() if k in done}


def handshaken(host: Host, keys: dict[str, str]) -> set[str]:
    return handshakes_made(host.run(f"wg show {IFACE} latest-handshakes", timeout=30).stdout, keys)


def handshakes_made(text: str, keys: dict[str, str]) -> set[str]:
    """The peers of `keys` (public key -> name) whose entry has made a handshake (0: never)."""
    lines = [line.split() for line in text.splitlines()]
    return {keys[p[0]] for p in lines if len(p) == 2 and p[0] in keys and p[1].isdigit() and int(p[1]) > 0}


def candidates(ctx: RunContext) -> list[Candidate]:
    return [Candidate(h.name, h.node.role == "control", bool(h.node.public_address or h.node.mesh_endpoint))
            for h in ctx.hosts]


def decide(ctx: RunContext) -> tuple[dict[Pair, str], list[Pair]]:
    """This run's routes from what MeshReach saw: a pair answered without a relay is direct; a relayed
    pair stays as it is while its relay still reaches both ends directly."""
    mode = ctx.spec.spec.network.relays
    answered = ctx.shared.get("mesh_answered")
    recorded = current_routes(ctx)
    if mode == "none" or answered is None:
        return {}, []
    works = {pair(a, b) for a, peers in answered.items() for b in peers}
    again = {pair(a, b) for a, peers in ctx.shared.get("mesh_direct_again", {}).items() for b in peers}
    direct = {p for p in works if p not in recorded} | (again & set(recorded))
    return choose_routes(candidates(ctx), direct, mode, recorded)


class MeshRelays(MeshConfigure):
    """Done when every node's dcx0 holds the routes decided (see MeshConfigure) and exactly the relays
    forward between their peers."""

    title = "Route pairs without a direct path through relays"

    def prepare(self, ctx: RunContext) -> None:
        before = current_routes(ctx)
        routes, unroutable = decide(ctx)
        journal = ctx.shared.get("mesh_journal")
        for p in sorted(set(before) | set(routes)):
            if before.get(p) != routes.get(p) and journal is not None:
                journal(key(p), routes.get(p))
        for p, r in sorted(routes.items()):
            if before.get(p) != r:
                ctx.reporter.note(f"mesh: {p[0]} and {p[1]} do not reach each other directly; relayed through {r}")
        for p in sorted(set(before) - set(routes)):
            if p not in unroutable:
                ctx.reporter.note(f"mesh: {p[0]} and {p[1]} reach each other directly again; no longer relayed")
        for a, b in unroutable:
            ctx.reporter.note(f"mesh: {a} and {b} do not reach each other and no node reaches both")
        mode = ctx.spec.spec.network.relays
        unknown = sorted(set(mode) - {h.name for h in ctx.hosts}) if isinstance(mode, list) else []
        if unknown:
            ctx.reporter.note(f"warning: spec.network.relays names {', '.join(unknown)}: not nodes of this cluster")
        ctx.shared["mesh_routes"] = routes

    def needs_run(self, ctx: RunContext, host: Host) -> bool:
        conf = super().needs_run(ctx, host)
        host.data["mesh_conf_differs"] = conf
        relay = host.name in relays_of(current_routes(ctx))
        forwarding = forwarding_ok(host.run(forwarding_command(ctx), timeout=30).stdout, relay)
        return conf or not forwarding

    def run(self, ctx: RunContext, host: Host) -> None:
        # The relay forwards before the ends send through it.
        relay = host.name in relays_of(current_routes(ctx))
        host.run(enable_forwarding(ctx) if relay else disable_forwarding(ctx), timeout=60, check=True,
                 what="setting up forwarding between mesh peers" if relay else "removing the relay's forwarding")
        if host.data.get("mesh_conf_differs", True):
            super().run(ctx, host)


def relay_phases(ctx: RunContext) -> list[Phase]:
    """After MeshConfigure, before MeshVerify. With relays: none, only MeshRelays (it removes what an
    earlier run with relays set up)."""
    reach: list[Phase] = [] if ctx.spec.spec.network.relays == "none" else [MeshReach()]
    return [*reach, MeshRelays()]
