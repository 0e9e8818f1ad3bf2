"""The `azure` provider: Azure virtual machines through azure-mgmt-compute/network/resource.

A pool's section: `azure: {subscription, location, vmSize, image, resourceGroup, vnet, subnet, vnetCIDR,
subnetCIDR, spot, diskGiB, tags, sshAddress: public|private}`.

- Resource group: `resourceGroup`, or `dcx-CLUSTER-ID` (the id in it: two clusters of one name never
  share a group; a cluster whose state records the older `dcx-CLUSTER` keeps it). One that does not
  exist is made by dcx, tagged with the cluster, and deleted with it; one that exists (the user's)
  is left, and only the cluster's tagged resources in it are deleted, in dependency order.
- Network (dcx.providers.azure_network): the pool's `vnet`/`subnet`, or a virtual network
  `dcx-CLUSTER-vnet` (`vnetCIDR`, one subnet `subnetCIDR`) that dcx makes; a network security group
  `dcx-CLUSTER-nsg` on every NIC: SSH from spec.network.sshCIDR only, the engine's ports from the
  cluster's subnets only, the mesh UDP port from the other providers' nodes (/32s) when the cluster
  spans providers, everything else from the Internet denied. Names get a `-LOCATION` suffix outside the
  resource group's own location.
- Machines: per node a public IP `NODE-pip` (sshAddress: public), a NIC `NODE-nic` and a VM `NODE`
  (its OS disk `NODE-osdisk` goes with it). The cluster's SSH key for spec.ssh.user, password login
  off, cloud-init custom data from dcx/templates/cloud-init.yaml; default image the latest Ubuntu LTS.
  A pool's PIPs, then NICs, then VMs are started together and waited for together.
- Deletion: the NIC and public IP are made with deleteOption Delete and go with their VM (a NIC left
  behind is reserved for its VM for 180 s: NicReservedForAnotherVm, retried). A namespace the
  subscription never registered is registered on first use (azure-mgmt-core's policy; an identity
  that may not gets one line naming what to ask for).
- Identity: tags dcx-cluster, dcx-cluster-id, dcx-pool, dcx-created, dcx-created-by (the token's upn,
  appid or oid) (plus the pool's `tags`) on every resource
  (the OS disk is tagged after its VM is made: Azure does not pass a VM's tags to it). Names are
  deterministic: a re-run finds what exists instead of making it again.

Credentials, endpoint (DCX_AZURE_ENDPOINT), CA bundle (DCX_AZURE_CA_BUNDLE), polling and errors:
dcx.providers.azure_api.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dcx.errors import InputError, ProviderError
from dcx.providers.base import FoundCluster, Node, NodeRequest, Provider

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
LOCATION_RE = re.compile(r"^[a-z][a-z0-9]+$")
GROUP_RE = re.compile(r"^[-\w.()]{0,89}[-\w()]$")
NAME_RE = re.compile(r"^[A-Za-z0-9]([-\w.]{0,78}\w)?$")
URN_RE = re.compile(r"^[^:\s]+:[^:\s]+:[^:\s]+:[^:\s]+$")
VNET_ID_RE = re.compile(r"^/subscriptions/([^/]+)/resourceGroups/([^/]+)/providers/Microsoft\.Network/"
                        r"virtualNetworks/([^/]+)$", re.IGNORECASE)
ARM_SIZE_RE = re.compile(r"^Standard_[A-Z]+\d+[a-z]*p[a-z]*_v\d+$")  # Ampere (arm64): D2ps_v5, B2pts_v2
RESERVED_TAGS = ("dcx-cluster", "dcx-cluster-id", "dcx-pool", "dcx-created", "dcx-created-by")
# Names Azure refuses as a VM's admin user: such a login user (root) gets its key from cloud-init instead.
RESERVED_ADMINS = {"administrator", "admin", "user", "user1", "test", "user2", "test1", "user3", "admin1", "1", "123",
                   "a", "actuser", "adm", "admin2", "aspnet", "backup", "console", "david", "guest", "john", "owner",
                   "root", "server", "sql", "support", "support_388945a0", "sys", "test2", "test3", "user4", "user5"}
FALLBACK_ADMIN = "azureuser"
NETWORK = "Microsoft.Network"
STOPPED = ("PowerState/deallocated", "PowerState/stopped", "PowerState/deallocating")
COMPUTE = "Microsoft.Compute"
# Cloud images' sshd listens on 22 and dcx does not move it (spec.ssh.port is the default port of ssh
# pools' hosts): the security group opens the port dcx connects to.
SSH_PORT = 22
# A NIC whose VM was deleted without it is reserved for that VM for 180 s (NicReservedForAnotherVm):
# its delete is retried that long, and a little more.
NIC_RESERVED_WAIT = 240.0


class AzureSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subscription: str = ""  # default: AZURE_SUBSCRIPTION_ID
    location: str  # required (e.g. westeurope): named before any credential is looked for
    vmSize: str = Field(default="Standard_B2s", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    image: str = ""  # publisher:offer:sku:version or an image resource id; default: the latest Ubuntu LTS
    resourceGroup: str = ""  # default: dcx-CLUSTER
    vnet: str = ""  # a virtual network: its name in resourceGroup, or its resource id
    subnet: str = ""  # with vnet: the subnet's name
    vnetCIDR: str = "10.0.0.0/16"  # the range of the virtual network dcx makes (when vnet is not given)
    subnetCIDR: str = ""  # its subnet's (default: the first /24 of vnetCIDR)
    spot: bool = False
    diskGiB: int = Field(default=30, ge=30, le=4095)
    tags: dict[str, str] = Field(default_factory=dict)
    sshAddress: Literal["public", "private"] = "public"

    @field_validator("subscription")
    @classmethod
    def _subscription(cls, value: str) -> str:
        if value and not UUID_RE.match(value):
            raise ValueError("must be a subscription id (a GUID)")
        return value

    @field_validator("location")
    @classmethod
    def _location(cls, value: str) -> str:
        if value and not LOCATION_RE.match(value):
            raise ValueError("must be a location name such as westeurope or eastus2")
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if value and not (URN_RE.match(value) or value.lower().startswith("/subscriptions/")):
            raise ValueError("must be publisher:offer:sku:version (e.g. Canonical:ubuntu-24_04-lts:server:latest) "
                             "or an image resource id")
        return value

    @field_validator("resourceGroup")
    @classmethod
    def _group(cls, value: str) -> str:
        if value and not GROUP_RE.match(value):
            raise ValueError("must be a resource group name: letters, digits, '-', '_', '.', '(' and ')', "
                             "at most 90, not ending with '.'")
        return value

    @field_validator("vnet")
    @classmethod
    def _vnet(cls, value: str) -> str:
        if value and not (NAME_RE.match(value) or VNET_ID_RE.match(value)):
            raise ValueError("must be a virtual network name or its resource id")
        return value

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, value: str) -> str:
        if value and not NAME_RE.match(value):
            raise ValueError("must be a subnet name")
        return value

    @field_validator("vnetCIDR", "subnetCIDR")
    @classmethod
    def _cidr(cls, value: str) -> str:
        if not value:
            return value
        net = ipaddress.ip_network(value, strict=True)
        if net.version != 4 or not net.is_private or net.prefixlen > 29:
            raise ValueError("must be a private IPv4 network of /29 or larger")
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, tags: dict[str, str]) -> dict[str, str]:
        for key, value in tags.items():
            if not key or len(key) > 512 or any(c in key for c in "<>%&\\?/"):
                raise ValueError(f"tag '{key}': at most 512 characters, none of < > % & \\ ? /")
            if len(str(value)) > 256:
                raise ValueError(f"tag '{key}': the value has more than 256 characters")
            if key in RESERVED_TAGS:
                raise ValueError(f"tag '{key}' is set by dcx")
        if len(tags) > 50 - len(RESERVED_TAGS):
            raise ValueError(f"at most {50 - len(RESERVED_TAGS)} tags")
        return tags

    @model_validator(mode="after")
    def _network(self) -> AzureSettings:
        if self.spot and self.vmSize.lower().startswith("standard_b"):
            raise ValueError(f"{self.vmSize}: B-series sizes cannot be Spot VMs; choose another vmSize "
                             "(e.g. Standard_D2s_v5) or spot: false")
        if bool(self.vnet) != bool(self.subnet):
            raise ValueError("vnet and subnet go together: give both (an existing network) or neither")
        if self.subnetCIDR and not ipaddress.ip_network(self.subnetCIDR).subnet_of(ipaddress.ip_network(self.vnetCIDR)):
            raise ValueError(f"subnetCIDR {self.subnetCIDR} is not inside vnetCIDR {self.vnetCIDR}")
        return self

    @property
    def subnet_cidr(self) -> str:
        net = ipaddress.ip_network(self.vnetCIDR)
        return self.subnetCIDR or str(next(net.subnets(new_prefix=max(net.prefixlen, 24))))


@dataclass(frozen=True)
class Where:
    """Where a pool's machines go, resolved."""

    subscription: str
    group: str  # resource group of the machines, NICs, public IPs and the NSG
    location: str
    vnet_group: str
    vnet: str
    subnet: str
    vnet_made: bool  # dcx makes (made) the virtual network
    nsg: str

    @property
    def group_id(self) -> str:
        return f"/subscriptions/{self.subscription}/resourceGroups/{self.group}"

    @property
    def vnet_id(self) -> str:
        return (f"/subscriptions/{self.subscription}/resourceGroups/{self.vnet_group}/providers/{NETWORK}/"
                f"virtualNetworks/{self.vnet}")

    @property
    def subnet_id(self) -> str:
        return f"{self.vnet_id}/subnets/{self.subnet}"

    @property
    def nsg_id(self) -> str:
        return f"{self.group_id}/providers/{NETWORK}/networkSecurityGroups/{self.nsg}"

    @property
    def network(self) -> str:
        return f"azure:{self.subscription}/{self.vnet_group}/{self.vnet}"


