"""A restored manager's raft address, and how the other managers get past it.

`docker swarm init --force-new-cluster` on a restored raft directory keeps the member's raft address
(`ManagerStatus.Addr`) of the machine the backup came from, whatever --advertise-addr says (Docker
20.10 and 28 here: a second init does not change it either). A manager that joins such a swarm is added
to the raft, then sends its raft messages to that old address, which nothing answers: the swarm has two
members, no quorum and no leader (the join times out with HTTP 503).

So, while the address is stale:
- each joining control node sends what it addresses to OLD:2377 to the manager's real address instead
  (an iptables DNAT in nat OUTPUT, and a host route for OLD so that connect() gets that far), tagged
  `dcx raft redirect`;
- after the joins, another manager demotes the restored one and promotes it again: it leaves the raft and
  joins it anew at the address it advertises now; then the redirects go.
A restored swarm of one control node keeps the stale address until a control node is added (harmless
until then: only managers use it); that create takes the same path. A run stopped in between finds the
address still stale and does it again (the redirects are idempotent).
"""

from __future__ import annotations

import json

from dcx.bootstrap.engines import engine_address
from dcx.bootstrap.phases import Host, Phase, RunContext
from dcx.shell import cmd, q

PORT = 2377
TAG = "dcx raft redirect"
ROUTE_PROTO = "186"  # a protocol number of our own for the host route, so that only ours is removed
STALE = "swarm_stale_raft"  # ctx.shared: (old address, the manager's name) while a manager's is stale


def own_raft_address(host: Host) -> str:
    """The host part of this manager's ManagerStatus.Addr ('' when it is not a manager)."""
    out = host.run("docker node inspect self --format '{{json .ManagerStatus}}'", timeout=60)
    try:
        status = json.loads(out.stdout) if out.ok else None
    except ValueError:
        return ""
    addr = str((status or {}).get("Addr") or "")
    return addr.rsplit(":", 1)[0] if ":" in addr else addr


def note_stale_address(ctx: RunContext, manager: Host) -> None:
    """Before control nodes join: is the manager's raft address the one it has now?"""
    old = own_raft_address(manager)
    if old and old != engine_address(ctx, manager):
        ctx.shared[STALE] = (old, manager.name)


def redirect_command(old: str, new: str) -> str:
    """On a joining control node: connections to OLD:2377 go to NEW:2377 (idempotent)."""
    rule = (f"-d {q(old)}/32 -p tcp --dport {PORT} -m comment --comment {q(TAG)} "
            f"-j DNAT --to-destination {q(f'{new}:{PORT}')}")
    route = ("r=$(ip -o route get " + q(new) + "); "
             "dev=$(echo \"$r\" | sed -n 's/.* dev \\([^ ]*\\).*/\\1/p'); "
             "via=$(echo \"$r\" | sed -n 's/.* via \\([^ ]*\\).*/\\1/p'); "
             "src=$(echo \"$r\" | sed -n 's/.* src \\([^ ]*\\).*/\\1/p'); "
             f"ip route replace {q(old)}/32 ${{via:+via $via}} dev \"$dev\" ${{src:+src $src}} proto {ROUTE_PROTO}")
    return f"set -e; {route}; iptables -t nat -C OUTPUT {rule} 2>/dev/null || iptables -t nat -A OUTPUT {rule}"


def unredirect_command(old: str) -> str:
    """Remove every redirect dcx made for OLD (the rules whatever their target) and its host route."""
    return (f"iptables -t nat -S OUTPUT 2>/dev/null | grep -F -- {q(TAG)} | sed 's/^-A /-D /' | "
            "while read -r r; do eval \"iptables -t nat $r\" || true; done; "
            f"ip route del {q(old)}/32 proto {ROUTE_PROTO} 2>/dev/null; true")


def redirect_for_join(ctx: RunContext, host: Host) -> None:
    stale = ctx.shared.get(STALE)
    if stale and host.name != stale[1]:
        old, name = stale
        host.run(redirect_command(old, engine_address(ctx, ctx.host(name))), timeout=60, check=True,
                 what="redirecting the restored manager's old raft address")


class RefreshRestoredManager(Phase):
    """After control nodes joined a swarm whose manager has a stale raft address: another manager
    demotes it and promotes it again, so that it rejoins the raft at its address now; then the
    redirects go. Done when every manager's raft address is its own."""

    title = "Move the restored manager to its own raft address"

    # After the workers' joins too: they join through this manager, which leaves the raft for a moment.

    def hosts(self, ctx: RunContext) -> list[Host]:
        stale = ctx.shared.get(STALE)
        return [ctx.host(stale[1])] if stale else []

    def run(self, ctx: RunContext, host: Host) -> None:
        from dcx.bootstrap.swarm import is_manager, swarm_info, wait_for

        old, _ = ctx.shared[STALE]
        others = [h for h in ctx.control_hosts if h is not host and is_manager(swarm_info(h))]
        if not others:
            ctx.reporter.note(f"{host.name} keeps its old raft address {old} until another control node joins")
            return
        api = others[0]
        node_id = swarm_info(host)["NodeID"]  # its dcx label is still the old machine's: labels come later
        api.run(cmd("docker", "node", "demote", node_id), timeout=120, check=True, what=f"demoting {host.name}")
        wait_for(lambda: not is_manager(swarm_info(host)), 120.0, f"{host.name} to leave the raft")
        api.run(cmd("docker", "node", "promote", node_id), timeout=120, check=True, what=f"promoting {host.name}")
        wanted = engine_address(ctx, host)
        wait_for(lambda: is_manager(swarm_info(host)) and own_raft_address(host) == wanted, 120.0,
                 f"{host.name} to rejoin the raft at {wanted}")
        for h in ctx.control_hosts:
            h.run(unredirect_command(old), timeout=60)
        ctx.shared.pop(STALE, None)
