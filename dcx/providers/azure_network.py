"""Virtual network and network security group of the azure provider.

The security group `dcx-CLUSTER-nsg` is attached to every NIC of the cluster in its group and location.
Its inbound rules:

- 100 dcx-ssh: TCP 22 (where dcx connects) from spec.network.sshCIDR only;
- 101 dcx-api (k3s): TCP 6443 from spec.network.apiCIDR (default: sshCIDR), for kubectl;
- 110-113 dcx-cluster-*: the engine's ports (and ICMP, ESP for swarm's encrypted overlays, the mesh
  port) from the cluster's subnets only (the address prefixes of the subnets its pools use there);
- 120 dcx-mesh: the mesh UDP port from the /32s of the cluster's nodes in other networks, only while
  the cluster spans networks (`allow_mesh_peers`);
- 4000 dcx-deny-internet: everything else from the Internet denied (Azure's own defaults would also
  deny it; the explicit rule keeps it so when someone adds a broader rule below).

Rules that are not dcx's (someone added them) are kept when dcx updates the group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dcx.errors import InputError
from dcx.providers.base import peer_cidrs

if TYPE_CHECKING:
    from dcx.providers.azure import AzureProvider, Where

MESH_RULE = "dcx-mesh"
K3S_API_PORT = "6443"
# Engine ports between the cluster's own machines: (protocol, ports) per engine.
ENGINE_PORTS: dict[str, list[tuple[str, list[str]]]] = {
    "swarm": [("Tcp", ["2377", "7946"]), ("Udp", ["7946", "4789"]), ("Esp", ["*"])],
    "k3s": [("Tcp", ["6443", "10250", "2379-2380"]), ("Udp", ["8472"])],
}


def rule(name: str, priority: int, protocol: str, sources: list[str], ports: list[str],
         access: str = "Allow") -> dict[str, Any]:
    props: dict[str, Any] = {"priority": priority, "direction": "Inbound", "access": access, "protocol": protocol,
                             "sourcePortRange": "*", "destinationAddressPrefix": "*"}
    if len(sources) == 1:
        props["sourceAddressPrefix"] = sources[0]
    else:
        props["sourceAddressPrefixes"] = sources
    if len(ports) == 1:
        props["destinationPortRange"] = ports[0]
    else:
        props["destinationPortRanges"] = ports
    return {"name": name, "properties": props}


def rule_key(r: dict[str, Any]) -> tuple[Any, ...]:
    """What matters when comparing a rule with the wanted one (one or many prefixes/ports alike)."""
    p = r.get("properties") or {}

    def many(single: str, plural: str) -> tuple[str, ...]:
        return tuple(sorted(p.get(plural) or ([p[single]] if p.get(single) else [])))

    return (r["name"], p.get("priority"), p.get("direction"), p.get("access"), p.get("protocol"),
            many("sourceAddressPrefix", "sourceAddressPrefixes"),
            many("destinationPortRange", "destinationPortRanges"),
            many("destinationAddressPrefix", "destinationAddressPrefixes"))


def base_rules(provider: AzureProvider, prefixes: list[str]) -> list[dict[str, Any]]:
    spec = provider.ctx.spec
    network = provider.ctx.network
    from dcx.providers.azure import SSH_PORT

    engine = spec.spec.engine.type if spec is not None else "swarm"
    # SSH on the port dcx connects to (Node.ssh_port): the image's sshd, which dcx does not move.
    rules = [rule("dcx-ssh", 100, "Tcp", provider.ssh_sources(), [str(SSH_PORT)])]
    if engine == "k3s":  # the kubeconfig dcx writes points at a server's address on 6443
        rules.append(rule("dcx-api", 101, "Tcp", provider.api_sources(), [K3S_API_PORT]))
    ports = [(proto, list(p)) for proto, p in ENGINE_PORTS.get(engine, ENGINE_PORTS["swarm"])]
    if network is not None and network.mesh != "none":
        for proto, p in ports:
            if proto == "Udp":
                p.append(str(network.meshPort))
    ports.append(("Icmp", ["*"]))
    for i, (proto, p) in enumerate(ports):
        rules.append(rule(f"dcx-cluster-{proto.lower()}", 110 + i, proto, prefixes, p))
    rules.append(rule("dcx-deny-internet", 4000, "*", ["Internet"], ["*"], access="Deny"))
    return rules


def ensure_vnet(provider: AzureProvider, pool: Any, where: Where) -> None:
    from dcx.providers.azure import json_of
    from dcx.providers.azure_api import is_not_found

    nc = provider.api.network(where.subscription)
    if not where.vnet_made:
        with provider.api.errors(f"get subnet {where.subnet} of virtual network {where.vnet}"):
            try:
                subnet = json_of(nc.subnets.get(where.vnet_group, where.vnet, where.subnet))
            except Exception as exc:
                if not is_not_found(exc):
                    raise
                raise InputError(f"pool {pool.name}: subnet '{where.subnet}' of virtual network '{where.vnet}' "
                                 f"(resource group {where.vnet_group}) does not exist",
                                 hint="check azure.vnet and azure.subnet, or leave both empty to let dcx make "
                                      "a network") from None
        props = subnet.get("properties") or {}
        provider._prefixes[where.subnet_id.lower()] = props.get("addressPrefixes") or [props["addressPrefix"]]
        return
    s = provider.settings(pool)
    provider._prefixes[where.subnet_id.lower()] = [s.subnet_cidr]
    with provider.api.errors(f"get virtual network {where.vnet}"):
        try:
            vnet = json_of(nc.virtual_networks.get(where.group, where.vnet))
        except Exception as exc:
            if not is_not_found(exc):
                raise
            vnet = None
    if vnet is not None:
        subnet = next((x for x in (vnet.get("properties") or {}).get("subnets") or [] if x["name"] == where.subnet), {})
        actual = (subnet.get("properties") or {}).get("addressPrefix", "")
        if actual != s.subnet_cidr:
            # A network in use cannot change its ranges: say so rather than open ports for the wrong one.
            raise InputError(f"pool {pool.name}: the virtual network {where.vnet} exists with subnet "
                             f"{actual or '(none)'}, not azure.subnetCIDR {s.subnet_cidr}",
                             hint="set azure.vnetCIDR/subnetCIDR back to the network's ranges")
        return
    provider.ctx.record(f"azure/vnet/{where.subscription}/{where.group}/{where.vnet}",
                        {"subscription": where.subscription, "group": where.group})
    provider.ctx.log.info("azure: creating virtual network %s (%s, subnet %s)", where.vnet, s.vnetCIDR, s.subnet_cidr)
    body = {"location": where.location, "tags": provider.tags(pool), "properties": {
        "addressSpace": {"addressPrefixes": [s.vnetCIDR]},
        # New subnets are private by default since 2025 (no outbound internet without a public IP or NAT
        # gateway): machines reached on private addresses still need to install packages.
        "subnets": [{"name": where.subnet, "properties": {"addressPrefix": s.subnet_cidr,
                                                          "defaultOutboundAccess": True}}]}}
    with provider.api.errors(f"create virtual network {where.vnet}"):
        nc.virtual_networks.begin_create_or_update(where.group, where.vnet, body).result()


def cluster_prefixes(provider: AzureProvider, pool: Any, where: Where) -> list[str]:
    """The address prefixes of the subnets of every pool whose NICs this security group guards."""
    out = set(provider._prefixes.get(where.subnet_id.lower(), []))
    spec = provider.ctx.spec
    for p in spec.spec.pools if spec is not None else []:
        if p.provider != provider.name or p.name == pool.name or p.name in provider._where:
            continue
        same = (provider.subscription_of(p), provider.group_of(p).lower(), provider.location_of(p))
        if same == (where.subscription, where.group.lower(), where.location):
            if provider.settings(p).vnet:
                # Another pool's user subnet: resolved (and checked) when that pool is.
                provider.where(p)
            else:
                out.add(provider.settings(p).subnet_cidr)
    for other in provider._where.values():
        if (other.subscription, other.group.lower(), other.location) == (where.subscription, where.group.lower(),
                                                                         where.location):
            out |= set(provider._prefixes.get(other.subnet_id.lower(), []))
    return sorted(out)


def get_nsg(provider: AzureProvider, where: Where) -> dict[str, Any] | None:
    from dcx.providers.azure import json_of
    from dcx.providers.azure_api import is_not_found

    nc = provider.api.network(where.subscription)
    with provider.api.errors(f"get network security group {where.nsg}"):
        try:
            return json_of(nc.network_security_groups.get(where.group, where.nsg))
        except Exception as exc:
            if not is_not_found(exc):
                raise
            return None


def ensure_nsg(provider: AzureProvider, pool: Any, where: Where) -> None:
    """Create the security group, or update it when its dcx rules differ from the wanted ones (an edited
    sshCIDR, a new pool's subnet). The mesh rule is allow_mesh_peers' and is kept as it is."""
    from dcx.providers.azure import json_of

    key = (where.subscription, where.group.lower(), where.nsg)
    if key in provider._nsgs:
        return
    provider._nsgs[key] = {}  # cluster_prefixes may resolve other pools sharing this group: no recursion
    current = get_nsg(provider, where)
    wanted = base_rules(provider, cluster_prefixes(provider, pool, where))
    names = {r["name"] for r in wanted}
    # Others' rules are kept; dcx's own that are no longer wanted (another engine's ports) go, but the
    # mesh rule, which allow_mesh_peers owns.
    kept = [r for r in ((current or {}).get("properties") or {}).get("securityRules") or []
            if r["name"] not in names and (not r["name"].startswith("dcx-") or r["name"] == MESH_RULE)]
    stale = [r for r in ((current or {}).get("properties") or {}).get("securityRules") or []
             if r["name"].startswith("dcx-") and r["name"] not in names and r["name"] != MESH_RULE]
    if current is not None and not stale and sorted(map(rule_key, wanted)) == sorted(
            rule_key(r) for r in current["properties"].get("securityRules") or [] if r["name"] in names):
        provider._nsgs[key] = current
        return
    if current is None:
        provider.ctx.record(f"azure/nsg/{where.subscription}/{where.group}/{where.nsg}",
                            {"subscription": where.subscription, "group": where.group})
    provider.ctx.log.info("azure: %s network security group %s", "updating" if current else "creating", where.nsg)
    body = {"location": where.location, "tags": (current or {}).get("tags") or provider.tags(pool),
            "properties": {"securityRules": wanted + [{"name": r["name"], "properties": _writable(r)}
                                                      for r in kept]}}
    nc = provider.api.network(where.subscription)
    with provider.api.errors(f"{'update' if current else 'create'} network security group {where.nsg}"):
        provider._nsgs[key] = json_of(nc.network_security_groups.begin_create_or_update(
            where.group, where.nsg, body).result())


def _writable(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (r.get("properties") or {}).items() if k not in ("provisioningState",)}


def allow_mesh_peers(provider: AzureProvider, pools: list[Any], peers: list[str], port: int) -> None:
    """The dcx-mesh rule of every security group of the pools: exactly these peers, or no rule."""
    if not peers and not provider.ctx.recorded_keys("azure/mesh/"):
        return  # never opened (the usual case): no call at all
    seen: set[tuple[str, str, str]] = set()
    for pool in pools:
        where = provider.where(pool)
        key = (where.subscription, where.group.lower(), where.nsg)
        if key in seen:
            continue
        seen.add(key)
        journal = f"azure/mesh/{where.subscription}/{where.group}/{where.nsg}"
        nc = provider.api.network(where.subscription)
        current = next((r for r in ((provider._nsgs.get(key) or get_nsg(provider, where) or {}).get("properties")
                                    or {}).get("securityRules") or [] if r["name"] == MESH_RULE), None)
        if peers:
            wanted = rule(MESH_RULE, 120, "Udp", peer_cidrs(peers, "the Azure security group"), [str(port)])
            if current is not None and rule_key(current) == rule_key(wanted):
                continue
            provider.ctx.record(journal, {"subscription": where.subscription, "group": where.group})
            provider.ctx.log.info("azure: mesh port %d open to %d peer(s) in %s", port, len(peers), where.nsg)
            with provider.api.errors(f"set security rule {MESH_RULE} of {where.nsg}"):
                nc.security_rules.begin_create_or_update(where.group, where.nsg, MESH_RULE, wanted).result()
            _cache_mesh_rule(provider, key, wanted)
            continue
        if current is not None:
            with provider.api.errors(f"delete security rule {MESH_RULE} of {where.nsg}"):
                nc.security_rules.begin_delete(where.group, where.nsg, MESH_RULE).result()
            _cache_mesh_rule(provider, key, None)
        provider.ctx.record(journal, None)


def _cache_mesh_rule(provider: AzureProvider, key: tuple[str, str, str], wanted: dict[str, Any] | None) -> None:
    """Keep this run's copy of the security group as it now is (a later call compares with it)."""
    nsg = provider._nsgs.get(key)
    if not nsg:
        return
    props = nsg.setdefault("properties", {})
    props["securityRules"] = [r for r in props.get("securityRules") or [] if r["name"] != MESH_RULE]
    if wanted is not None:
        props["securityRules"].append(wanted)