def json_of(obj: Any) -> dict[str, Any]:
    """An SDK model as its REST JSON (the SDK's models are mappings of the REST names)."""
    return obj.as_dict() if hasattr(obj, "as_dict") else dict(obj)


class AzureProvider(Provider):
    name = "azure"
    settings_model = AzureSettings

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        from dcx.providers.azure_api import AzureApi

        self.api = AzureApi(ctx.log)
        self._groups: dict[tuple[str, str], dict[str, Any] | None] = {}  # (sub, group) -> RG JSON, None: missing
        self._where: dict[str, Where] = {}
        self._nsgs: dict[tuple[str, str, str], dict[str, Any]] = {}  # NSGs checked this run
        self._prefixes: dict[str, list[str]] = {}  # subnet id -> address prefixes

    def check_prerequisites(self) -> None:
        spec = self.ctx.spec
        for pool in spec.spec.pools if spec is not None else []:
            if pool.provider == self.name:
                self.subscription_of(pool)
        self.api.credential()

    # --- identity -------------------------------------------------------------------------------

    def tags(self, pool: Any) -> dict[str, str]:
        return {**self.settings(pool).tags, "dcx-cluster": self.ctx.cluster_name,
                "dcx-cluster-id": self.ctx.cluster_id, "dcx-pool": pool.name, **self.creation_tags()}

    def creation_tags(self) -> dict[str, str]:
        """When and by whom (the credential's token claims: upn, appid or oid) the cluster was made;
        what the state recorded first is kept, so every run tags alike."""
        recorded = self.ctx.recorded("azure/created")
        if not recorded:
            from dcx.state import now_iso

            self.api.credential()
            recorded = {"dcx-created": now_iso(), "dcx-created-by": self.api.identity}
            self.ctx.record("azure/created", recorded)
        return {k: v for k, v in dict(recorded).items() if v}

    def find_clusters(self, pools: list[Any]) -> list[FoundCluster]:
        """Clusters of this name in the pools' subscriptions: the resource groups dcx made (by tag), and
        the tagged VMs in the groups the pools name."""
        found: dict[tuple[str, str], FoundCluster] = {}

        def add(cid: str, where: str, tags: dict[str, str]) -> None:
            if cid and (cid, where) not in found:
                found[(cid, where)] = FoundCluster(id=cid, name=self.ctx.cluster_name, provider=self.name,
                                                   where=where, created=tags.get("dcx-created", ""),
                                                   created_by=tags.get("dcx-created-by", ""))

        for sub in sorted({self.subscription_of(p) for p in pools}):
            rc = self.api.resource(sub)
            wanted = f"tagName eq 'dcx-cluster' and tagValue eq '{self.ctx.cluster_name}'"
            with self.api.errors("list resource groups"):
                for g in rc.resource_groups.list(filter=wanted):
                    tags = dict(g.tags or {})
                    add(tags.get("dcx-cluster-id", ""), f"resource group {g.name} ({sub})", tags)
        for pool in pools:
            group = self.settings(pool).resourceGroup
            if not group:
                continue
            sub = self.subscription_of(pool)
            # VMs, and what a cluster leaves in a user's group once its VMs are gone (its network, NSG).
            things = self.list_vms(sub, group) + [x for kind in ("network_security_groups", "virtual_networks")
                                                   for x in self.list_network(sub, group, kind)]
            for thing in things:
                tags = thing.get("tags") or {}
                if tags.get("dcx-cluster") == self.ctx.cluster_name:
                    add(tags.get("dcx-cluster-id", ""), f"resource group {group} ({sub})", tags)
        return sorted(found.values(), key=lambda c: (c.id, c.where))

    def owns(self, tags: dict[str, str] | None, pools: set[str] | None = None) -> bool:
        """Whether tags mark a resource as this cluster's (by name alone when the id is unknown)."""
        tags = tags or {}
        if tags.get("dcx-cluster") != self.ctx.cluster_name:
            return False
        if self.ctx.cluster_id and tags.get("dcx-cluster-id") != self.ctx.cluster_id:
            return False
        return pools is None or tags.get("dcx-pool") in pools

    # --- settings resolution --------------------------------------------------------------------

    def settings(self, pool: Any) -> AzureSettings:
        return AzureSettings.model_validate(pool.settings)

    def subscription_of(self, pool: Any) -> str:
        sub = self.settings(pool).subscription or os.environ.get("AZURE_SUBSCRIPTION_ID", "").strip()
        if not sub:
            raise ProviderError(f"pool {pool.name}: no Azure subscription",
                                hint="set azure.subscription in the pool, or AZURE_SUBSCRIPTION_ID")
        if not UUID_RE.match(sub):
            raise ProviderError(f"pool {pool.name}: AZURE_SUBSCRIPTION_ID '{sub}' is not a subscription id (a GUID)")
        return sub

    def location_of(self, pool: Any) -> str:
        location = self.settings(pool).location
        if not location:
            raise InputError(f"pool {pool.name}: no Azure location", hint="set azure.location (e.g. westeurope)")
        return location

    def group_of(self, pool: Any) -> str:
        """The pool's resourceGroup, or the one dcx makes: `dcx-NAME-ID`, so that two clusters of one
        name (two colleagues) never share, nor sweep, each other's group. A cluster made when the group
        was `dcx-NAME` (its state records it) keeps that one."""
        s = self.settings(pool)
        if s.resourceGroup:
            return s.resourceGroup
        legacy = f"dcx-{self.ctx.cluster_name}"
        if not self.ctx.cluster_id or self.ctx.recorded(f"azure/group/{self.subscription_of(pool)}/{legacy}"):
            return legacy
        return f"dcx-{self.ctx.cluster_name}-{self.ctx.cluster_id}"

    def ssh_sources(self) -> list[str]:
        network = self.ctx.network
        cidrs = [c.strip() for c in (network.sshCIDR if network is not None else "").split(",") if c.strip()]
        if not cidrs:
            raise InputError("spec.network.sshCIDR is empty: Azure pools open SSH only to the addresses given there",
                             hint="set spec.network.sshCIDR to the address(es) dcx connects from, e.g. 203.0.113.7/32")
        return sorted(str(ipaddress.ip_network(c, strict=False)) for c in cidrs)

    def api_sources(self) -> list[str]:
        """Where kubectl reaches a k3s cluster's API from: spec.network.apiCIDR, else sshCIDR."""
        network = self.ctx.network
        cidrs = [c.strip() for c in (getattr(network, "apiCIDR", "") or "").split(",") if c.strip()]
        return sorted(str(ipaddress.ip_network(c, strict=False)) for c in cidrs) if cidrs else self.ssh_sources()

    def check_network_plan(self) -> None:
        """Pools sharing the network dcx makes (same group and location) must agree on its ranges."""
        spec = self.ctx.spec
        if spec is None:
            return
        seen: dict[tuple[str, str], tuple[str, str, str]] = {}
        for p in spec.spec.pools:
            if p.provider != self.name or self.settings(p).vnet:
                continue
            s = self.settings(p)
            key = (self.group_of(p), self.location_of(p))
            first = seen.setdefault(key, (s.vnetCIDR, s.subnet_cidr, p.name))
            if first[:2] != (s.vnetCIDR, s.subnet_cidr):
                raise InputError(f"pools {first[2]} and {p.name} share the virtual network dcx makes in {key[1]} but "
                                 f"give different ranges ({first[0]} {first[1]}; {s.vnetCIDR} {s.subnet_cidr})",
                                 hint="give them the same azure.vnetCIDR and azure.subnetCIDR")

    # --- resource group ---------------------------------------------------------------------------

    def get_group(self, sub: str, group: str) -> dict[str, Any] | None:
        key = (sub, group.lower())
        if key not in self._groups:
            from dcx.providers.azure_api import is_not_found

            rc = self.api.resource(sub)
            with self.api.errors(f"get resource group {group}"):
                try:
                    self._groups[key] = json_of(rc.resource_groups.get(group))
                except Exception as exc:
                    if not is_not_found(exc):
                        raise
                    self._groups[key] = None
        return self._groups[key]

    def ensure_group(self, pool: Any) -> dict[str, Any]:
        sub, group, location = self.subscription_of(pool), self.group_of(pool), self.location_of(pool)
        found = self.get_group(sub, group)
        if found is not None:
            owner = (found.get("tags") or {}).get("dcx-cluster")
            if owner and owner != self.ctx.cluster_name:
                raise ProviderError(f"resource group {group} was made by dcx for cluster {owner} and is deleted with "
                                    "it", hint="give this cluster its own azure.resourceGroup")
            if owner and self.ctx.cluster_id and found["tags"].get("dcx-cluster-id") != self.ctx.cluster_id:
                raise ProviderError(f"resource group {group} belongs to an earlier cluster named "
                                    f"{self.ctx.cluster_name} (another id)",
                                    hint="remove it first: `dcx cluster destroy -f FILE` sweeps it by name")
            if self.ctx.recorded(f"azure/group/{sub}/{group}") is None:
                self.ctx.record(f"azure/group/{sub}/{group}", {"subscription": sub, "group": group,
                                                              "made": bool(owner)})
            return found
        self.ctx.record(f"azure/group/{sub}/{group}", {"subscription": sub, "group": group, "made": True})
        self.ctx.log.info("azure: creating resource group %s in %s", group, location)
        rc = self.api.resource(sub)
        with self.api.errors(f"create resource group {group}"):
            made = json_of(rc.resource_groups.create_or_update(group, {"location": location,
                                                                       "tags": self.tags(pool)}))
        self._groups[(sub, group.lower())] = made
        return made

    # --- network ------------------------------------------------------------------------------------

    def where(self, pool: Any) -> Where:
        """Resolve (and make what is missing of) the pool's group, network and security group."""
        if pool.name in self._where:
            return self._where[pool.name]
        from dcx.providers import azure_network

        s = self.settings(pool)
        sub, location = self.subscription_of(pool), self.location_of(pool)
        group = self.ensure_group(pool)
        suffix = "" if group["location"].lower() == location else f"-{location}"
        cluster = self.ctx.cluster_name
        if s.vnet:
            m = VNET_ID_RE.match(s.vnet)
            vnet_sub, vnet_group, vnet = (m.group(1), m.group(2), m.group(3)) if m else (sub, group["name"], s.vnet)
            if vnet_sub.lower() != sub.lower():
                raise InputError(f"pool {pool.name}: azure.vnet is in subscription {vnet_sub}, the pool in {sub}",
                                 hint="a VM's NIC must be in the subscription of its virtual network")
            where = Where(sub, group["name"], location, vnet_group, vnet, s.subnet, False,
                          f"dcx-{cluster}-nsg{suffix}")
        else:
            where = Where(sub, group["name"], location, group["name"], f"dcx-{cluster}-vnet{suffix}", "default", True,
                          f"dcx-{cluster}-nsg{suffix}")
        self.registered(sub, NETWORK, lambda: azure_network.ensure_vnet(self, pool, where))
        azure_network.ensure_nsg(self, pool, where)
        self._where[pool.name] = where
        return where

    def registered(self, sub: str, namespace: str, call: Any) -> Any:
        """Run `call`, the first use of a resource provider namespace in a run. A subscription that has
        not registered the namespace answers 409 MissingSubscriptionRegistration; azure-mgmt-core's
        ARMAutoResourceProviderRegistrationPolicy registers it and sends the call again when the
        identity may register. What still answers 409 is met here: one more try (registration may have
        been under way), and an identity that may not register gets one line naming what to ask for."""
        from dcx.providers.azure_api import NOT_REGISTERED, code_of, register_namespace

        try:
            return call()
        except ProviderError as exc:
            if code_of(exc) != NOT_REGISTERED:
                raise
        register_namespace(self.api, sub, namespace)
        return call()

    def allow_mesh_peers(self, pools: list[Any], peers: list[str], port: int) -> None:
        from dcx.providers import azure_network

        azure_network.allow_mesh_peers(self, pools, peers, port)

    # --- machines -------------------------------------------------------------------------------

    def admin_user(self) -> str:
        user = self.ctx.ssh_user
        return FALLBACK_ADMIN if user.lower() in RESERVED_ADMINS else user

    def custom_data(self) -> str:
        from dcx.templates import render

        user = self.ctx.ssh_user
        text = render("cloud-init.yaml", user=user, public_key=self.ctx.ssh_public_key,
                      disable_root="false" if user == "root" else "true")
        return base64.b64encode(text.encode()).decode()

    def image_reference(self, s: AzureSettings) -> dict[str, str]:
        if not s.image:
            sku = "server-arm64" if ARM_SIZE_RE.match(s.vmSize) else "server"
            return {"publisher": "Canonical", "offer": "ubuntu-24_04-lts", "sku": sku, "version": "latest"}
        if s.image.lower().startswith("/subscriptions/"):
            return {"id": s.image}
        publisher, offer, sku, version = s.image.split(":")
        return {"publisher": publisher, "offer": offer, "sku": sku, "version": version}

    def vm_body(self, pool: Any, where: Where, name: str, custom_data: str) -> dict[str, Any]:
        s = self.settings(pool)
        admin = self.admin_user()
        props: dict[str, Any] = {
            "hardwareProfile": {"vmSize": s.vmSize},
            "storageProfile": {
                "imageReference": self.image_reference(s),
                "osDisk": {"name": f"{name}-osdisk", "createOption": "FromImage", "deleteOption": "Delete",
                           "diskSizeGB": s.diskGiB, "managedDisk": {"storageAccountType": "StandardSSD_LRS"}}},
            "osProfile": {
                "computerName": name, "adminUsername": admin, "customData": custom_data,
                "linuxConfiguration": {"disablePasswordAuthentication": True, "ssh": {"publicKeys": [
                    {"path": f"/home/{admin}/.ssh/authorized_keys", "keyData": self.ctx.ssh_public_key.strip()}]}}},
            "networkProfile": {"networkInterfaces": [
                # The NIC goes with its VM (and its public IP with it, see pip_body): nothing is left
                # billed, and no NIC is left reserved for 180 s after its VM (NicReservedForAnotherVm).
                {"id": f"{where.group_id}/providers/{NETWORK}/networkInterfaces/{name}-nic",
                 "properties": {"primary": True, "deleteOption": "Delete"}}]},
        }
        if s.spot:
            props.update(priority="Spot", evictionPolicy="Deallocate", billingProfile={"maxPrice": -1})
        return {"location": where.location, "tags": self.tags(pool), "properties": props}

    def nic_body(self, pool: Any, where: Where, name: str) -> dict[str, Any]:
        ip: dict[str, Any] = {"subnet": {"id": where.subnet_id}, "privateIPAllocationMethod": "Dynamic"}
        if self.settings(pool).sshAddress == "public":
            ip["publicIPAddress"] = {"id": f"{where.group_id}/providers/{NETWORK}/publicIPAddresses/{name}-pip"}
        return {"location": where.location, "tags": self.tags(pool), "properties": {
            "networkSecurityGroup": {"id": where.nsg_id},
            "ipConfigurations": [{"name": "ipconfig1", "properties": ip}]}}

    def pip_body(self, pool: Any, where: Where) -> dict[str, Any]:
        return {"location": where.location, "tags": self.tags(pool), "sku": {"name": "Standard"},
                "properties": {"publicIPAllocationMethod": "Static", "publicIPAddressVersion": "IPv4",
                               "deleteOption": "Delete"}}

    def list_vms(self, sub: str, group: str, instance_view: bool = False, strict: bool = False) -> list[dict[str, Any]]:
        """Every VM in the group ([] when the group does not exist, or when the subscription never
        registered Microsoft.Compute, unless `strict`: then that is an error)."""
        from dcx.providers.azure_api import NOT_REGISTERED, code_of, is_not_found

        cc = self.api.compute(sub)
        with self.api.errors(f"list virtual machines in {group}"):
            try:
                kwargs = {"expand": "instanceView"} if instance_view else {}
                return [json_of(vm) for vm in cc.virtual_machines.list(group, **kwargs)]
            except Exception as exc:
                if is_not_found(exc) or (not strict and code_of(exc) == NOT_REGISTERED):
                    return []
                raise

    def list_network(self, sub: str, group: str, kind: str) -> list[dict[str, Any]]:
        """network_interfaces / public_ip_addresses / network_security_groups / virtual_networks of a group."""
        from dcx.providers.azure_api import NOT_REGISTERED, code_of, is_not_found

        nc = self.api.network(sub)
        with self.api.errors(f"list {kind.replace('_', ' ')} in {group}"):
            try:
                return [json_of(x) for x in getattr(nc, kind).list(group)]
            except Exception as exc:
                if is_not_found(exc) or code_of(exc) == NOT_REGISTERED:  # never registered: nothing there
                    return []
                raise

    def list_disks(self, sub: str, group: str) -> list[dict[str, Any]]:
        from dcx.providers.azure_api import NOT_REGISTERED, code_of, is_not_found

        cc = self.api.compute(sub)
        with self.api.errors(f"list disks in {group}"):
            try:
                return [json_of(d) for d in cc.disks.list_by_resource_group(group)]
            except Exception as exc:
                if is_not_found(exc) or code_of(exc) == NOT_REGISTERED:  # never registered: nothing there
                    return []
                raise

    def create_nodes(self, pool: Any, requests: list[NodeRequest]) -> list[Node]:
        self.ssh_sources()  # bad input fails before anything is made
        self.check_network_plan()
        where = self.where(pool)
        vms = {vm["name"].lower(): vm for vm in self.registered(
            where.subscription, COMPUTE, lambda: self.list_vms(where.subscription, where.group, strict=True))}
        missing = []
        for r in requests:
            vm = vms.get(r.name.lower())
            if vm is None:
                missing.append(r.name)
            elif not self.owns(vm.get("tags"), {pool.name}):
                raise ProviderError(f"a virtual machine named {r.name} exists in resource group {where.group} but is "
                                    "not this pool's", hint="an earlier cluster of this name whose state was lost? "
                                    "`dcx cluster destroy -f FILE` removes it")
        if missing:
            self._make_machines(pool, where, missing)
        return self._nodes(pool, where, {r.name for r in requests})

    def _make_machines(self, pool: Any, where: Where, names: list[str]) -> None:
        sub, group = where.subscription, where.group
        nc, cc = self.api.network(sub), self.api.compute(sub)
        public = self.settings(pool).sshAddress == "public"
        for name in names:  # write-ahead: every resource of the node, before any is made
            made = ([f"{name}-pip"] if public else []) + [f"{name}-nic", name, f"{name}-osdisk"]
            self.ctx.record(f"azure/vm/{name}", {"subscription": sub, "group": group, "pool": pool.name,
                                                 "resources": made})
        self.ctx.log.info("azure: creating %d machine(s) in pool %s (%s, %s)", len(names), pool.name, group,
                          where.location)
        if public:
            body = self.pip_body(pool, where)
            self.api.run_all("create public IP", [f"{n}-pip" for n in names],
                             lambda n: nc.public_ip_addresses.begin_create_or_update(group, n, body))
        self.api.run_all("create network interface", [f"{n}-nic" for n in names],
                         lambda n: nc.network_interfaces.begin_create_or_update(
                             group, n, self.nic_body(pool, where, n[:-len("-nic")])))
        custom = self.custom_data()
        self.api.run_all("create virtual machine", names, lambda n: cc.virtual_machines.begin_create_or_update(
            group, n, self.vm_body(pool, where, n, custom)))
        # Azure does not pass a VM's tags to the OS disk it makes: tag it, so that it is found as ours.
        tags = {"tags": self.tags(pool)}
        self.api.run_all("tag OS disk", [f"{n}-osdisk" for n in names],
                         lambda d: cc.disks.begin_update(group, d, tags))

    def _nodes(self, pool: Any, where: Where, wanted: set[str]) -> list[Node]:
        by_group = self._machines(where.subscription, where.group, {pool.name})
        return [self._node(vm, nic, pip, pool) for vm, nic, pip in by_group if vm["name"] in wanted]

    def _machines(self, sub: str, group: str, pools: set[str],
                  instance_view: bool = False) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
        """(VM, its NIC, its public IP or {}) of the cluster's VMs in `pools`: three list calls per group."""
        vms = [vm for vm in self.list_vms(sub, group, instance_view) if self.owns(vm.get("tags"), pools)]
        if not vms:
            return []
        nics = {n["id"].lower(): n for n in self.list_network(sub, group, "network_interfaces")}
        pips = {p["id"].lower(): p for p in self.list_network(sub, group, "public_ip_addresses")}
        out = []
        for vm in sorted(vms, key=lambda v: v["name"]):
            refs = vm["properties"]["networkProfile"].get("networkInterfaces") or []
            nic = nics.get(refs[0]["id"].lower(), {}) if refs else {}
            configs = (nic.get("properties") or {}).get("ipConfigurations") or [{}]
            pip_id = ((configs[0].get("properties") or {}).get("publicIPAddress") or {}).get("id", "")
            out.append((vm, nic, pips.get(pip_id.lower(), {})))
        return out

    def _node(self, vm: dict[str, Any], nic: dict[str, Any], pip: dict[str, Any], pool: Any) -> Node:
        s = self.settings(pool)
        configs = (nic.get("properties") or {}).get("ipConfigurations") or [{}]
        cprops = configs[0].get("properties") or {}
        private = cprops.get("privateIPAddress", "")
        public = (pip.get("properties") or {}).get("ipAddress", "")
        subnet_id = (cprops.get("subnet") or {}).get("id", "")
        parts = subnet_id.split("/")
        network = f"azure:{parts[2]}/{parts[4]}/{parts[8]}" if len(parts) > 8 else ""
        rid = vm["id"].split("/")
        statuses = ((vm["properties"].get("instanceView") or {}).get("statuses")) or []
        power = next((st["code"] for st in statuses if st.get("code", "").startswith("PowerState/")), "")
        return Node(
            name=vm["name"], pool=pool.name, provider=self.name, role=pool.role,
            ssh_address=public if s.sshAddress == "public" else private, private_address=private,
            public_address=public, ssh_user=self.ctx.ssh_user, ssh_port=SSH_PORT, network=network,
            hostname=vm["name"], provider_ids={"vm": vm["name"], "resourceGroup": rid[4], "subscription": rid[2],
                          "location": vm["location"]},
            extra={"power": power} if power else {})

    def list_nodes(self, pools: list[Any]) -> list[Node]:
        out = []
        for (sub, group), mine in self._by_group(pools).items():
            by_name = {p.name: p for p in mine}
            for vm, nic, pip in self._machines(sub, group, set(by_name)):
                if vm["properties"].get("provisioningState") != "Deleting":
                    out.append(self._node(vm, nic, pip, by_name[vm["tags"]["dcx-pool"]]))
        return out

    def _by_group(self, pools: list[Any]) -> dict[tuple[str, str], list[Any]]:
        out: dict[tuple[str, str], list[Any]] = {}
        for pool in pools:
            out.setdefault((self.subscription_of(pool), self.group_of(pool)), []).append(pool)
        return out

    def repair_nodes(self, pools: list[Any], nodes: list[Node]) -> list[Node]:
        """The security rules are checked again (sshCIDR may have changed) and stopped VMs (evicted Spot
        VMs, deallocated ones) are started; their addresses are read again."""
        by_pool = {p.name: p for p in pools}
        out = [n for n in nodes if n.pool not in by_pool]
        mine = [n for n in nodes if n.pool in by_pool]
        for pool_name in sorted({n.pool for n in mine}):
            self.where(by_pool[pool_name])
        for (sub, group), group_pools in self._by_group([by_pool[p] for p in sorted({n.pool for n in mine})]).items():
            names = {n.name for n in mine if n.pool in {p.name for p in group_pools}}
            pool_of = {p.name: p for p in group_pools}
            machines = [m for m in self._machines(sub, group, set(pool_of), instance_view=True)
                        if m[0]["name"] in names]
            stopped = [vm["name"] for vm, _, _ in machines
                       if self._node(vm, {}, {}, pool_of[vm["tags"]["dcx-pool"]]).extra.get("power") in STOPPED]
            if stopped:
                cc = self.api.compute(sub)
                self.ctx.log.info("azure: starting %d stopped VM(s): %s", len(stopped), ", ".join(stopped[:5]))
                self.api.run_all("start virtual machine", stopped,
                                 lambda n, cc=cc, group=group: cc.virtual_machines.begin_start(group, n))
                machines = [m for m in self._machines(sub, group, set(pool_of), instance_view=True)
                            if m[0]["name"] in names]
            found = {vm["name"] for vm, _, _ in machines}
            out += [n for n in mine if n.name in names and n.name not in found]  # let the engine see them gone
            out += [self._node(vm, nic, pip, pool_of[vm["tags"]["dcx-pool"]]) for vm, nic, pip in machines]
        return out

    # --- deletion -------------------------------------------------------------------------------

    def delete_nodes(self, pools: list[Any], nodes: list[Node]) -> None:
        by_pool = {p.name: p for p in pools}
        targets: dict[tuple[str, str], list[str]] = {}
        for n in nodes:
            ids, pool = n.provider_ids, by_pool.get(n.pool)
            sub = ids.get("subscription") or (self.subscription_of(pool) if pool else "")
            group = ids.get("resourceGroup") or (self.group_of(pool) if pool else "")
            if sub and group:
                targets.setdefault((sub, group), []).append(ids.get("vm") or n.name)
        for (sub, group), names in targets.items():
            self._delete_machines(sub, group, sorted(names))
        for n in nodes:
            self.ctx.record(f"azure/vm/{n.name}", None)

    def _delete_machines(self, sub: str, group: str, names: list[str]) -> None:
        """VMs first (their OS disks go with them), then NICs, then public IPs: each in use by the one
        before. Deleting something already gone is no error (ARM answers 204)."""
        nc, cc = self.api.network(sub), self.api.compute(sub)
        self.ctx.log.info("azure: deleting %d machine(s) in %s", len(names), group)
        self.api.run_all("delete virtual machine", names, lambda n: cc.virtual_machines.begin_delete(group, n))
        # Made with deleteOption Delete, the NIC and public IP went with the VM (these answer 204);
        # machines made before that keep them, and their NICs stay reserved for a while.
        self.api.run_all("delete network interface", [f"{n}-nic" for n in names],
                         lambda n: self.begin_nic_delete(sub, group, n))
        self.api.run_all("delete public IP", [f"{n}-pip" for n in names],
                         lambda n: nc.public_ip_addresses.begin_delete(group, n))

    def begin_nic_delete(self, sub: str, group: str, name: str) -> Any:
        """Start deleting a NIC, retrying while it is reserved for its deleted VM (up to 180 s)."""
        import time

        from azure.core.exceptions import HttpResponseError

        from dcx.providers.azure_api import code_of

        nc = self.api.network(sub)
        deadline = time.monotonic() + NIC_RESERVED_WAIT
        while True:
            try:
                return nc.network_interfaces.begin_delete(group, name)
            except HttpResponseError as exc:
                if code_of(exc) != "NicReservedForAnotherVm" or time.monotonic() > deadline:
                    raise
                self.ctx.log.info("azure: network interface %s is still reserved for its deleted VM: retrying", name)
                time.sleep(min(max(self.api.poll_interval * 2, 1.0), 10.0))

    def sweep(self, pools: list[Any]) -> list[str]:
        """Delete the resource groups dcx made for the cluster (found by tag, so also after the state was
        lost); in the other groups the pools use, the cluster's tagged resources, in dependency order."""
        groups: set[tuple[str, str]] = set(self._by_group(pools))
        for key in self.ctx.recorded_keys("azure/group/"):
            entry = self.ctx.recorded(key)
            groups.add((entry["subscription"], entry["group"]))
        removed: list[str] = []
        deleted: set[tuple[str, str]] = set()
        for sub in sorted({g[0] for g in groups}):
            rc = self.api.resource(sub)
            wanted = f"tagName eq 'dcx-cluster' and tagValue eq '{self.ctx.cluster_name}'"
            with self.api.errors("list resource groups"):
                made = [json_of(g)["name"] for g in rc.resource_groups.list(filter=wanted) if self.owns(g.tags)]
            self.ctx.log.info("azure: deleting resource group(s) %s", ", ".join(made) or "(none)")
            self.api.run_all("delete resource group", made, lambda g, rc=rc: rc.resource_groups.begin_delete(g))
            removed += [f"azure resource group {g}" for g in made]
            deleted |= {(sub, g.lower()) for g in made}
        for sub, group in sorted(groups):
            if (sub, group.lower()) not in deleted:
                removed += self._sweep_group(sub, group)
        for prefix in ("azure/group/", "azure/vm/", "azure/vnet/", "azure/nsg/", "azure/mesh/", "azure/created"):
            for key in self.ctx.recorded_keys(prefix):
                self.ctx.record(key, None)
        return removed

    def _sweep_group(self, sub: str, group: str) -> list[str]:
        """The cluster's tagged resources in a group dcx did not make, users before what they use."""
        nc, cc = self.api.network(sub), self.api.compute(sub)
        removed = []
        vms = [vm["name"] for vm in self.list_vms(sub, group) if self.owns(vm.get("tags"))]
        self.api.run_all("delete virtual machine", vms, lambda n: cc.virtual_machines.begin_delete(group, n))
        removed += [f"azure virtual machine {n}" for n in vms]
        nics = [x["name"] for x in self.list_network(sub, group, "network_interfaces") if self.owns(x.get("tags"))]
        self.api.run_all("delete network interface", nics, lambda n: self.begin_nic_delete(sub, group, n))
        removed += [f"azure network interface {n}" for n in nics]
        pips = [x["name"] for x in self.list_network(sub, group, "public_ip_addresses") if self.owns(x.get("tags"))]
        self.api.run_all("delete public IP", pips, lambda n: nc.public_ip_addresses.begin_delete(group, n))
        removed += [f"azure public IP {n}" for n in pips]
        disks = [d["name"] for d in self.list_disks(sub, group) if self.owns(d.get("tags"))]
        self.api.run_all("delete disk", disks, lambda n: cc.disks.begin_delete(group, n))
        removed += [f"azure disk {n}" for n in disks]
        for kind, what in (("network_security_groups", "network security group"),
                           ("virtual_networks", "virtual network")):
            names = [x["name"] for x in self.list_network(sub, group, kind) if self.owns(x.get("tags"))]
            ops = getattr(nc, kind)
            self.api.run_all(f"delete {what}", names, lambda n, ops=ops: ops.begin_delete(group, n))
            removed += [f"azure {what} {n}" for n in names]
        return removed
