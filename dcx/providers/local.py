"""The `local` provider: nodes are namespace hosts on this machine (see dcx.netns).

Each pool subnet gets a bridge named from the cluster id and subnet; each node a network namespace
`dcx-<cluster id>-<node name>` with an address from the subnet (.1 is the bridge's). Nodes of one
subnet reach each other; nodes on different subnets do not (no routes), like separate sites.

Identity for sweeping: a registry file per node under /run/dcx/local/ (tmpfs: like the namespaces
themselves it does not outlive a reboot) records the cluster's name and id, the namespace, bridge
and directory. `sweep` reads it, so `destroy` works even when the cluster's state is gone.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dcx import netns
from dcx.errors import PrerequisiteMissing, ProviderError
from dcx.providers.base import FoundCluster, Node, NodeRequest, Provider

REGISTRY = Path(os.environ.get("DCX_LOCAL_REGISTRY", "/run/dcx/local"))
DEFAULT_SUBNET_BASE = ipaddress.ip_network("10.213.0.0/16")
# Seconds a deleted node's processes get between SIGTERM and SIGKILL: its disk goes with it, so nothing
# there needs a clean stop (20 dockerds stopping cleanly side by side took 3 s on 2 cores). So none: with
# 0.5 s, 20 swarm nodes' dockerds were still stopping when killed, and destroy only waited 0.5 s longer.
DELETE_GRACE = 0.0


class LocalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subnet: str = ""  # default: a free /24 of 10.213.0.0/16, chosen on first create, kept in state
    sshPort: int = Field(default=22, ge=1, le=65535)
    # The nodes' sshd: OpenSSH's defaults, or a common hardening baseline (MaxSessions 1, MaxStartups
    # 3:50:6) to rehearse on local nodes a deployment to hardened machines. A closed choice: nothing
    # typed in the spec reaches sshd_config.
    sshd: Literal["default", "hardened"] = "default"

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, value: str) -> str:
        if value:
            net = ipaddress.ip_network(value, strict=True)
            if net.version != 4 or net.prefixlen > 28:
                raise ValueError("must be an IPv4 network of /28 or larger")
        return value


REQUIRED = {
    "ip": "iproute2",
    "nsenter": "util-linux",
    "unshare": "util-linux",
    "sshd": "openssh-server",
    "ssh-keygen": "openssh-client",
    "dockerd": "docker.io",
}


def missing_prerequisites() -> list[tuple[str, str]]:
    missing = []
    for tool, package in REQUIRED.items():
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            missing.append((tool, package))
    return missing


class LocalProvider(Provider):
    name = "local"
    settings_model = LocalSettings

    def check_prerequisites(self) -> None:
        if os.geteuid() != 0:
            raise PrerequisiteMissing("the local provider needs root (it makes network namespaces and bridges)",
                                      hint="run dcx with sudo")
        missing = missing_prerequisites()
        if missing:
            packages = sorted({p for _, p in missing})
            raise PrerequisiteMissing(
                "the local provider needs " + ", ".join(t for t, _ in missing) + " on this machine",
                hint="install them: apt-get update && apt-get install -y " + " ".join(packages))

    # --- naming ---------------------------------------------------------------------------------

    def netns_name(self, node_name: str) -> str:
        return f"dcx-{self.ctx.cluster_id}-{node_name}"

    def node_home(self, node_name: str) -> Path:
        return self.ctx.workdir / "nodes" / node_name

    def subnet_for(self, pool: Any) -> ipaddress.IPv4Network:
        settings = LocalSettings.model_validate(pool.settings)
        if settings.subnet:
            return ipaddress.ip_network(settings.subnet)  # type: ignore[return-value]
        chosen = self.ctx.recorded("local/default-subnet")
        if chosen:
            return ipaddress.ip_network(chosen)  # type: ignore[return-value]
        net = _free_subnet()
        self.ctx.record("local/default-subnet", str(net))
        return net

    def bridge_for(self, subnet: ipaddress.IPv4Network) -> str:
        return netns.bridge_name(f"{self.ctx.cluster_id}/{subnet}")

    # --- provider interface ---------------------------------------------------------------------

    def create_nodes(self, pool: Any, requests: list[NodeRequest]) -> list[Node]:
        settings = LocalSettings.model_validate(pool.settings)
        subnet = self.subnet_for(pool)
        hosts = list(subnet.hosts())
        bridge = self.bridge_for(subnet)
        gateway = hosts[0]
        _refuse_overlap(subnet, bridge, pool.name)
        self.ctx.record(f"local/bridge/{bridge}", {"subnet": str(subnet)})
        netns.ensure_bridge(bridge, f"{gateway}/{subnet.prefixlen}")
        taken = self._addresses_in_use(subnet)
        infos: list[dict[str, Any]] = []
        for req in requests:
            ns = self.netns_name(req.name)
            entry = self._read_registry(ns)
            address = entry.get("address") if entry else None
            if not address:
                address = next((str(ip) for ip in hosts[1:] if str(ip) not in taken), None)
                if address is None:
                    raise ProviderError(f"subnet {subnet} of pool {pool.name} has no free address for {req.name}")
            taken.add(address)
            home = self.node_home(req.name)
            info = {"cluster": self.ctx.cluster_name, "cluster_id": self.ctx.cluster_id, "node": req.name,
                    "pool": pool.name, "netns": ns, "bridge": bridge, "home": str(home), "address": address}
            if entry and entry.get("sshd_pid"):  # kept until start_host says otherwise: a node that is
                info["sshd_pid"] = entry["sshd_pid"]  # as recorded is not written again (a re-run's repair)
            # Write-ahead: the registry (and state) name the namespace before it exists.
            if info != entry:
                self._write_registry(ns, info)
            self.ctx.record(f"local/node/{req.name}", info)
            infos.append(info)
        specs = [netns.HostSpec(
            netns=info["netns"], hostname=info["node"], address=f"{info['address']}/{subnet.prefixlen}",
            bridge=bridge, home=Path(info["home"]), authorized_key=self.ctx.ssh_public_key, ssh_port=settings.sshPort,
            sshd=netns.HARDENED_SSHD if settings.sshd == "hardened" else netns.DEFAULT_SSHD) for info in infos]
        # A re-run's repair: a host whose namespace, listening sshd and answer over the bridge are all there
        # has nothing to complete (start_host's own first check, with one look at /proc for every host).
        listening = netns.sshd_pids([spec.netns for spec in specs])

        def start(spec: netns.HostSpec) -> int:
            return netns.running_host(spec, listening.get(spec.netns)) or netns.start_host(spec)

        # Side by side: each host is a dozen local commands and a wait for its sshd.
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="dcx-local") as pool:
            futures = [pool.submit(start, spec) for spec in specs]
        nodes = []
        for req, info, future in zip(requests, infos, futures, strict=True):
            pid = future.result()  # the first failure, once every host was tried
            if info.get("sshd_pid") != pid:
                info["sshd_pid"] = pid
                self._write_registry(info["netns"], info)
            self.ctx.record(f"local/node/{req.name}", info)
            nodes.append(self._node(info, req.role, settings.sshPort))
        return nodes

    def _node(self, info: dict[str, Any], role: str, port: int) -> Node:
        return Node(
            name=info["node"], pool=info["pool"], provider=self.name, role=role,
            ssh_address=info["address"], private_address=info["address"], ssh_user="root", ssh_port=port,
            provider_ids={"netns": info["netns"], "bridge": info["bridge"]},
            network=f"local:{info['bridge']}",
        )

    def repair_nodes(self, pools: list[Any], nodes: list[Node]) -> list[Node]:
        """A node whose sshd died (or half-made by a killed run) is completed: start_host is idempotent, and
        starts a dead sshd again inside the node's own namespaces while any of its processes runs there
        (its dockerd keeps its /var/lib/docker alone); a node left with processes outside them is
        restarted from its disk, like a reboot."""
        by_pool = {p.name: p for p in pools}
        out = [node for node in nodes if node.pool not in by_pool]
        for name, pool in by_pool.items():
            requests = [NodeRequest(n.name, n.pool, n.role, 0) for n in nodes if n.pool == name]
            if requests:
                out.extend(self.create_nodes(pool, requests))
        return out

    def list_nodes(self, pools: list[Any]) -> list[Node]:
        roles = {p.name: p.role for p in pools}
        ports = {p.name: LocalSettings.model_validate(p.settings).sshPort for p in pools}
        out = []
        for info in self._registry_entries():
            if info.get("cluster_id") != self.ctx.cluster_id or not netns.netns_exists(info["netns"]):
                continue
            role = roles.get(info["pool"], "worker")
            out.append(self._node(info, role, ports.get(info["pool"], 22)))
        return out

    def delete_nodes(self, pools: list[Any], nodes: list[Node]) -> None:
        # All at once: each node's daemons take about a second to stop.
        netns.stop_hosts([(self.netns_name(n.name), self.node_home(n.name)) for n in nodes], grace=DELETE_GRACE)
        for node in nodes:
            self._remove_registry(self.netns_name(node.name))

    def find_clusters(self, pools: list[Any]) -> list[FoundCluster]:
        """Clusters of this name with nodes in the machine-wide registry (one entry per cluster id);
        created = the oldest registry file's time, by = the user whose dcx wrote it."""
        import datetime
        import pwd

        found: dict[str, FoundCluster] = {}
        for path in sorted(REGISTRY.glob("*.json")) if REGISTRY.is_dir() else []:
            info = self._read_registry(path.stem)
            if not info or info.get("cluster") != self.ctx.cluster_name or not info.get("cluster_id"):
                continue
            stat = path.stat()
            created = datetime.datetime.fromtimestamp(stat.st_mtime, datetime.UTC).isoformat(timespec="seconds")
            try:
                by = pwd.getpwuid(stat.st_uid).pw_name
            except KeyError:
                by = str(stat.st_uid)
            prev = found.get(info["cluster_id"])
            if prev is None or created < prev.created:
                found[info["cluster_id"]] = FoundCluster(id=info["cluster_id"], name=self.ctx.cluster_name,
                                                         provider=self.name, where="local (this machine)",
                                                         created=created, created_by=by)
        return sorted(found.values(), key=lambda c: c.id)

    def sweep(self, pools: list[Any]) -> list[str]:
        """Remove every namespace host, bridge, rule and directory this cluster has, by registry and
        by name: also what a crashed run left half-made."""
        removed = []
        bridges: set[str] = set()
        prefix = f"dcx-{self.ctx.cluster_id}-"
        mine = [info for info in self._registry_entries() if info.get("cluster_id") == self.ctx.cluster_id or (
            not self.ctx.cluster_id and info.get("cluster") == self.ctx.cluster_name)]
        netns.stop_hosts([(info["netns"], Path(info["home"]) if info.get("home") else None) for info in mine],
                         grace=DELETE_GRACE)
        for info in mine:
            self._remove_registry(info["netns"])
            bridges.add(info["bridge"])
            removed.append(f"namespace host {info['netns']}")
        for ns in netns.list_netns():
            if self.ctx.cluster_id and ns.startswith(prefix):
                netns.stop_host(ns, None)
                removed.append(f"namespace {ns}")
        bridges |= {k.split("/", 2)[2] for k in self.ctx.recorded_keys("local/bridge/")}
        if self.ctx.cluster_id:
            # Without state (destroy -f), the spec's subnets still name the bridges: delete_nodes has
            # already removed the registry entries that would otherwise list them.
            subnets = self._recorded_subnets() | {
                LocalSettings.model_validate(p.settings).subnet for p in pools} - {""}
            bridges |= {netns.bridge_name(f"{self.ctx.cluster_id}/{k}") for k in subnets}
        for bridge in sorted(bridges):
            if netns.link_exists(bridge) and not netns.bridge_ports(bridge):
                netns.delete_bridge(bridge)
                removed.append(f"bridge {bridge}")
        nodes_dir = self.ctx.workdir / "nodes"
        if nodes_dir.exists():
            netns._remove_tree(nodes_dir)
        return removed

    # --- registry (machine-wide, on tmpfs) ------------------------------------------------------

    def _recorded_subnets(self) -> set[str]:
        return {v["subnet"] for k, v in self.ctx.resources.items() if k.startswith("local/bridge/")}

    def _registry_entries(self) -> list[dict[str, Any]]:
        return _registry_files()

    def _read_registry(self, ns: str) -> dict[str, Any] | None:
        try:
            return json.loads((REGISTRY / f"{ns}.json").read_text())
        except (OSError, ValueError):
            return None

    def _write_registry(self, ns: str, info: dict[str, Any]) -> None:
        from dcx.state import atomic_write, ensure_private_dir

        ensure_private_dir(REGISTRY, REGISTRY.parent)  # /run/dcx and its registry: 0700
        atomic_write(REGISTRY / f"{ns}.json", json.dumps(info, indent=2))

    def _remove_registry(self, ns: str) -> None:
        (REGISTRY / f"{ns}.json").unlink(missing_ok=True)

    def _addresses_in_use(self, subnet: ipaddress.IPv4Network) -> set[str]:
        used = set()
        for info in self._registry_entries():
            addr = info.get("address")
            if addr and ipaddress.ip_address(addr) in subnet:
                used.add(addr)
        return used


