"""Networking of the aws provider: the VPC, subnets, internet gateway and route table dcx makes when a
pool names none, the cluster's security group and its rules, and the imported key pair.

Everything is tagged dcx:cluster / dcx:cluster-id and journaled (`aws/vpc/REGION`, `aws/subnet/REGION/AZ`,
`aws/igw/REGION`, `aws/rtb/REGION`, `aws/sg/REGION/VPC`, `aws/keypair/REGION`) before the call that
makes it. Every `ensure_*` looks up by tag (or name) first, so a re-run, or a run after one that was
killed half-way, makes nothing twice.

Security group rules: SSH from spec.network.sshCIDR only (never 0.0.0.0/0 unless written there);
the Kubernetes API (6443, engine k3s) from spec.network.apiCIDR (default: sshCIDR); all cluster
traffic only from the group itself; the mesh UDP port only from the /32 addresses that
`allow_mesh_peers` is given (other providers' nodes), or from anywhere once they outgrow the group's
rule quota (see `allow_mesh_peers`).

Every description and tag goes through aws_api.ec2_text / checked_tags (EC2's character sets and
lengths); every call naming a resource made moments ago goes through aws_api.settle (eventual
consistency).
"""

from __future__ import annotations

import datetime
import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any

from dcx.errors import InputError, ProviderError
from dcx.providers.aws_api import AwsApi, code_of, ec2_text, paged, settle, tag_spec
from dcx.providers.base import peer_cidrs

CHECKIP_URL = "https://checkip.amazonaws.com"
# Rule descriptions: EC2's character set has no apostrophe (aws_api.ec2_text checks each one).
SELF_RULE = "cluster traffic between the cluster nodes"
SSH_RULE = "SSH from spec.network.sshCIDR"
API_RULE = "Kubernetes API from spec.network.apiCIDR"
MESH_RULE = "dcx mesh from the cluster nodes elsewhere"
API_PORT = 6443
WORLD = "0.0.0.0/0"


@dataclass
class Site:
    """Where a pool's instances go: region, VPC, candidate subnets (first preferred), group, key."""

    region: str
    vpc_id: str
    vpc_cidrs: list[str]
    subnets: list[tuple[str, str]]  # (subnet id, availability zone)
    made_vpc: bool
    azs: list[str] = field(default_factory=list)  # zones for subnets dcx may still add (its own VPC)
    sg_id: str = ""
    key_name: str = ""


