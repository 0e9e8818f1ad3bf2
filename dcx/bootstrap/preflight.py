"""Preflight: before anything changes on a host, every problem of every host is found and reported
at once (duplicate names or addresses, unsupported OS or arch, engine ports taken by something
else, clock skew, too little memory or disk)."""

from __future__ import annotations

import json

from dcx.bootstrap.phases import Host, Phase, RunContext
from dcx.bootstrap.runtime import LISTENING_COMMAND, SUPPORTED_ARCHES, Facts, parse_facts
from dcx.errors import OperationFailed

# The engine's own daemons may hold these ports already (a re-run): only other processes are a problem.
ENGINE_PORTS = {
    "swarm": [("tcp", 2377), ("tcp", 7946), ("udp", 7946), ("udp", 4789)],
    "k3s": [("tcp", 6443), ("tcp", 10250), ("tcp", 2379), ("tcp", 2380), ("udp", 8472)],
}
OWNERS = {"dockerd", "docker-proxy", "k3s", "k3s-server", "k3s-agent", "containerd", "wireguard-go", ""}
MAX_CLOCK_SKEW = 30.0  # seconds: raft (swarm) and etcd (k3s) certificates and leases need agreeing clocks
MIN_MEMORY_KB = 512 * 1024
MIN_DISK_KB = 2 * 1024 * 1024


def member_ports(f: Facts) -> set[tuple[str, int]]:
    """The ports an active swarm member's own dockerd holds (memberlist, the overlay's VXLAN socket; the raft
    port on a manager): the facts name no owners there (ss -p is costly), and no other program can hold them
    meanwhile."""
    try:
        swarm = json.loads(f.docker_swarm or "{}")
    except ValueError:
        return set()
    if not isinstance(swarm, dict) or swarm.get("LocalNodeState") != "active":
        return set()
    return {("tcp", 7946), ("udp", 7946), ("udp", 4789)} | ({("tcp", 2377)} if swarm.get("ControlAvailable") else set())


def host_problems(ctx: RunContext, host: Host, dupes: dict[str, list[str]]) -> list[str]:
    f = host.facts
    problems = []
    if f.family == "unknown":
        problems.append(f"unsupported OS '{f.os_id}'")
    if f.arch and f.arch not in SUPPORTED_ARCHES:
        problems.append(f"unsupported architecture {f.arch}")
    engine = ctx.spec.spec.engine.type
    ports = list(ENGINE_PORTS.get(engine, []))
    if host.data.get("mesh_address"):
        ports.append(("udp", ctx.spec.spec.network.meshPort))
    listeners = f.listeners()
    own = set() if f.listening_owners else member_ports(f)  # their owner is not read: dockerd's
    if not f.listening_owners and any(listeners.get(p) not in (None, "") and p not in own for p in ports):
        own = set()
        listeners = parse_facts("listening=" + host.run(LISTENING_COMMAND, timeout=60, check=True,
                                                          what="reading listening sockets").stdout).listeners()
    taken = [f"{proto}/{port} ({listeners[(proto, port)]})" for proto, port in ports
             if (proto, port) in listeners and (proto, port) not in own and listeners[(proto, port)] not in OWNERS]
    if taken:
        problems.append("ports in use by other programs: " + ", ".join(taken))
    skew = host.data.get("clock_offset", 0.0)
    if abs(skew) > MAX_CLOCK_SKEW:
        problems.append(f"clock is {skew:+.0f}s off this machine's (limit {MAX_CLOCK_SKEW:.0f}s): run NTP/chrony")
    if f.mem_kb and f.mem_kb < MIN_MEMORY_KB:
        problems.append(f"{f.mem_kb // 1024} MiB memory (needs {MIN_MEMORY_KB // 1024} MiB)")
    if f.disk_kb and f.disk_kb < MIN_DISK_KB:
        problems.append(f"{f.disk_kb // 1024} MiB free on / (needs {MIN_DISK_KB // 1024} MiB)")
    problems += dupes.get(host.name, [])
    return problems


class Preflight(Phase):
    title = "Preflight checks"
    read_only = True
    barrier_after = True  # nothing changes on any host until every host has passed

    def prepare(self, ctx: RunContext) -> None:
        self.dupes: dict[str, list[str]] = {}
        by_hostname: dict[str, list[str]] = {}
        by_address: dict[tuple[str, str], list[str]] = {}
        for h in ctx.hosts:
            if h.facts is None:
                continue
            by_hostname.setdefault(h.facts.hostname, []).append(h.name)
            # The same private address in two different networks is fine (the mesh tells them apart).
            by_address.setdefault((h.node.network, h.facts.primary_ip), []).append(h.name)
        for hostname, names in by_hostname.items():
            if hostname and len(names) > 1:
                for n in names:
                    others = ", ".join(o for o in names if o != n)
                    self.dupes.setdefault(n, []).append(f"hostname '{hostname}' is also the hostname of {others}")
        for (_, address), names in by_address.items():
            if address and len(names) > 1:
                for n in names:
                    others = ", ".join(o for o in names if o != n)
                    self.dupes.setdefault(n, []).append(f"address {address} is also the address of {others}")

    def run(self, ctx: RunContext, host: Host) -> None:
        problems = host_problems(ctx, host, self.dupes)
        if problems:
            raise OperationFailed("; ".join(problems))
