"""The `gcp` provider: Compute Engine instances (google-cloud-compute, REST).

A pool's section: `gcp: {project, zone, machineType, image, network, subnetwork, subnetCIDR,
preemptible, diskGiB, diskType, labels, sshAddress: public|private, externalIP}`.

- Network: the pool's network/subnetwork, or a VPC network `dcx-<id>` with one subnetwork per region
  (`subnetCIDR`) that dcx makes. Firewall rules select instances by the network tag `dcx-<id>`: SSH
  from spec.network.sshCIDR only; the engine's ports only from instances with the tag; the mesh UDP
  port only from the other providers' nodes (/32s), when the cluster spans providers.
- Instances: one bulkInsert per pool batch, after a look-up by labels, so a re-run never duplicates.
  Names are the node names.
- Identity: instances carry labels dcx-cluster, dcx-cluster-id, dcx-pool, dcx-created and
  dcx-created-by (the credentials' service account, label-safe); firewalls, networks and subnetworks
  carry the cluster in their description (they have no labels). `find_clusters` lists the clusters of
  a name (for destroy without state); `sweep` goes by the cluster id, by name alone only when no id
  is known.
- Boot disk: a type per machine series (pd-balanced, or hyperdisk-balanced for the Hyperdisk-only
  4th generation), never the API's default pd-standard; `diskType` overrides it.
- Request ids: a bulkInsert's id is journalled per attempt (see _request_id): the API replays an id
  for 60 minutes, so a new attempt gets a new id, a retry of one attempt the same.

Credentials, endpoint override (DCX_GCP_ENDPOINT), retries and operations: dcx.providers.gcp_api.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dcx.errors import InputError, ProviderError
from dcx.providers.base import FoundCluster, Node, NodeRequest, Provider, peer_cidrs

NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
ZONE_RE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")
LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE_RE = re.compile(r"^[a-z0-9_-]{0,63}$")
IMAGE_RE = re.compile(r"^(https://www\.googleapis\.com/compute/v1/)?projects/[a-z][-a-z0-9.:]*/global/images/"
                      r"(family/)?[a-z]([-a-z0-9]*[a-z0-9])?$")
UBUNTU_FAMILY = "projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-{arch}"
ARM_SERIES = ("t2a-", "c4a-", "n4a-")
# Cloud images' sshd listens on 22 and dcx does not move it (spec.ssh.port is the default port of ssh
# pools' hosts): the firewall opens the port dcx connects to.
SSH_PORT = 22
# Boot disk types by machine series (Compute Engine docs, "Machine series comparison" and "Choose a
# disk type"): the 4th-generation series take Hyperdisk only (Hyperdisk Balanced is the one that can
# boot); C3, C3D and H3 take no Standard Persistent Disk. The API's default, pd-standard, fails on all
# of them, so dcx always names a type: pd-balanced where Persistent Disk works, else hyperdisk-balanced.
HYPERDISK_ONLY = ("c4", "c4a", "c4d", "n4", "n4a", "n4d", "h4d", "x4", "m4", "a4", "a4x")
NO_PD_STANDARD = ("c3", "c3d", "h3")
BOOT_DISK_TYPES = ("pd-balanced", "pd-ssd", "pd-standard", "pd-extreme", "hyperdisk-balanced")
BATCH = 500  # instances per bulkInsert call (the API takes up to 1000)
PAGE = 500  # maxResults of list calls (the API's maximum)
PARALLEL_DELETES = 16
ADDRESS_TIMEOUT = 300.0  # seconds for starting instances to get their addresses
ADDRESS_POLL = 3.0
RESERVED_LABELS = ("dcx-cluster", "dcx-cluster-id", "dcx-pool", "dcx-created", "dcx-created-by")
LABEL_UNSAFE = re.compile(r"[^a-z0-9_-]")
STOPPED = ("TERMINATED", "STOPPED")  # what a preempted (or user-stopped) instance shows
DESCRIPTION_RE = re.compile(r"^dcx-cluster=(\S+) dcx-cluster-id=([^\s:]*):")

# Engine ports between the cluster's own instances (source: the cluster's network tag).
ENGINE_PORTS: dict[str, list[dict[str, Any]]] = {
    "swarm": [{"IPProtocol": "tcp", "ports": ["2377", "7946"]}, {"IPProtocol": "udp", "ports": ["7946", "4789"]},
              {"IPProtocol": "esp"}],  # esp: swarm's encrypted overlay networks
    "k3s": [{"IPProtocol": "tcp", "ports": ["6443", "10250", "2379-2380"]}, {"IPProtocol": "udp", "ports": ["8472"]}],
}


class GcpSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project: str = ""  # default: GOOGLE_CLOUD_PROJECT, CLOUDSDK_CORE_PROJECT, then the credentials' project
    zone: str = ""  # default: CLOUDSDK_COMPUTE_ZONE
    machineType: str = Field(default="e2-small", pattern=r"^[a-z][-a-z0-9]*[a-z0-9]$")
    image: str = ""  # default: the latest Ubuntu LTS image family (amd64, or arm64 for Arm machine types)
    network: str = ""  # default: a VPC network dcx makes (dcx-<cluster id>)
    subnetwork: str = ""
    subnetCIDR: str = "10.128.0.0/20"  # the range of the subnetwork dcx makes (when it makes the network)
    preemptible: bool = False
    diskGiB: int = Field(default=20, ge=10, le=65536)
    diskType: str = ""  # the boot disk's type; default: per machine series (see boot_disk_type)
    labels: dict[str, str] = Field(default_factory=dict)
    sshAddress: Literal["public", "private"] = "public"
    externalIP: bool = True  # an ephemeral public address (internet access without Cloud NAT, the mesh)

    @field_validator("zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        if value and not ZONE_RE.match(value):
            raise ValueError("must be a zone name such as us-central1-a")
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if value and not IMAGE_RE.match(value):
            raise ValueError("must be projects/PROJECT/global/images/NAME or .../images/family/FAMILY")
        return value

    @field_validator("network", "subnetwork")
    @classmethod
    def _resource_name(cls, value: str) -> str:
        if value and not NAME_RE.match(value):
            raise ValueError("must be a resource name: lowercase letters, digits and '-', starting with a letter")
        return value

    @field_validator("subnetCIDR")
    @classmethod
    def _cidr(cls, value: str) -> str:
        net = ipaddress.ip_network(value, strict=True)
        if net.version != 4 or not net.is_private or net.prefixlen > 29:
            raise ValueError("must be a private IPv4 network of /29 or larger")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            if not LABEL_KEY_RE.match(key):
                raise ValueError(f"label key '{key}': lowercase letters, digits, '_' and '-', starting with a "
                                 "letter, at most 63 characters")
            if not LABEL_VALUE_RE.match(str(value)):
                raise ValueError(f"label '{key}': the value may hold lowercase letters, digits, '_' and '-' only "
                                 "(at most 63)")
            if key in RESERVED_LABELS:
                raise ValueError(f"label '{key}' is set by dcx")
        if len(labels) > 64 - len(RESERVED_LABELS):
            raise ValueError(f"at most {64 - len(RESERVED_LABELS)} labels")
        return labels

    @field_validator("diskType")
    @classmethod
    def _disk_type(cls, value: str) -> str:
        if value and value not in BOOT_DISK_TYPES:
            raise ValueError(f"must be a disk type that can boot: {', '.join(BOOT_DISK_TYPES)}")
        return value

    @property
    def boot_disk_type(self) -> str:
        return self.diskType or boot_disk_type(self.machineType)

    @model_validator(mode="after")
    def _subnetwork_needs_network(self) -> GcpSettings:
        if self.subnetwork and not self.network:
            raise ValueError("subnetwork needs network (the VPC network it belongs to)")
        if self.sshAddress == "public" and not self.externalIP:
            raise ValueError("sshAddress: public needs externalIP: true")
        allowed = disk_types_of(self.machineType)
        if self.diskType and self.diskType not in allowed:
            raise ValueError(f"diskType {self.diskType} cannot be used with machineType {self.machineType}: "
                             f"its series takes {', '.join(allowed)}")
        return self


def label_safe(text: str) -> str:
    """A label value (lowercase letters, digits, '_', '-'; at most 63) that says the same as `text`."""
    return LABEL_UNSAFE.sub("_", text.lower())[:63]


def series_of(machine_type: str) -> str:
    return machine_type.split("-", 1)[0]


def disk_types_of(machine_type: str) -> tuple[str, ...]:
    """The boot disk types a machine type's series accepts (BOOT_DISK_TYPES, narrowed per series)."""
    series = series_of(machine_type)
    if series in HYPERDISK_ONLY:
        return ("hyperdisk-balanced",)
    if series in NO_PD_STANDARD:
        return tuple(t for t in BOOT_DISK_TYPES if t not in ("pd-standard", "pd-extreme"))
    return BOOT_DISK_TYPES