class AwsNetwork:
    def __init__(self, provider: Any) -> None:
        self.p = provider
        self.ctx = provider.ctx
        self.api: AwsApi = provider.api
        self._sites: dict[tuple[str, str, str], Site] = {}
        self._operator_cidr = ""

    # --- identity -------------------------------------------------------------------------------

    @property
    def resource_name(self) -> str:
        return f"dcx-{self.ctx.cluster_name}-{self.ctx.cluster_id}"

    def tags(self, name: str, **extra: str) -> dict[str, str]:
        """Tags of what dcx makes: the cluster's name and id (how sweeps find it), and who made it and
        when (what `destroy -f` lists when several clusters share a name)."""
        made = self.ctx.recorded("aws/created")
        if not made:
            # Journaled once: a launch retried by a later run must repeat its parameters exactly
            # (ClientToken idempotency), tags included.
            made = {"dcx:created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
            if self.api.caller():
                made["dcx:created-by"] = self.api.caller()
            self.ctx.record("aws/created", made)
        return {"dcx:cluster": self.ctx.cluster_name, "dcx:cluster-id": self.ctx.cluster_id, "Name": name,
                **made, **extra}

    def own_filters(self) -> list[dict[str, Any]]:
        """This cluster's resources, by its id: never by name alone, which other clusters (a
        colleague's) may share; without state, destroy finds the id first (find_clusters)."""
        if not self.ctx.cluster_id:
            raise ProviderError(f"no cluster id for '{self.ctx.cluster_name}': dcx does not sweep AWS by name alone")
        return [{"Name": "tag:dcx:cluster-id", "Values": [self.ctx.cluster_id]}]

    # --- the site of a pool ---------------------------------------------------------------------

    def site(self, region: str, settings: Any) -> Site:
        # Pools of one region without a VPC of their own share the cluster VPC (made from the first
        # such pool's vpcCIDR/subnetCIDR).
        key = (region, settings.vpc, settings.subnet)
        if key not in self._sites:
            site = self._given_site(region, settings) if (settings.vpc or settings.subnet) else \
                self._own_site(region, settings)
            site.key_name = self.ensure_key_pair(region)
            site.sg_id = self.ensure_security_group(site, settings)
            self._sites[key] = site
        return self._sites[key]

    def _given_site(self, region: str, s: Any) -> Site:
        ec2 = self.api.ec2(region)
        with self.api.errors(f"look up the subnet/VPC of the pool in {region}"):
            if s.subnet:
                found = ec2.describe_subnets(SubnetIds=[s.subnet])["Subnets"]
                subnet = found[0]
                if s.vpc and subnet["VpcId"] != s.vpc:
                    raise InputError(f"aws subnet {s.subnet} is in {subnet['VpcId']}, not in vpc {s.vpc}",
                                     hint="name a subnet of that VPC, or leave aws.vpc out")
                subnets = [(subnet["SubnetId"], subnet["AvailabilityZone"])]
                vpc_id = subnet["VpcId"]
            else:
                vpc_id = s.vpc
                found = paged(ec2, "describe_subnets", "Subnets", Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])
                if not found:
                    raise InputError(f"aws vpc {vpc_id} in {region} has no subnets",
                                     hint="make one, name it in aws.subnet, or leave aws.vpc out to let dcx make one")
                subnets = sorted((x["SubnetId"], x["AvailabilityZone"]) for x in found)
                subnets.sort(key=lambda t: t[1])
            vpc = ec2.describe_vpcs(VpcIds=[vpc_id])["Vpcs"][0]
        cidrs = [a["CidrBlock"] for a in vpc.get("CidrBlockAssociationSet", [])] or [vpc["CidrBlock"]]
        return Site(region=region, vpc_id=vpc_id, vpc_cidrs=cidrs, subnets=subnets, made_vpc=False)

    def _own_site(self, region: str, s: Any) -> Site:
        """The cluster's VPC with a public subnet, an internet gateway and a route table."""
        ec2 = self.api.ec2(region)
        with self.api.errors(f"look up the availability zones of {region}"):
            zones = ec2.describe_availability_zones(
                Filters=[{"Name": "state", "Values": ["available"]}, {"Name": "zone-type",
                                                                       "Values": ["availability-zone"]}])
        azs = sorted(z["ZoneName"] for z in zones["AvailabilityZones"])
        if not azs:
            raise ProviderError(f"AWS region {region} reports no available zone")
        vpc_id = self._ensure_vpc(region, s.vpcCIDR)
        igw_id = self._ensure_igw(region, vpc_id)
        site = Site(region=region, vpc_id=vpc_id, vpc_cidrs=[s.vpcCIDR], subnets=[], made_vpc=True, azs=azs)
        site.subnets.append(self.ensure_subnet(site, s, 0, igw_id))
        return site

    def _find(self, region: str, operation: str, key: str, extra: list[dict[str, Any]] | None = None,
              ) -> list[dict[str, Any]]:
        """This cluster's resources of one kind, by tag (id when known)."""
        ec2 = self.api.ec2(region)
        with self.api.errors(f"list {key} in {region}"):
            return paged(ec2, operation, key, Filters=self.own_filters() + (extra or []))

    def _ensure_vpc(self, region: str, cidr: str) -> str:
        key = f"aws/vpc/{region}"
        ec2 = self.api.ec2(region)
        found = self._find(region, "describe_vpcs", "Vpcs")
        if found:
            vpc_id = str(found[0]["VpcId"])
        else:
            self.ctx.record(key, {"state": "creating", "cidr": cidr})
            with self.api.errors(f"create a VPC in {region}"):
                vpc_id = ec2.create_vpc(CidrBlock=cidr, TagSpecifications=[
                    tag_spec("vpc", self.tags(self.resource_name))])["Vpc"]["VpcId"]
            self.ctx.record(key, {"id": vpc_id, "cidr": cidr})
        # A VPC found on a re-run gets the steps an earlier run did not finish: the journal says
        # which are done (no extra call when they are), else the attribute is asked for.
        done = self.ctx.recorded(key) or {}
        if done.get("id") != vpc_id or not done.get("dns"):
            with self.api.errors(f"enable DNS hostnames in {vpc_id}"):
                enabled = bool(found) and settle(ec2.describe_vpc_attribute, VpcId=vpc_id,
                                                 Attribute="enableDnsHostnames")["EnableDnsHostnames"]["Value"]
                if not enabled:  # instances get DNS names (their hostnames resolve inside the VPC)
                    settle(ec2.modify_vpc_attribute, VpcId=vpc_id, EnableDnsHostnames={"Value": True})
            self.ctx.record(key, {"id": vpc_id, "cidr": done.get("cidr", cidr), "dns": True})
        return vpc_id

    def _ensure_igw(self, region: str, vpc_id: str) -> str:
        ec2 = self.api.ec2(region)
        found = self._find(region, "describe_internet_gateways", "InternetGateways")
        if found:
            igw = found[0]
            igw_id = igw["InternetGatewayId"]
        else:
            self.ctx.record(f"aws/igw/{region}", {"state": "creating", "vpc": vpc_id})
            with self.api.errors(f"create an internet gateway in {region}"):
                igw = ec2.create_internet_gateway(TagSpecifications=[
                    tag_spec("internet-gateway", self.tags(self.resource_name))])["InternetGateway"]
            igw_id = igw["InternetGatewayId"]
            self.ctx.record(f"aws/igw/{region}", {"id": igw_id, "vpc": vpc_id})
        if not any(a.get("VpcId") == vpc_id for a in igw.get("Attachments") or []):
            with self.api.errors(f"attach internet gateway {igw_id} to {vpc_id}"):
                settle(ec2.attach_internet_gateway, InternetGatewayId=igw_id, VpcId=vpc_id)
        return str(igw_id)

    def _ensure_route_table(self, region: str, vpc_id: str, igw_id: str) -> dict[str, Any]:
        ec2 = self.api.ec2(region)
        found = self._find(region, "describe_route_tables", "RouteTables")
        if found:
            rtb = found[0]
        else:
            self.ctx.record(f"aws/rtb/{region}", {"state": "creating", "vpc": vpc_id})
            with self.api.errors(f"create a route table in {vpc_id}"):
                rtb = settle(ec2.create_route_table, VpcId=vpc_id, TagSpecifications=[
                    tag_spec("route-table", self.tags(self.resource_name))])["RouteTable"]
            self.ctx.record(f"aws/rtb/{region}", {"id": rtb["RouteTableId"], "vpc": vpc_id})
        if not any(r.get("DestinationCidrBlock") == "0.0.0.0/0" for r in rtb.get("Routes") or []):
            with self.api.errors(f"add the default route to {rtb['RouteTableId']}"):
                settle(ec2.create_route, RouteTableId=rtb["RouteTableId"], DestinationCidrBlock="0.0.0.0/0",
                       GatewayId=igw_id)
        return rtb

    def subnet_cidr(self, settings: Any, index: int) -> str:
        """Subnet `index` of the cluster VPC: subnetCIDR (default: the VPC's first block of 1/16 its
        size, /28 at the smallest), then the blocks of the same size after it, one per zone."""
        vpc = ipaddress.ip_network(settings.vpcCIDR)
        if settings.subnetCIDR:
            first = ipaddress.ip_network(settings.subnetCIDR)
        else:
            first = next(vpc.subnets(new_prefix=min(vpc.prefixlen + 4, 28)))
        blocks = list(vpc.subnets(new_prefix=first.prefixlen))
        start = blocks.index(first)
        if start + index >= len(blocks):
            raise ProviderError(f"aws vpcCIDR {vpc} has no room for another /{first.prefixlen} subnet")
        return str(blocks[start + index])

    def ensure_subnet(self, site: Site, settings: Any, index: int, igw_id: str = "") -> tuple[str, str]:
        """The subnet of the cluster VPC in zone `index` (made, tagged and routed when missing)."""
        region, az = site.region, site.azs[index % len(site.azs)]
        ec2 = self.api.ec2(region)
        found = self._find(region, "describe_subnets", "Subnets", [{"Name": "availability-zone", "Values": [az]},
                                                                   {"Name": "vpc-id", "Values": [site.vpc_id]}])
        if found:
            subnet_id = found[0]["SubnetId"]
        else:
            cidr = self.subnet_cidr(settings, index)
            self.ctx.record(f"aws/subnet/{region}/{az}", {"state": "creating", "cidr": cidr, "vpc": site.vpc_id})
            with self.api.errors(f"create subnet {cidr} in {az}"):
                subnet_id = settle(ec2.create_subnet, VpcId=site.vpc_id, CidrBlock=cidr, AvailabilityZone=az,
                                   TagSpecifications=[tag_spec("subnet", self.tags(
                                       f"{self.resource_name}-{az}"))])["Subnet"]["SubnetId"]
            self.ctx.record(f"aws/subnet/{region}/{az}", {"id": subnet_id, "cidr": cidr, "vpc": site.vpc_id})
        igw_id = igw_id or self._ensure_igw(region, site.vpc_id)
        rtb = self._ensure_route_table(region, site.vpc_id, igw_id)
        if not any(a.get("SubnetId") == subnet_id for a in rtb.get("Associations") or []):
            with self.api.errors(f"associate subnet {subnet_id} with route table {rtb['RouteTableId']}"):
                settle(ec2.associate_route_table, SubnetId=subnet_id, RouteTableId=rtb["RouteTableId"])
        return str(subnet_id), az

    def more_subnets(self, site: Site, settings: Any) -> tuple[str, str] | None:
        """Another zone's subnet after a capacity error: dcx adds one to its own VPC; a given VPC
        offers its other subnets (already in site.subnets); a given subnet offers nothing."""
        if not site.made_vpc or len(site.subnets) >= len(site.azs):
            return None
        subnet = self.ensure_subnet(site, settings, len(site.subnets))
        site.subnets.append(subnet)
        return subnet

    # --- security group -------------------------------------------------------------------------

    def ssh_cidrs(self, site: Site, settings: Any) -> list[str]:
        network = self.ctx.network
        given = [c.strip() for c in (network.sshCIDR if network is not None else "").split(",") if c.strip()]
        if given:
            if any(ipaddress.ip_network(c, strict=False).prefixlen == 0 for c in given):
                self.ctx.log.warning("spec.network.sshCIDR opens SSH to the whole internet, as written")
            return sorted({str(ipaddress.ip_network(c, strict=False)) for c in given})
        if settings.sshAddress == "private":
            # dcx reaches private addresses only from inside the network (a VPN, a bastion, a peer VPC).
            return list(site.vpc_cidrs)
        return [self.operator_cidr()]

    def api_cidrs(self, ssh: list[str]) -> list[str]:
        """Where the Kubernetes API (6443) is reached from, for engine k3s: the kubeconfig dcx writes
        points at a control node's public address, so the operator's addresses need it open:
        spec.network.apiCIDR, default the SSH sources. Nothing for swarm (or without a spec)."""
        spec = self.ctx.spec
        if spec is None or spec.spec.engine.type != "k3s":
            return []
        given = [c.strip() for c in (getattr(self.ctx.network, "apiCIDR", "") or "").split(",") if c.strip()]
        return sorted({str(ipaddress.ip_network(c, strict=False)) for c in given}) if given else ssh

    def operator_cidr(self) -> str:
        """This machine's public address as AWS sees it; never a silent 0.0.0.0/0."""
        if not self._operator_cidr:
            import urllib.request

            try:
                with urllib.request.urlopen(CHECKIP_URL, timeout=5) as resp:  # noqa: S310 - fixed https URL
                    address = ipaddress.ip_address(resp.read().decode().strip())
            except (OSError, ValueError):
                raise InputError("spec.network.sshCIDR is empty and this machine's public address could not be "
                                 f"found ({CHECKIP_URL})",
                                 hint="set spec.network.sshCIDR to the address(es) dcx connects from, "
                                      "e.g. 203.0.113.7/32") from None
            self._operator_cidr = f"{address}/{address.max_prefixlen}"
        return self._operator_cidr

    def ensure_security_group(self, site: Site, settings: Any) -> str:
        region = site.region
        ec2 = self.api.ec2(region)
        key = f"aws/sg/{region}/{site.vpc_id}"
        with self.api.errors(f"look up security group {self.resource_name} in {site.vpc_id}"):
            found = ec2.describe_security_groups(Filters=[
                {"Name": "vpc-id", "Values": [site.vpc_id]},
                {"Name": "group-name", "Values": [self.resource_name]}])["SecurityGroups"]
        if found:
            sg_id, permissions = found[0]["GroupId"], found[0].get("IpPermissions") or []
        else:
            self.ctx.record(key, {"state": "creating", "name": self.resource_name})
            with self.api.errors(f"create security group {self.resource_name} in {site.vpc_id}"):
                sg_id = settle(
                    ec2.create_security_group, GroupName=ec2_text(self.resource_name, "security group name"),
                    VpcId=site.vpc_id, Description=ec2_text(
                        f"dcx cluster {self.ctx.cluster_name} ({self.ctx.cluster_id})", "security group description"),
                    TagSpecifications=[tag_spec("security-group", self.tags(self.resource_name))])["GroupId"]
            self.ctx.record(key, {"id": sg_id, "name": self.resource_name})
            permissions = []
        ssh = self.ssh_cidrs(site, settings)
        wanted = {("tcp", 22, 22, cidr) for cidr in ssh} | {("-1", None, None, sg_id)}
        wanted |= {("tcp", API_PORT, API_PORT, cidr) for cidr in self.api_cidrs(ssh)}
        have = {r for r in rules(permissions) if _managed(r, sg_id)}
        self.apply_rules(region, sg_id, add=wanted - have, remove=have - wanted)
        return str(sg_id)

    def apply_rules(self, region: str, sg_id: str, add: set[tuple[Any, ...]], remove: set[tuple[Any, ...]],
                    quota_ok: bool = False) -> bool:
        """Stale rules go first (they free room in the group's rule quota), then the new ones. With
        `quota_ok`, RulesPerSecurityGroupLimitExceeded returns False (nothing was added) instead."""
        ec2 = self.api.ec2(region)
        if remove:
            with self.api.errors(f"remove stale rules from security group {sg_id}"):
                settle(ec2.revoke_security_group_ingress, GroupId=sg_id, IpPermissions=permissions_of(remove))
        if add:
            with self.api.errors(f"add rules to security group {sg_id}"):
                try:
                    settle(ec2.authorize_security_group_ingress, GroupId=sg_id, IpPermissions=permissions_of(add))
                except Exception as exc:
                    if quota_ok and code_of(exc) == "RulesPerSecurityGroupLimitExceeded":
                        return False
                    if code_of(exc) != "InvalidPermission.Duplicate":
                        raise
        return True

    def allow_mesh_peers(self, site: Site, peers: list[str], port: int) -> None:
        """The mesh port from exactly the peers' /32s, one rule each, while they fit the group's rule
        quota; beyond it, from anywhere (that one port only).

        Why not more: a group holds 60 inbound rules per IP version by default, and a referenced
        managed prefix list counts as its MaxEntries rules (VPC User Guide, "Amazon VPC quotas"), so a
        prefix list raises no ceiling over /32 rules; extra groups per interface (5 at most, set on
        every instance) only move it to ~300 while costing calls per instance. A hybrid cluster of
        hundreds of nodes exceeds any of them. The mesh is WireGuard: it answers no packet that is not
        a valid handshake from a configured peer key, so the open port shows nothing to, and accepts
        nothing from, anyone else (README, "The mesh"). The quota is learnt from EC2's answer
        (RulesPerSecurityGroupLimitExceeded; raised quotas work), and a later run with fewer peers
        narrows the port back to their /32s."""
        ec2 = self.api.ec2(site.region)
        with self.api.errors(f"read security group {site.sg_id}"):
            group = settle(ec2.describe_security_groups, GroupIds=[site.sg_id])["SecurityGroups"][0]
        have = {r for r in rules(group.get("IpPermissions") or []) if _is_mesh(r)}
        world = {("udp", port, port, WORLD)}
        wanted = {("udp", port, port, cidr) for cidr in peer_cidrs(peers, "the AWS security group")}
        if self.apply_rules(site.region, site.sg_id, add=wanted - have, remove=have - wanted - world,
                            quota_ok=True):
            if have & world and not wanted & world:
                self.apply_rules(site.region, site.sg_id, add=set(), remove=world)
            return
        self.ctx.log.warning("%d mesh peers exceed the rule quota of security group %s: its mesh port %d is "
                             "open to all (WireGuard answers only its peers)", len(wanted), site.sg_id, port)
        self.apply_rules(site.region, site.sg_id, add=world - have, remove=(have - world))

    # --- key pair -------------------------------------------------------------------------------

    def ensure_key_pair(self, region: str) -> str:
        ec2 = self.api.ec2(region)
        name = self.resource_name
        with self.api.errors(f"look up key pair {name} in {region}"):
            found = ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [name]}])["KeyPairs"]
        if found:
            return name
        self.ctx.record(f"aws/keypair/{region}", {"state": "creating", "name": name})
        with self.api.errors(f"import key pair {name} in {region}"):
            try:
                ec2.import_key_pair(KeyName=name, PublicKeyMaterial=self.ctx.ssh_public_key.encode(),
                                    TagSpecifications=[tag_spec("key-pair", self.tags(name))])
            except Exception as exc:
                if code_of(exc) != "InvalidKeyPair.Duplicate":
                    raise
        self.ctx.record(f"aws/keypair/{region}", {"name": name})
        return name

    # --- sweep ----------------------------------------------------------------------------------

    def sweep(self, region: str) -> list[str]:
        """Every tagged network resource, key pair and group of the cluster in a region (instances
        are gone by now). Order matters: groups, then gateways, subnets, route tables, VPCs."""
        ec2 = self.api.ec2(region)
        removed: list[str] = []
        for sg in self._find(region, "describe_security_groups", "SecurityGroups"):
            self._delete_when_free(lambda sg=sg: ec2.delete_security_group(GroupId=sg["GroupId"]),
                                   f"delete security group {sg['GroupId']}")
            removed.append(f"aws security-group {sg['GroupId']}")
        keys = {k["KeyName"] for k in self._find(region, "describe_key_pairs", "KeyPairs")}
        if self.ctx.cluster_id:  # the name alone finds a key whose tagging was interrupted
            with self.api.errors(f"look up key pair {self.resource_name}"):
                keys |= {k["KeyName"] for k in ec2.describe_key_pairs(
                    Filters=[{"Name": "key-name", "Values": [self.resource_name]}])["KeyPairs"]}
        for name in sorted(keys):
            with self.api.errors(f"delete key pair {name}"):
                ec2.delete_key_pair(KeyName=name)
            removed.append(f"aws key-pair {name}")
        for igw in self._find(region, "describe_internet_gateways", "InternetGateways"):
            # Detaching answers DependencyViolation while the VPC still maps public addresses of
            # instances being terminated: retried like the other deletes.
            for att in igw.get("Attachments") or []:
                self._delete_when_free(lambda i=igw, a=att: ec2.detach_internet_gateway(
                    InternetGatewayId=i["InternetGatewayId"], VpcId=a["VpcId"]),
                    f"detach internet gateway {igw['InternetGatewayId']} from {att['VpcId']}")
            with self.api.errors(f"delete internet gateway {igw['InternetGatewayId']}"):
                ec2.delete_internet_gateway(InternetGatewayId=igw["InternetGatewayId"])
            removed.append(f"aws internet-gateway {igw['InternetGatewayId']}")
        for subnet in self._find(region, "describe_subnets", "Subnets"):
            self._delete_when_free(lambda s=subnet: ec2.delete_subnet(SubnetId=s["SubnetId"]),
                                   f"delete subnet {subnet['SubnetId']}")
            removed.append(f"aws subnet {subnet['SubnetId']}")
        for rtb in self._find(region, "describe_route_tables", "RouteTables"):
            with self.api.errors(f"delete route table {rtb['RouteTableId']}"):
                for assoc in rtb.get("Associations") or []:
                    if not assoc.get("Main") and assoc.get("RouteTableAssociationId"):
                        _ignore_missing(lambda a=assoc: ec2.disassociate_route_table(
                            AssociationId=a["RouteTableAssociationId"]))
                ec2.delete_route_table(RouteTableId=rtb["RouteTableId"])
            removed.append(f"aws route-table {rtb['RouteTableId']}")
        for vpc in self._find(region, "describe_vpcs", "Vpcs"):
            self._delete_when_free(lambda v=vpc: ec2.delete_vpc(VpcId=v["VpcId"]), f"delete VPC {vpc['VpcId']}")
            removed.append(f"aws vpc {vpc['VpcId']}")
        return removed

    def _delete_when_free(self, call: Any, what: str, timeout: float = 300) -> None:
        """Network interfaces of terminated instances take a while to go; until then AWS answers
        DependencyViolation. A resource already gone is fine."""
        deadline = time.monotonic() + timeout
        delay = 1.0
        with self.api.errors(what):
            while True:
                try:
                    call()
                    return
                except Exception as exc:
                    code = code_of(exc)
                    if code.endswith(".NotFound") or code == "Gateway.NotAttached":
                        return
                    if code != "DependencyViolation" or time.monotonic() > deadline:
                        raise
                time.sleep(delay)
                delay = min(delay * 2, 5)