def _refuse_overlap(subnet: ipaddress.IPv4Network, bridge: str, pool: str) -> None:
    """Another interface in the pool's subnet would take the nodes' traffic (the kernel routes to
    whichever it likes): say so now rather than wait for an sshd that is never reached."""
    for link, iface in netns.host_ipv4_interfaces():
        if link != bridge and iface.network.overlaps(subnet):
            owners = sorted({(e.get("cluster", "?"), e.get("cluster_id", "?")) for e in _registry_files()
                             if e.get("bridge") == link})
            if owners:  # live nodes of a cluster (perhaps this name's, with its state lost): never `ip link del`
                named = ", ".join(f"{n} (id {i})" for n, i in owners)
                hint = (f"choose another local.subnet, or remove cluster {named}: `dcx cluster destroy -f FILE "
                        f"--cluster-id ID` from a DCX_HOME without that cluster's state")
            elif netns.bridge_ports(link):
                hint = f"choose another local.subnet ({link} has interfaces attached: something uses it)"
            else:
                hint = (f"choose another local.subnet; {link} has nothing attached: if an interrupted dcx run "
                        f"left it, remove it: ip link del {link}")
            raise ProviderError(
                f"subnet {subnet} of pool {pool} overlaps {iface} on interface {link} of this machine", hint=hint)


def _registry_files() -> list[dict[str, Any]]:
    """Every local node on this machine, whichever cluster or DCX_HOME made it."""
    entries = []
    for path in sorted(REGISTRY.glob("*.json")) if REGISTRY.is_dir() else []:
        try:
            entries.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return entries


def _free_subnet() -> ipaddress.IPv4Network:
    """The first /24 of 10.213.0.0/16 that no interface on this machine uses."""
    used = [iface.network for _, iface in netns.host_ipv4_interfaces()]
    for candidate in DEFAULT_SUBNET_BASE.subnets(new_prefix=24):
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise ProviderError("no free /24 left in 10.213.0.0/16 for local nodes; set local.subnet in the pool")