def boot_disk_type(machine_type: str) -> str:
    return "hyperdisk-balanced" if series_of(machine_type) in HYPERDISK_ONLY else "pd-balanced"


@dataclass
class Where:
    """Where a pool's instances go, resolved: project, zone, network and subnetwork links."""

    project: str
    zone: str
    network: str  # name
    subnetwork: str  # partial URL, "" for an auto-mode network
    made_by_dcx: bool

    @property
    def region(self) -> str:
        return self.zone[:-2]

    @property
    def network_link(self) -> str:
        return f"projects/{self.project}/global/networks/{self.network}"


class GcpProvider(Provider):
    name = "gcp"
    settings_model = GcpSettings

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        from dcx.providers.gcp_api import Api

        self.api = Api()
        self._ready: set[tuple[str, ...]] = set()  # networks/subnetworks/firewalls checked this run

    def check_prerequisites(self) -> None:
        self.api.ensure_credentials()

    # --- identity and naming --------------------------------------------------------------------

    @property
    def tag(self) -> str:
        return f"dcx-{self.ctx.cluster_id}"

    def description(self, what: str) -> str:
        return f"dcx-cluster={self.ctx.cluster_name} dcx-cluster-id={self.ctx.cluster_id}: {what}"

    def owns(self, description: str) -> bool:
        """Whether a firewall/network/subnetwork description marks it as this cluster's."""
        m = DESCRIPTION_RE.match(description or "")
        if not m:
            return False
        if self.ctx.cluster_id:
            return m.group(2) == self.ctx.cluster_id
        return m.group(1) == self.ctx.cluster_name

    def creation_labels(self) -> dict[str, str]:
        """When and by whom (the credentials' service account) the cluster was made, label-safe
        (lowercase letters, digits, '_' and '-', at most 63): `dcx-created` 20261201t023306z,
        `dcx-created-by` dcx_my-project_iam_gserviceaccount_com. What the state recorded first is
        kept, so every run labels alike."""
        key = "gcp/created"
        recorded = self.ctx.recorded(key)
        if not recorded:
            import datetime

            when = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dt%H%M%Sz")
            recorded = {"dcx-created": when, "dcx-created-by": label_safe(self.api.identity())}
            self.ctx.record(key, recorded)
        return {k: v for k, v in dict(recorded).items() if v}

    def find_clusters(self, pools: list[Any]) -> list[FoundCluster]:
        """Clusters of this name in the pools' projects: instances by labels (with when and by whom),
        and networks/firewalls by description (a cluster whose instances are gone)."""
        from google.cloud import compute_v1

        found: dict[tuple[str, str], FoundCluster] = {}
        for project in sorted({self.project_of(pool) for pool in pools}):
            client = self.api.client("InstancesClient")
            wanted = f'(labels.dcx-cluster = "{self.ctx.cluster_name}")'
            with self.api.errors("list instances"):
                for _, scoped in client.aggregated_list(request=compute_v1.AggregatedListInstancesRequest(
                        project=project, filter=wanted, max_results=PAGE), retry=self.api.retry):
                    for inst in scoped.instances:
                        labels = dict(inst.labels)
                        cid = labels.get("dcx-cluster-id", "")
                        if cid and (project, cid) not in found:
                            found[(project, cid)] = FoundCluster(
                                id=cid, name=self.ctx.cluster_name, provider=self.name, where=f"project {project}",
                                created=labels.get("dcx-created", ""), created_by=labels.get("dcx-created-by", ""))
            for kind in ("FirewallsClient", "NetworksClient"):
                lister = self.api.client(kind)
                request = (compute_v1.ListFirewallsRequest if kind == "FirewallsClient" else
                           compute_v1.ListNetworksRequest)(project=project, filter='name eq "dcx-.*"', max_results=PAGE)
                with self.api.errors(f"list {'firewall rules' if kind == 'FirewallsClient' else 'networks'}"):
                    for item in lister.list(request=request, retry=self.api.retry):
                        m = DESCRIPTION_RE.match(item.description or "")
                        cid = m.group(2) if m and m.group(1) == self.ctx.cluster_name else ""
                        if cid and (project, cid) not in found:
                            found[(project, cid)] = FoundCluster(
                                id=cid, name=self.ctx.cluster_name, provider=self.name,
                                where=f"project {project}", created=item.creation_timestamp or "")
        return sorted(found.values(), key=lambda c: (c.id, c.where))

    def label_filter(self, pool: str | None = None) -> str:
        # With the id unknown (state lost) the cluster's name is all there is to match.
        parts = [f'(labels.dcx-cluster = "{self.ctx.cluster_name}")']
        if self.ctx.cluster_id:
            parts.append(f'(labels.dcx-cluster-id = "{self.ctx.cluster_id}")')
        if pool:
            parts.append(f'(labels.dcx-pool = "{pool}")')
        return " AND ".join(parts)

    def rule_prefix(self, where: Where) -> str:
        if where.made_by_dcx:
            return self.tag
        # A user's network: the rules are per network (a cluster may use several).
        return f"{self.tag}-{hashlib.sha256(where.network_link.encode()).hexdigest()[:6]}"

    # --- settings resolution --------------------------------------------------------------------

    def settings(self, pool: Any) -> GcpSettings:
        return GcpSettings.model_validate(pool.settings)

    def project_of(self, pool: Any) -> str:
        s = self.settings(pool)
        project = (s.project or os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("CLOUDSDK_CORE_PROJECT")
                   or "")
        if not project:
            self.api.ensure_credentials()
            project = self.api.credentials_project
        if not project:
            raise InputError(f"pool {pool.name}: no GCP project",
                             hint="set gcp.project in the pool, or GOOGLE_CLOUD_PROJECT")
        return project

    def zone_of(self, pool: Any) -> str:
        zone = self.settings(pool).zone or os.environ.get("CLOUDSDK_COMPUTE_ZONE", "")
        if not zone:
            raise InputError(f"pool {pool.name}: no GCP zone", hint="set gcp.zone in the pool (e.g. us-central1-a)")
        if not ZONE_RE.match(zone):
            raise InputError(f"pool {pool.name}: '{zone}' is not a zone name", hint="e.g. us-central1-a")
        return zone

    def where(self, pool: Any) -> Where:
        s = self.settings(pool)
        project, zone = self.project_of(pool), self.zone_of(pool)
        if s.network:
            sub = f"projects/{project}/regions/{zone[:-2]}/subnetworks/{s.subnetwork}" if s.subnetwork else ""
            return Where(project, zone, s.network, sub, made_by_dcx=False)
        return Where(project, zone, self.tag, f"projects/{project}/regions/{zone[:-2]}/subnetworks/{self.tag}-"
                     f"{zone[:-2]}", made_by_dcx=True)

    # --- network and firewalls ------------------------------------------------------------------

    def check_subnet_plan(self) -> None:
        """The network dcx makes has one subnetwork per region: pools of a region share its range and
        ranges of different regions must not overlap (the API would refuse the second)."""
        spec = self.ctx.spec
        if spec is None:
            return
        by_region: dict[tuple[str, str], tuple[str, str]] = {}  # (project, region) -> (cidr, pool)
        for p in spec.spec.pools:
            if p.provider != self.name or self.settings(p).network:
                continue
            key = (self.project_of(p), self.zone_of(p)[:-2])
            cidr = self.settings(p).subnetCIDR
            seen = by_region.setdefault(key, (cidr, p.name))
            if seen[0] != cidr:
                raise InputError(f"pools {seen[1]} and {p.name} are both in region {key[1]} but give different "
                                 f"gcp.subnetCIDR ({seen[0]}, {cidr})", hint="the region's subnetwork has one range: "
                                 "give them the same subnetCIDR")
        ranges = [(ipaddress.ip_network(cidr), project, region, pool)
                  for (project, region), (cidr, pool) in by_region.items()]
        for i, (net, project, region, pool) in enumerate(ranges):
            for other, oproject, oregion, opool in ranges[i + 1:]:
                if project == oproject and net.overlaps(other):
                    raise InputError(f"pools {pool} ({region}) and {opool} ({oregion}) have overlapping "
                                     f"gcp.subnetCIDR ({net}, {other})",
                                     hint="give each region's pools its own subnetCIDR (one VPC spans regions)")

    def ensure_network(self, pool: Any, where: Where) -> None:
        key = ("net", where.project, where.network, where.region)
        if key in self._ready:
            return
        from google.cloud import compute_v1

        from dcx.providers.gcp_api import is_not_found, new_request_id

        nets = self.api.client("NetworksClient")
        network = None
        with self.api.errors(f"get network {where.network}"):
            try:
                network = nets.get(project=where.project, network=where.network, retry=self.api.retry)
            except Exception as exc:
                if not is_not_found(exc):
                    raise
        if network is None:
            if not where.made_by_dcx:
                raise InputError(f"pool {pool.name}: network '{where.network}' does not exist in project "
                                 f"{where.project}", hint="create it, or leave gcp.network empty to let dcx make one")
            self.ctx.record(f"gcp/network/{where.network}", {"project": where.project})
            self.ctx.log.info("gcp: creating network %s in project %s", where.network, where.project)
            with self.api.errors(f"create network {where.network}"):
                op = nets.insert_unary(request=compute_v1.InsertNetworkRequest(
                    project=where.project, request_id=new_request_id(), network_resource=compute_v1.Network(
                        name=where.network, auto_create_subnetworks=False,
                        description=self.description("the cluster's VPC network"),
                        routing_config=compute_v1.NetworkRoutingConfig(routing_mode="REGIONAL"))),
                    retry=self.api.retry)
            self.api.wait(where.project, op, f"create network {where.network}")
        elif not where.subnetwork and not network.auto_create_subnetworks:
            raise InputError(f"pool {pool.name}: network '{where.network}' is a custom-mode network",
                             hint="set gcp.subnetwork to one of its subnetworks in the zone's region")
        if where.subnetwork:
            self._ensure_subnetwork(pool, where)
        self._ready.add(key)

    def _ensure_subnetwork(self, pool: Any, where: Where) -> None:
        from google.cloud import compute_v1

        from dcx.providers.gcp_api import is_not_found, new_request_id

        subs = self.api.client("SubnetworksClient")
        name = where.subnetwork.rsplit("/", 1)[1]
        with self.api.errors(f"get subnetwork {name}"):
            try:
                subs.get(project=where.project, region=where.region, subnetwork=name, retry=self.api.retry)
                return
            except Exception as exc:
                if not is_not_found(exc):
                    raise
        if not where.made_by_dcx:
            raise InputError(f"pool {pool.name}: subnetwork '{name}' does not exist in region {where.region} "
                             f"of project {where.project}", hint="check gcp.subnetwork and gcp.zone")
        cidr = self.settings(pool).subnetCIDR
        self.ctx.record(f"gcp/subnetwork/{where.region}/{name}", {"project": where.project, "cidr": cidr})
        self.ctx.log.info("gcp: creating subnetwork %s (%s) in %s", name, cidr, where.region)
        with self.api.errors(f"create subnetwork {name}"):
            op = subs.insert_unary(request=compute_v1.InsertSubnetworkRequest(
                project=where.project, region=where.region, request_id=new_request_id(),
                subnetwork_resource=compute_v1.Subnetwork(
                    name=name, network=where.network_link, ip_cidr_range=cidr,
                    description=self.description(f"the cluster's subnetwork in {where.region}"))),
                retry=self.api.retry)
        self.api.wait(where.project, op, f"create subnetwork {name} ({cidr})")

    def ssh_sources(self) -> list[str]:
        network = self.ctx.network
        cidrs = [c.strip() for c in (network.sshCIDR if network is not None else "").split(",") if c.strip()]
        if not cidrs:
            raise InputError("spec.network.sshCIDR is empty: GCP pools open SSH only to the addresses given there",
                             hint="set spec.network.sshCIDR to the address(es) dcx connects from, e.g. 203.0.113.7/32")
        return sorted(str(ipaddress.ip_network(c, strict=False)) for c in cidrs)

    def api_sources(self) -> list[str]:
        """Where kubectl reaches a k3s cluster's API from: spec.network.apiCIDR, else sshCIDR."""
        network = self.ctx.network
        cidrs = [c.strip() for c in (getattr(network, "apiCIDR", "") or "").split(",") if c.strip()]
        return sorted(str(ipaddress.ip_network(c, strict=False)) for c in cidrs) if cidrs else self.ssh_sources()

    def wanted_firewalls(self, where: Where) -> dict[str, dict[str, Any]]:
        """The SSH and engine rules of a network, by name: {allowed, sourceRanges|sourceTags}."""
        network = self.ctx.network
        ssh_cidrs = self.ssh_sources()
        spec = self.ctx.spec
        engine = spec.spec.engine.type if spec is not None else "swarm"
        internal = [dict(r) for r in ENGINE_PORTS.get(engine, ENGINE_PORTS["swarm"])] + [{"IPProtocol": "icmp"}]
        if network is not None and network.mesh != "none":
            internal.append({"IPProtocol": "udp", "ports": [str(network.meshPort)]})
        prefix = self.rule_prefix(where)
        api = {f"{prefix}-api": {"allowed": [{"IPProtocol": "tcp", "ports": ["6443"]}],
                                 "sourceRanges": self.api_sources(),
                                 "what": "the k3s API from spec.network.apiCIDR (kubectl)"}} if engine == "k3s" else {}
        return {**api,
            # The port dcx connects to (Node.ssh_port): the image's sshd, which dcx does not move.
            f"{prefix}-ssh": {"allowed": [{"IPProtocol": "tcp", "ports": [str(SSH_PORT)]}],
                              "sourceRanges": ssh_cidrs,
                              "what": "SSH from spec.network.sshCIDR"},
            f"{prefix}-internal": {"allowed": internal, "sourceTags": [self.tag],
                                   "what": f"{engine} ports between the cluster's instances"},
        }

    def ensure_firewalls(self, where: Where) -> None:
        key = ("fw", where.project, where.network)
        if key in self._ready:
            return
        for name, rule in self.wanted_firewalls(where).items():
            self._ensure_firewall(where, name, rule)
        self._ready.add(key)

    def _ensure_firewall(self, where: Where, name: str, rule: dict[str, Any]) -> None:
        """Create the rule, or patch it when it differs from what is wanted (an edited sshCIDR)."""
        from google.cloud import compute_v1

        from dcx.providers.gcp_api import is_not_found, new_request_id

        fws = self.api.client("FirewallsClient")
        body = compute_v1.Firewall(
            name=name, network=where.network_link, direction="INGRESS", priority=1000,
            description=self.description(rule["what"]), target_tags=[self.tag],
            allowed=[compute_v1.Allowed(I_p_protocol=a["IPProtocol"], ports=a.get("ports", []))
                     for a in rule["allowed"]],
            source_ranges=rule.get("sourceRanges", []), source_tags=rule.get("sourceTags", []))
        current = None
        with self.api.errors(f"get firewall rule {name}"):
            try:
                current = fws.get(project=where.project, firewall=name, retry=self.api.retry)
            except Exception as exc:
                if not is_not_found(exc):
                    raise
        if current is None:
            self.ctx.record(f"gcp/firewall/{name}", {"project": where.project})
            self.ctx.log.info("gcp: creating firewall rule %s", name)
            with self.api.errors(f"create firewall rule {name}"):
                op = fws.insert_unary(request=compute_v1.InsertFirewallRequest(
                    project=where.project, firewall_resource=body, request_id=new_request_id()),
                    retry=self.api.retry)
            self.api.wait(where.project, op, f"create firewall rule {name}")
        elif _rule_key(current) != _rule_key(body):
            self.ctx.log.info("gcp: updating firewall rule %s", name)
            with self.api.errors(f"update firewall rule {name}"):
                op = fws.patch_unary(request=compute_v1.PatchFirewallRequest(
                    project=where.project, firewall=name, firewall_resource=body, request_id=new_request_id()),
                    retry=self.api.retry)
            self.api.wait(where.project, op, f"update firewall rule {name}")

    def allow_mesh_peers(self, pools: list[Any], peers: list[str], port: int) -> None:
        from google.cloud import compute_v1

        from dcx.providers.gcp_api import is_not_found, new_request_id

        fws = self.api.client("FirewallsClient")
        seen: set[tuple[str, str]] = set()
        for pool in pools:
            where = self.where(pool)
            if (where.project, where.network) in seen:
                continue
            seen.add((where.project, where.network))
            name = f"{self.rule_prefix(where)}-mesh"
            if peers:
                ranges = peer_cidrs(peers, "the GCP firewall")
                self._ensure_firewall(where, name, {"allowed": [{"IPProtocol": "udp", "ports": [str(port)]}],
                                                    "sourceRanges": ranges,
                                                    "what": "the mesh port from the cluster's nodes elsewhere"})
                continue
            if self.ctx.recorded(f"gcp/firewall/{name}") is None:
                continue  # never opened (the usual case): no call at all
            with self.api.errors(f"delete firewall rule {name}"):
                try:
                    op = fws.delete_unary(request=compute_v1.DeleteFirewallRequest(
                        project=where.project, firewall=name, request_id=new_request_id()), retry=self.api.retry)
                except Exception as exc:
                    if not is_not_found(exc):
                        raise
                    continue
            self.api.wait(where.project, op, f"delete firewall rule {name}")
            self.ctx.record(f"gcp/firewall/{name}", None)

    # --- instances ------------------------------------------------------------------------------

    def user_data(self) -> str:
        from dcx.templates import render

        user = self.ctx.ssh_user
        text = render("cloud-init.yaml", hostname="-", user=user, public_key=self.ctx.ssh_public_key,
                      disable_root="false" if user == "root" else "true")
        # One bulkInsert carries one user-data for many instances, so it cannot name each host: GCE
        # names the guest after its instance (the node name) through its metadata server.
        return "\n".join(line for line in text.splitlines() if not line.startswith("hostname:")) + "\n"

    def instance_properties(self, pool: Any, where: Where) -> Any:
        from google.cloud import compute_v1

        s = self.settings(pool)
        arch = "arm64" if s.machineType.startswith(ARM_SERIES) else "amd64"
        image = s.image or UBUNTU_FAMILY.format(arch=arch)
        labels = {**s.labels, "dcx-cluster": self.ctx.cluster_name, "dcx-cluster-id": self.ctx.cluster_id,
                  "dcx-pool": pool.name, **self.creation_labels()}
        nic = compute_v1.NetworkInterface(network=where.network_link)
        if where.subnetwork:
            nic.subnetwork = where.subnetwork
        if s.externalIP:
            nic.access_configs = [compute_v1.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")]
        scheduling = compute_v1.Scheduling(preemptible=True, automatic_restart=False,
                                           on_host_maintenance="TERMINATE") if s.preemptible else None
        props = compute_v1.InstanceProperties(
            machine_type=s.machineType, labels=labels, tags=compute_v1.Tags(items=[self.tag]),
            description=self.description(f"pool {pool.name}"),
            disks=[compute_v1.AttachedDisk(
                boot=True, auto_delete=True, type_="PERSISTENT",
                initialize_params=compute_v1.AttachedDiskInitializeParams(
                    source_image=image, disk_size_gb=s.diskGiB, labels=labels,
                    # A type name, as instance properties take it (not a URL); never the API's
                    # default pd-standard, which newer series refuse.
                    disk_type=s.boot_disk_type))],
            network_interfaces=[nic],
            metadata=compute_v1.Metadata(items=[
                compute_v1.Items(key="ssh-keys", value=f"{self.ctx.ssh_user}:{self.ctx.ssh_public_key}"),
                compute_v1.Items(key="user-data", value=self.user_data())]))
        if scheduling is not None:
            props.scheduling = scheduling
        return props

    def list_instances(self, project: str, zone: str, pool: str | None = None) -> list[Any]:
        from google.cloud import compute_v1

        client = self.api.client("InstancesClient")
        with self.api.errors(f"list instances in {zone}"):
            return list(client.list(request=compute_v1.ListInstancesRequest(
                project=project, zone=zone, filter=self.label_filter(pool), max_results=PAGE), retry=self.api.retry))

    def create_nodes(self, pool: Any, requests: list[NodeRequest]) -> list[Node]:
        from google.cloud import compute_v1

        from dcx.providers.gcp_api import GcpOperationError

        self.ssh_sources()  # bad input fails before anything is made
        self.check_subnet_plan()
        where = self.where(pool)
        self.ensure_network(pool, where)
        self.ensure_firewalls(where)
        existing = {i.name for i in self.list_instances(where.project, where.zone, pool.name)}
        missing = [r.name for r in requests if r.name not in existing]
        if missing:
            props = self.instance_properties(pool, where)
            client = self.api.client("InstancesClient")
            for number, start in enumerate(range(0, len(missing), BATCH)):
                names = missing[start:start + BATCH]
                rid = self._request_id(pool, number, names, where)
                what = f"create {len(names)} instance(s) in pool {pool.name} ({where.zone})"
                self.ctx.log.info("gcp: %s, request id %s", what, rid)
                with self.api.errors(what):
                    op = client.bulk_insert_unary(request=compute_v1.BulkInsertInstanceRequest(
                        project=where.project, zone=where.zone, request_id=rid,
                        bulk_insert_instance_resource_resource=compute_v1.BulkInsertInstanceResource(
                            count=len(names), min_count=len(names), instance_properties=props,
                            per_instance_properties={
                                n: compute_v1.BulkInsertInstanceResourcePerInstanceProperties(name=n) for n in names})),
                        retry=self.api.retry)
                key = f"gcp/batch/{pool.name}/{number}"
                try:
                    self.api.wait(where.project, op, what)
                except GcpOperationError:
                    # The operation ended in an error: its id would replay that error, so the next
                    # attempt is a new request. (A wait cut short keeps the id: the operation may yet
                    # finish, and a re-run then finds it.)
                    self.ctx.record(key, {**self.ctx.recorded(key), "done": True})
                    raise
                self.ctx.record(key, {**self.ctx.recorded(key), "done": True})
        return self._nodes_with_addresses(pool, where, {r.name for r in requests})

    def _request_id(self, pool: Any, number: int, names: list[str], where: Where) -> str:
        """The bulkInsert's request id, journalled before the call. The API replays a request id's
        finished operation for 60 minutes, so each attempt to create gets its own (a per-pool generation,
        journalled): scaling 3 -> 2 -> 3, or re-making a deleted node, within the hour makes the node.
        The same attempt keeps its id: the client's retries after a lost answer send the same request,
        and a run killed mid-call resumes its unfinished batch (same names) with the journalled id."""
        from dcx.providers.gcp_api import derived_request_id

        key = f"gcp/batch/{pool.name}/{number}"
        pending = self.ctx.recorded(key)
        if pending and not pending.get("done") and pending.get("names") == names and pending.get("requestId"):
            return str(pending["requestId"])
        generation = int(self.ctx.recorded(f"gcp/generation/{pool.name}") or 0) + 1
        self.ctx.record(f"gcp/generation/{pool.name}", generation)
        rid = derived_request_id(self.ctx.cluster_id, pool.name, str(number), str(generation), ",".join(names))
        self.ctx.record(key, {"project": where.project, "zone": where.zone, "names": names, "requestId": rid})
        return rid

    def _nodes_with_addresses(self, pool: Any, where: Where, wanted: set[str]) -> list[Node]:
        """The pool's instances as nodes, once each has its SSH address. Instances made by an earlier,
        interrupted run may still be starting: their addresses come a little later."""
        deadline = time.monotonic() + ADDRESS_TIMEOUT
        while True:
            found = {i.name: i for i in self.list_instances(where.project, where.zone, pool.name) if i.name in wanted}
            nodes = [self._node(found[n], pool, where) for n in sorted(found)]
            waiting = sorted(wanted - set(found)) + [n.name for n in nodes if not n.ssh_address]
            if not waiting:
                return nodes
            if time.monotonic() > deadline:
                what = f"{self.settings(pool).sshAddress} address" if set(waiting) <= set(found) else "instance"
                raise ProviderError(f"pool {pool.name}: no {what} for {', '.join(waiting[:5])} after "
                                    f"{int(ADDRESS_TIMEOUT)} s", hint="see the instances in the Cloud console")
            time.sleep(ADDRESS_POLL)

    def _node(self, inst: Any, pool: Any, where: Where) -> Node:
        s = self.settings(pool)
        nic = inst.network_interfaces[0] if inst.network_interfaces else None
        private = nic.network_i_p if nic else ""
        public = nic.access_configs[0].nat_i_p if nic and nic.access_configs else ""
        network = nic.network.rsplit("/", 1)[1] if nic and nic.network else where.network
        return Node(
            name=inst.name, pool=pool.name, provider=self.name, role=pool.role,
            ssh_address=public if s.sshAddress == "public" else private, private_address=private,
            public_address=public, ssh_user=self.ctx.ssh_user, ssh_port=SSH_PORT,
            network=f"gcp:{where.project}/{network}", hostname=inst.name,
            provider_ids={"instance": inst.name, "zone": where.zone, "project": where.project},
            extra={"status": inst.status})

    def list_nodes(self, pools: list[Any]) -> list[Node]:
        out = []
        for pool in pools:
            where = self.where(pool)
            for inst in self.list_instances(where.project, where.zone, pool.name):
                if inst.status not in ("STOPPING",):
                    out.append(self._node(inst, pool, where))
        return out

    def repair_nodes(self, pools: list[Any], nodes: list[Node]) -> list[Node]:
        """Existing nodes: the firewall rules are checked again (sshCIDR may have changed) and stopped
        instances (preempted ones) are started; their addresses are read again (ephemeral IPs change)."""
        from google.cloud import compute_v1

        from dcx.providers.gcp_api import new_request_id

        by_pool = {p.name: p for p in pools}
        out = [n for n in nodes if n.pool not in by_pool]
        client = self.api.client("InstancesClient")
        for pool_name in sorted({n.pool for n in nodes if n.pool in by_pool}):
            pool = by_pool[pool_name]
            where = self.where(pool)
            self.ensure_firewalls(where)
            mine = [n for n in nodes if n.pool == pool_name]
            stopped = [n for n in mine if n.extra.get("status") in STOPPED]
            for n in stopped:
                what = f"start instance {n.name}"
                with self.api.errors(what):
                    op = client.start_unary(request=compute_v1.StartInstanceRequest(
                        project=where.project, zone=where.zone, instance=n.name, request_id=new_request_id()),
                        retry=self.api.retry)
                self.api.wait(where.project, op, what)
            if stopped:
                names = {n.name for n in mine}
                out += [self._node(i, pool, where) for i in self.list_instances(where.project, where.zone, pool_name)
                        if i.name in names]
            else:
                out += mine
        return out

    def delete_nodes(self, pools: list[Any], nodes: list[Node]) -> None:
        by_pool = {p.name: p for p in pools}
        targets = []
        for n in nodes:
            ids = n.provider_ids
            pool = by_pool.get(n.pool)
            project = ids.get("project") or (self.project_of(pool) if pool else "")
            zone = ids.get("zone") or (self.zone_of(pool) if pool else "")
            if project and zone:
                targets.append((project, zone, ids.get("instance") or n.name))
        self._delete_instances(targets)
        gone = {t[2] for t in targets}
        for key in self.ctx.recorded_keys("gcp/batch/"):
            entry = dict(self.ctx.recorded(key))
            left = [name for name in entry.get("names", []) if name not in gone]
            if left != entry.get("names"):
                self.ctx.record(key, {**entry, "names": left} if left else None)

    def _delete_instances(self, targets: list[tuple[str, str, str]]) -> None:
        """Delete in parallel (the API has no bulk delete), then wait for every operation."""
        from google.cloud import compute_v1

        from dcx.providers.gcp_api import is_not_found, new_request_id

        client = self.api.client("InstancesClient")

        def delete(target: tuple[str, str, str]) -> None:
            project, zone, name = target
            with self.api.errors(f"delete instance {name}"):
                try:
                    op = client.delete_unary(request=compute_v1.DeleteInstanceRequest(
                        project=project, zone=zone, instance=name, request_id=new_request_id()), retry=self.api.retry)
                except Exception as exc:
                    if is_not_found(exc):
                        return  # gone already
                    raise
            self.api.wait(project, op, f"delete instance {name}")

        if not targets:
            return
        self.ctx.log.info("gcp: deleting %d instance(s)", len(targets))
        with ThreadPoolExecutor(max_workers=min(PARALLEL_DELETES, len(targets))) as pool:
            for future in [pool.submit(delete, t) for t in targets]:
                future.result()

    # --- sweep ----------------------------------------------------------------------------------

    def sweep(self, pools: list[Any]) -> list[str]:
        """Everything labelled/described as this cluster's in the pools' projects, in every zone and region
        (aggregated lists): also what a run whose state was lost, or an earlier zone, left behind."""
        projects = {self.project_of(pool) for pool in pools}
        for prefix in ("gcp/batch/", "gcp/firewall/", "gcp/subnetwork/", "gcp/network/"):
            projects |= {self.ctx.recorded(k)["project"] for k in self.ctx.recorded_keys(prefix)}
        removed: list[str] = []
        for project in sorted(projects):
            targets = self._aggregated_instances(project)
            self._delete_instances(targets)
            removed += [f"gcp instance {t[2]}" for t in targets]
            removed += self._sweep_firewalls(project)
            removed += self._sweep_subnetworks(project)
            removed += self._sweep_networks(project)
        for prefix in ("gcp/batch/", "gcp/generation/", "gcp/attempt/", "gcp/created", "gcp/firewall/",
                       "gcp/subnetwork/", "gcp/network/"):
            for key in self.ctx.recorded_keys(prefix):
                self.ctx.record(key, None)
        return removed

    def _aggregated_instances(self, project: str) -> list[tuple[str, str, str]]:
        from google.cloud import compute_v1

        client = self.api.client("InstancesClient")
        out = []
        with self.api.errors("list instances"):
            for scope, scoped in client.aggregated_list(request=compute_v1.AggregatedListInstancesRequest(
                    project=project, filter=self.label_filter(), max_results=PAGE), retry=self.api.retry):
                out += [(project, scope.rsplit("/", 1)[1], i.name) for i in scoped.instances]
        return out

    def _sweep_firewalls(self, project: str) -> list[str]:
        from google.cloud import compute_v1

        client = self.api.client("FirewallsClient")
        with self.api.errors("list firewall rules"):
            names = [r.name for r in client.list(request=compute_v1.ListFirewallsRequest(
                project=project, filter='name eq "dcx-.*"', max_results=PAGE), retry=self.api.retry)
                if self.owns(r.description)]
        return self._delete_all(project, names, "firewall rule", lambda n, rid: client.delete_unary(
            request=compute_v1.DeleteFirewallRequest(project=project, firewall=n, request_id=rid),
            retry=self.api.retry))

    def _sweep_subnetworks(self, project: str) -> list[str]:
        from google.cloud import compute_v1

        client = self.api.client("SubnetworksClient")
        with self.api.errors("list subnetworks"):
            found = [(scope.rsplit("/", 1)[1], s.name) for scope, scoped in client.aggregated_list(
                request=compute_v1.AggregatedListSubnetworksRequest(
                    project=project, filter='name eq "dcx-.*"', max_results=PAGE), retry=self.api.retry)
                for s in scoped.subnetworks if self.owns(s.description)]
        regions = dict((name, region) for region, name in found)
        return self._delete_all(project, [name for _, name in found], "subnetwork", lambda n, rid: client.delete_unary(
            request=compute_v1.DeleteSubnetworkRequest(project=project, region=regions[n], subnetwork=n,
                                                       request_id=rid), retry=self.api.retry))

    def _sweep_networks(self, project: str) -> list[str]:
        from google.cloud import compute_v1

        client = self.api.client("NetworksClient")
        with self.api.errors("list networks"):
            names = [n.name for n in client.list(request=compute_v1.ListNetworksRequest(
                project=project, filter='name eq "dcx-.*"', max_results=PAGE), retry=self.api.retry)
                if self.owns(n.description)]
        return self._delete_all(project, names, "network", lambda n, rid: client.delete_unary(
            request=compute_v1.DeleteNetworkRequest(project=project, network=n, request_id=rid),
            retry=self.api.retry))

    def _delete_all(self, project: str, names: list[str], kind: str, delete: Any) -> list[str]:
        from dcx.providers.gcp_api import is_not_found, new_request_id

        out = []
        for name in names:
            with self.api.errors(f"delete {kind} {name}"):
                try:
                    op = delete(name, new_request_id())
                except Exception as exc:
                    if not is_not_found(exc):
                        raise
                    continue
            self.api.wait(project, op, f"delete {kind} {name}")
            out.append(f"gcp {kind} {name}")
        return out


def _rule_key(rule: Any) -> tuple[Any, ...]:
    """What matters when comparing a firewall rule with the wanted one."""
    allowed = sorted((a.I_p_protocol, tuple(sorted(a.ports))) for a in rule.allowed)
    return (allowed, sorted(rule.source_ranges), sorted(rule.source_tags), sorted(rule.target_tags),
            rule.network.rsplit("/global/networks/", 1)[-1])