def rules(permissions: list[dict[str, Any]]) -> set[tuple[Any, ...]]:
    """Ingress rules flattened to (protocol, from port, to port, CIDR or group id)."""
    out = set()
    for perm in permissions:
        proto, lo, hi = perm.get("IpProtocol"), perm.get("FromPort"), perm.get("ToPort")
        if proto == "-1":
            lo = hi = None
        for r in perm.get("IpRanges") or []:
            out.add((proto, lo, hi, r["CidrIp"]))
        for r in perm.get("Ipv6Ranges") or []:
            out.add((proto, lo, hi, r["CidrIpv6"]))
        for r in perm.get("UserIdGroupPairs") or []:
            out.add((proto, lo, hi, r["GroupId"]))
    return out


def permissions_of(wanted: set[tuple[Any, ...]]) -> list[dict[str, Any]]:
    out = []
    for proto, lo, hi, source in sorted(wanted, key=str):
        perm: dict[str, Any] = {"IpProtocol": proto}
        if lo is not None:
            perm.update(FromPort=lo, ToPort=hi)
        desc = ec2_text(SELF_RULE if source.startswith("sg-") else SSH_RULE if (proto, lo) == ("tcp", 22)
                        else API_RULE if (proto, lo) == ("tcp", API_PORT) else MESH_RULE, "rule description")
        if source.startswith("sg-"):
            perm["UserIdGroupPairs"] = [{"GroupId": source, "Description": desc}]
        elif ":" in source:
            perm["Ipv6Ranges"] = [{"CidrIpv6": source, "Description": desc}]
        else:
            perm["IpRanges"] = [{"CidrIp": source, "Description": desc}]
        out.append(perm)
    return out


def _managed(rule: tuple[Any, ...], sg_id: str) -> bool:
    """Rules ensure_security_group owns: SSH and API sources and traffic from groups (mesh rules are
    apart)."""
    proto, lo, _hi, source = rule
    return (proto, lo) in (("tcp", 22), ("tcp", API_PORT)) or str(source).startswith("sg-")


def _is_mesh(rule: tuple[Any, ...]) -> bool:
    proto, _lo, _hi, source = rule
    return proto == "udp" and not str(source).startswith("sg-")


def _ignore_missing(call: Any) -> None:
    try:
        call()
    except Exception as exc:
        if not code_of(exc).endswith(".NotFound"):
            raise
