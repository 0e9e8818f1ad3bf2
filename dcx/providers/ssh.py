"""The `ssh` provider: pools of machines that already exist (bare metal, VMs made elsewhere).

It never creates or deletes machines. Hosts come from an inventory (Ansible INI/YAML or dcx's own,
see dcx.inventory) or are listed inline; connection settings follow OpenSSH (dcx.sshconfig). On
destroy, or when a host leaves the inventory, the machine is reset instead (the engine's leave and
dcx's files; the runtime only with --purge) and stays reachable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dcx.errors import SpecError
from dcx.log import register_secret
from dcx.providers.base import Node, NodeRequest, Provider, ProviderContext


class InlineHost(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    address: str = ""
    port: int | None = Field(default=None, ge=1, le=65535)
    user: str = ""
    privateKey: str = ""
    proxyJump: str = ""
    meshEndpoint: str = ""
    labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _grammar(self) -> InlineHost:
        # The same rules as an inventory's hosts: names become hostnames and ssh config lines.
        from dcx.inventory import InventoryHost, host_problem

        problem = host_problem(InventoryHost(
            name=self.name, address=self.address or self.name, user=self.user, private_key_file=self.privateKey,
            proxy_jump=self.proxyJump, mesh_endpoint=self.meshEndpoint, labels=self.labels))
        if problem:
            raise ValueError(f"host {self.name!r}{': ' + problem[0] if problem[0] else ''}: {problem[1]}")
        return self


class SshSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inventory: str = ""  # path, relative to the cluster file
    group: str | None = None
    hosts: list[InlineHost] = Field(default_factory=list)
    network: str = ""  # pools with the same network reach each other's private addresses

    @model_validator(mode="after")
    def _one_source(self) -> SshSettings:
        if bool(self.inventory) == bool(self.hosts):
            raise ValueError("give either inventory (with an optional group) or hosts")
        return self


class SshProvider(Provider):
    name = "ssh"
    settings_model = SshSettings
    resets_machines = True

    def __init__(self, ctx: ProviderContext) -> None:
        super().__init__(ctx)
        self.become_passwords: dict[str, str] = {}
        self._read: dict[str, list[dict[str, Any]]] = {}  # pool -> hosts: an inventory is read once per run

    def _hosts(self, pool: Any) -> list[dict[str, Any]]:
        """The pool's hosts as plain settings, in inventory order."""
        if pool.name not in self._read:
            self._read[pool.name] = self._read_hosts(pool)
        return self._read[pool.name]

    def _read_hosts(self, pool: Any) -> list[dict[str, Any]]:
        settings = SshSettings.model_validate(pool.settings)
        if settings.hosts:
            return [{"name": h.name, "address": h.address or h.name, "port": h.port, "user": h.user,
                     "key": h.privateKey, "proxy_jump": h.proxyJump, "mesh_endpoint": h.meshEndpoint,
                     "private_address": "", "labels": h.labels} for h in settings.hosts]
        from dcx.inventory import load_inventory

        base = self.ctx.spec.base_dir if self.ctx.spec is not None else Path.cwd()
        path = Path(settings.inventory)
        hosts = load_inventory(path if path.is_absolute() else base / path, settings.group)
        for h in hosts:
            if h.become_password is not None:
                # Kept in memory only (never in state or the node record): used for this run's sudo.
                register_secret(h.become_password)
                self.become_passwords[h.name] = h.become_password
        return [{"name": h.name, "address": h.address, "port": h.port if h.port != 22 else None, "user": h.user,
                 "key": h.private_key_file, "proxy_jump": h.proxy_jump, "mesh_endpoint": h.mesh_endpoint,
                 "private_address": h.private_address, "labels": h.labels} for h in hosts]

    def become_password(self, node: Node) -> str | None:
        """The inventory's ansible_become_password for this host, if it gives one."""
        return self.become_passwords.get(node.name)

    def node_requests(self, pool: Any) -> list[NodeRequest]:
        hosts = self._hosts(pool)
        if pool.count is not None and pool.count != len(hosts) and self.ctx.spec is not None:
            index = [p.name for p in self.ctx.spec.spec.pools].index(pool.name)
            raise self.ctx.spec.error(("spec", "pools", index, "count"),
                                      f"is {pool.count} but the pool's inventory has {len(hosts)} hosts")
        names = [h["name"] for h in hosts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SpecError(self.ctx.spec.file if self.ctx.spec else "<spec>", None, f"pool {pool.name}",
                            f"hosts listed twice: {', '.join(dupes)}")
        return [NodeRequest(name=h["name"], pool=pool.name, role=pool.role, index=i + 1) for i, h in enumerate(hosts)]

    def _node(self, pool: Any, host: dict[str, Any]) -> Node:
        from dcx.sshconfig import resolve

        spec_ssh = self.ctx.spec.spec.ssh if self.ctx.spec is not None else None
        endpoint = resolve(host["name"], host=host["address"], port=host["port"] or None,
                           user=host["user"] or "", key_file=host["key"] or (spec_ssh.privateKey if spec_ssh else ""),
                           proxy_jump=host["proxy_jump"], default_user=spec_ssh.user if spec_ssh else "root")
        if endpoint.port == 22 and spec_ssh is not None and not host["port"]:
            endpoint.port = spec_ssh.port
        settings = SshSettings.model_validate(pool.settings)
        return Node(
            # The private address is the host's own (read from it at bootstrap) unless the inventory names it:
            # the SSH address may be a NAT router's or a bastion's view.
            name=host["name"], pool=pool.name, provider=self.name, role=pool.role, ssh_address=endpoint.host,
            private_address=host.get("private_address", ""), ssh_user=endpoint.user, ssh_port=endpoint.port,
            ssh_key=endpoint.key_files[0] if endpoint.key_files else "",
            labels=dict(host["labels"]), network=f"ssh:{settings.network or pool.name}",
            mesh_endpoint=host["mesh_endpoint"], extra={"endpoint": endpoint.to_dict()},
        )

    def create_nodes(self, pool: Any, requests: list[NodeRequest]) -> list[Node]:
        by_name = {h["name"]: h for h in self._hosts(pool)}
        nodes = [self._node(pool, by_name[r.name]) for r in requests]
        for n in nodes:
            # Adopted: recorded with its connection settings, so a host that later leaves the inventory
            # can still be reached to be reset.
            self.ctx.record(f"ssh/node/{n.name}", n.to_dict())
        return nodes

    def list_nodes(self, pools: list[Any]) -> list[Node]:
        """Every inventory host, plus recorded hosts that left the inventory (they must be reset)."""
        out = []
        seen = set()
        for pool in pools:
            for host in self._hosts(pool):
                if f"ssh/node/{host['name']}" in self.ctx.resources:
                    out.append(self._node(pool, host))
                    seen.add(host["name"])
        for key in self.ctx.recorded_keys("ssh/node/"):
            if key.split("/", 2)[2] not in seen:
                out.append(Node.from_dict(self.ctx.recorded(key)))
        return out

    def repair_nodes(self, pools: list[Any], nodes: list[Node]) -> list[Node]:
        # Connection settings are re-read from the inventory on every run: it is the source of truth.
        by_pool = {p.name: p for p in pools}
        out = []
        for n in nodes:
            pool = by_pool.get(n.pool)
            hosts = {h["name"]: h for h in self._hosts(pool)} if pool else {}
            out.append(self._node(pool, hosts[n.name]) if n.name in hosts else n)
        return out

    def delete_nodes(self, pools: list[Any], nodes: list[Node]) -> None:
        # The machines stay: the engine already reset them. Only dcx's record of them goes.
        for n in nodes:
            self.ctx.record(f"ssh/node/{n.name}", None)

    def sweep(self, pools: list[Any]) -> list[str]:
        return []
