"""The `aws` provider: EC2 instances through boto3.

A pool's section: `aws: {region, instanceType, image, subnet, vpc, vpcCIDR, subnetCIDR, spot,
rootVolumeGiB, publicIP, tags, sshAddress: public|private}`.

- Network (dcx.providers.aws_network): the pool's subnet or VPC, or a cluster VPC (`vpcCIDR`) with a
  public subnet, internet gateway and route table that dcx makes; a security group with SSH from
  spec.network.sshCIDR only, all traffic between the group's own members, and the mesh UDP port from
  the other providers' nodes (/32) when the cluster spans providers. The cluster's key pair is imported.
- Image: the given AMI id, or the newest Ubuntu LTS for the region and architecture (Canonical's
  owner id in the region's partition, and name filter).
- Instances: one run_instances per batch of a pool (MinCount=MaxCount), with a ClientToken derived
  from cluster id + pool + batch + generation, after a look-up by tags so a re-run never duplicates.
  EC2 keeps a token at least 24 h after its instances are terminated and answers a repeat with the
  old reservation, so the journal's generation of a batch goes up once a launch of it completed: a
  retry of an interrupted launch reuses its token, a node made again (scale N -> N-1 -> N, a deleted
  or interrupted spot node) gets a new one.

Naming without one call per instance: EC2 can tag at launch only with values shared by the whole
batch, and a per-instance Name costs one create_tags call per instance (a 100-node pool would cost
100 calls more than a 1-node pool). So a batch is a run of consecutive node indices and carries
`dcx:index-base` = its first index; an instance's node index is that plus its AmiLaunchIndex, which
EC2 assigns 0..n-1 within the launch. The `Name` tag is the node name for a batch of one and the pool
(`CLUSTER-POOL`) for larger batches. The guest's hostname is EC2's (ip-10-...), since one user-data
serves the whole batch.

Tags on instances, volumes and network interfaces: dcx:cluster, dcx:cluster-id, dcx:pool,
dcx:index-base, Name, dcx:created, dcx:created-by (the STS caller ARN), plus the pool's own `tags`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dcx.errors import ProviderError
from dcx.providers.aws_api import AwsApi, chunks, code_of, message_of, paged, settle, tag_spec, tags_of
from dcx.providers.aws_network import AwsNetwork, Site
from dcx.providers.base import FoundCluster, Node, NodeRequest, Provider

# Canonical's image owner per partition (Ubuntu's "Find Ubuntu images on AWS": 099720109477 in the
# default partition, 513442679011 in GovCloud, 837727238323 in China).
CANONICAL = "099720109477"
CANONICAL_BY_PARTITION = {"us-gov-": "513442679011", "cn-": "837727238323"}
UBUNTU_NAME = "ubuntu/images/hvm-ssd*/ubuntu-*-*-{arch}-server-*"
UBUNTU_LTS_RE = re.compile(r"/ubuntu-[a-z]+-(\d\d)\.04-")
# Graviton (arm64) families: a1, and a "g" after the generation digit (t4g, m7gd, c6gn, im4gn, x2gd).
ARM_FAMILY_RE = re.compile(r"^(a1|[a-z]+\d+[a-z]*g[a-z]*)\.")
AMI_RE = re.compile(r"^ami-[0-9a-f]{8,17}$")
BATCH = 500  # instances per run_instances call (all-or-nothing: smaller batches fail less on capacity)
CAPACITY_CODES = {"InsufficientInstanceCapacity", "Unsupported", "InsufficientCapacity",
                  "InsufficientFreeAddressesInSubnet"}
LIVE_STATES = ["pending", "running", "stopping", "stopped"]
# What find_clusters reads the dcx:* tags of: every site has a key pair and a group (made first),
# dcx's own VPCs come before them; live instances (terminated ones keep their tags for an hour).
CLUSTER_KINDS = [("describe_security_groups", "SecurityGroups"), ("describe_key_pairs", "KeyPairs"),
                 ("describe_vpcs", "Vpcs"), ("describe_instances", "Instances")]
RESERVED_TAG_PREFIXES = ("dcx:", "aws:")


class AwsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    region: str = ""  # default: AWS_REGION, AWS_DEFAULT_REGION, the profile's region
    instanceType: str = Field(default="t3.small", pattern=r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")
    image: str = ""  # an AMI id; default: the newest Ubuntu LTS (Canonical) for the region and arch
    subnet: str = ""  # a subnet to use (its VPC follows)
    vpc: str = ""  # a VPC to use (its subnets are tried zone by zone)
    vpcCIDR: str = "10.0.0.0/16"  # the range of the VPC dcx makes when none is given
    subnetCIDR: str = ""  # the first subnet dcx makes in it (default: its first 1/16, /28 at most)
    spot: bool = False
    rootVolumeGiB: int = Field(default=20, ge=8, le=16384)
    publicIP: bool = True  # a public address (needed for sshAddress: public and for a mesh across providers)
    tags: dict[str, str] = Field(default_factory=dict)
    sshAddress: Literal["public", "private"] = "public"

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        if value and not re.match(r"^[a-z]{2}(-[a-z]+)+-\d$", value):
            raise ValueError("must be a region name such as us-east-1")
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if value and not AMI_RE.match(value):
            raise ValueError("must be an AMI id (ami-...), or empty for the latest Ubuntu LTS")
        return value

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, value: str) -> str:
        if value and not re.match(r"^subnet-[0-9a-f]+$", value):
            raise ValueError("must be a subnet id (subnet-...)")
        return value

    @field_validator("vpc")
    @classmethod
    def _vpc(cls, value: str) -> str:
        if value and not re.match(r"^vpc-[0-9a-f]+$", value):
            raise ValueError("must be a VPC id (vpc-...)")
        return value

    @field_validator("vpcCIDR")
    @classmethod
    def _vpc_cidr(cls, value: str) -> str:
        net = ipaddress.ip_network(value, strict=True)
        if net.version != 4 or not 16 <= net.prefixlen <= 28:
            raise ValueError("must be an IPv4 network between /16 and /28")
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, tags: dict[str, str]) -> dict[str, str]:
        for key, value in tags.items():
            if key.lower().startswith(RESERVED_TAG_PREFIXES) or key == "Name":
                raise ValueError(f"tag '{key}' is reserved (dcx sets Name and dcx:*; AWS owns aws:*)")
            if not 1 <= len(key) <= 128 or len(value) > 256:
                raise ValueError(f"tag '{key[:40]}': keys are 1-128 characters, values at most 256")
        if len(tags) > 40:
            raise ValueError("at most 40 tags (EC2 allows 50 per resource; dcx sets its own)")
        return tags

    @model_validator(mode="after")
    def _subnet_cidr(self) -> AwsSettings:
        if self.subnetCIDR:
            sub = ipaddress.ip_network(self.subnetCIDR, strict=True)
            if not sub.subnet_of(ipaddress.ip_network(self.vpcCIDR)) or sub.prefixlen > 28:  # type: ignore[arg-type]
                raise ValueError(f"subnetCIDR {sub} must be a /28 or larger inside vpcCIDR {self.vpcCIDR}")
        if self.sshAddress == "public" and not self.publicIP:
            raise ValueError("sshAddress: public needs publicIP: true")
        return self


def arch_of(instance_type: str) -> str:
    return "arm64" if ARM_FAMILY_RE.match(instance_type) else "amd64"


def canonical_owner(region: str) -> str:
    return next((owner for prefix, owner in CANONICAL_BY_PARTITION.items() if region.startswith(prefix)), CANONICAL)


def client_token(cluster_id: str, pool: str, first: int, last: int, subnet: str, generation: int = 0) -> str:
    """Idempotency token of one launch: a retried call with it makes nothing new (on real EC2).
    64 hex characters (EC2: at most 64 ASCII characters)."""
    gen = f"/{generation}" if generation else ""
    return hashlib.sha256(f"dcx/{cluster_id}/{pool}/{first}-{last}/{subnet}{gen}".encode()).hexdigest()[:64]


def batches(requests: list[NodeRequest]) -> list[list[NodeRequest]]:
    """Runs of consecutive indices, at most BATCH long: index = dcx:index-base + AmiLaunchIndex."""
    out: list[list[NodeRequest]] = []
    for req in sorted(requests, key=lambda r: r.index):
        if out and out[-1][-1].index == req.index - 1 and len(out[-1]) < BATCH:
            out[-1].append(req)
        else:
            out.append([req])
    return out


class AwsProvider(Provider):
    name = "aws"
    settings_model = AwsSettings

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.api = AwsApi()
        self.net = AwsNetwork(self)
        self._images: dict[tuple[str, str], tuple[str, str]] = {}

    def check_prerequisites(self) -> None:
        import importlib.util

        if importlib.util.find_spec("boto3") is None:  # found, not imported: that happens on first use
            from dcx.errors import PrerequisiteMissing

            raise PrerequisiteMissing("the aws provider needs boto3", hint="pip install boto3")

    # --- settings -------------------------------------------------------------------------------

    def settings(self, pool: Any) -> AwsSettings:
        return AwsSettings.model_validate(pool.settings)

    def region_of(self, pool: Any) -> str:
        return self.api.region(self.settings(pool).region)

    def site_of(self, pool: Any) -> Site:
        return self.net.site(self.region_of(pool), self.settings(pool))

    def pool_filters(self, pools: list[str] | None = None, states: list[str] = LIVE_STATES) -> list[dict[str, Any]]:
        out = self.net.own_filters() + [{"Name": "instance-state-name", "Values": states}]
        if pools is not None:
            out.append({"Name": "tag:dcx:pool", "Values": pools})
        return out

    # --- image ----------------------------------------------------------------------------------

    def image_of(self, region: str, s: AwsSettings) -> tuple[str, str]:
        """(AMI id, root device name): the root device is where rootVolumeGiB applies."""
        key = (region, s.image or arch_of(s.instanceType))
        if key in self._images:
            return self._images[key]
        ec2 = self.api.ec2(region)
        if s.image:
            with self.api.errors(f"look up image {s.image} in {region}"):
                try:
                    found = ec2.describe_images(ImageIds=[s.image])["Images"]
                except Exception as exc:
                    if code_of(exc) not in ("InvalidAMIID.NotFound", "InvalidAMIID.Malformed"):
                        raise
                    found = []
            if not found:
                raise ProviderError(f"AWS image {s.image} does not exist in {region} (or is not visible to you)",
                                    hint="AMI ids are per region: look it up in that region, or leave aws.image out")
            image = found[0]
        else:
            arch = arch_of(s.instanceType)
            with self.api.errors(f"look up the latest Ubuntu LTS image in {region}"):
                found = ec2.describe_images(Owners=[canonical_owner(region)], Filters=[
                    {"Name": "name", "Values": [UBUNTU_NAME.format(arch=arch)]},
                    {"Name": "state", "Values": ["available"]},
                    {"Name": "architecture", "Values": ["arm64" if arch == "arm64" else "x86_64"]}])["Images"]
            lts = [(int(m.group(1)), i.get("CreationDate") or "", i.get("Name", ""), i) for i in found
                   if (m := UBUNTU_LTS_RE.search(i.get("Name", ""))) and int(m.group(1)) % 2 == 0]
            if not lts:
                raise ProviderError(f"no Ubuntu LTS image ({arch}) from Canonical found in {region}",
                                    hint="set aws.image to an AMI id")
            image = max(lts, key=lambda t: t[:3])[3]
        self._images[key] = (image["ImageId"], image.get("RootDeviceName") or "/dev/sda1")
        return self._images[key]

    # --- instances ------------------------------------------------------------------------------

    def user_data(self) -> str:
        from dcx.templates import render

        user = self.ctx.ssh_user
        return render("cloud-init.yaml", hostname="-", user=user, public_key=self.ctx.ssh_public_key,
                      disable_root="false" if user == "root" else "true")

    def instance_tags(self, pool: Any, s: AwsSettings, batch: list[NodeRequest]) -> dict[str, str]:
        name = batch[0].name if len(batch) == 1 else f"{self.ctx.cluster_name}-{pool.name}"
        return {**s.tags, **self.net.tags(name, **{"dcx:pool": pool.name, "dcx:index-base": str(batch[0].index)})}

    def launch_params(self, pool: Any, s: AwsSettings, site: Site, subnet: str, batch: list[NodeRequest],
                      generation: int = 0) -> dict[str, Any]:
        image, root_device = self.image_of(site.region, s)
        tags = self.instance_tags(pool, s, batch)
        kinds = ["instance", "volume", "network-interface"] + (["spot-instances-request"] if s.spot else [])
        params: dict[str, Any] = {
            "ImageId": image, "InstanceType": s.instanceType, "MinCount": len(batch), "MaxCount": len(batch),
            "KeyName": site.key_name, "UserData": self.user_data(),
            "ClientToken": client_token(self.ctx.cluster_id, pool.name, batch[0].index, batch[-1].index, subnet,
                                        generation),
            "NetworkInterfaces": [{"DeviceIndex": 0, "SubnetId": subnet, "Groups": [site.sg_id],
                                   "AssociatePublicIpAddress": s.publicIP, "DeleteOnTermination": True}],
            "BlockDeviceMappings": [{"DeviceName": root_device, "Ebs": {
                "VolumeSize": s.rootVolumeGiB, "VolumeType": "gp3", "DeleteOnTermination": True}}],
            "TagSpecifications": [tag_spec(kind, tags) for kind in kinds],
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
        }
        if s.spot:
            params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
                "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
        return params

    def find_instances(self, region: str, pools: list[str] | None, states: list[str] = LIVE_STATES,
                       ) -> list[dict[str, Any]]:
        """The cluster's live instances in a region, by tag filter, page by page."""
        ec2 = self.api.ec2(region)
        with self.api.errors(f"list the cluster's instances in {region}"):
            return paged(ec2, "describe_instances", "Instances", Filters=self.pool_filters(pools, states),
                         PaginationConfig={"PageSize": 1000})

    def node_name_of(self, inst: dict[str, Any]) -> str | None:
        tags = tags_of(inst)
        try:
            index = int(tags["dcx:index-base"]) + int(inst.get("AmiLaunchIndex", 0))
        except (KeyError, ValueError):
            return None
        from dcx.spec import node_name

        return node_name(tags.get("dcx:cluster", self.ctx.cluster_name), tags.get("dcx:pool", ""), index)

    def create_nodes(self, pool: Any, requests: list[NodeRequest]) -> list[Node]:
        s = self.settings(pool)
        site = self.site_of(pool)
        found = {self.node_name_of(i): i for i in self.find_instances(site.region, [pool.name])}
        missing = [r for r in requests if r.name not in found]
        launched: list[str] = []
        for batch in batches(missing):
            launched += self._launch(pool, s, site, batch)
        if launched:
            ec2 = self.api.ec2(site.region)
            with self.api.errors(f"wait for {len(launched)} instance(s) of pool {pool.name} to run"):
                for ids in chunks(launched, 1000):
                    found.update({self.node_name_of(i): i for i in self._wait_for(ec2, ids, "running", 600)})
        stopped = [found[r.name]["InstanceId"] for r in requests
                   if r.name in found and found[r.name]["State"]["Name"] in ("stopped", "stopping")]
        if stopped:
            found.update(self._start(site.region, pool.name, stopped))
        out = []
        for req in requests:
            inst = found.get(req.name)
            if inst is None:
                raise ProviderError(f"AWS reports no instance for {req.name} after launching it")
            out.append(self._node(inst, pool, req.role, s))
        return out

    def _launch(self, pool: Any, s: AwsSettings, site: Site, batch: list[NodeRequest]) -> list[str]:
        """One run_instances for the batch; on a capacity error, the next zone's subnet."""
        ec2 = self.api.ec2(site.region)
        key = f"aws/batch/{pool.name}/{batch[0].index}"
        # A batch launched before whose nodes are missing now: its token would replay the old
        # (terminated) reservation, so this launch is the next generation. An interrupted launch
        # ("launching") keeps its generation: its retry must not launch twice.
        before = self.ctx.recorded(key) or {}
        generation = int(before.get("generation", 0)) + (1 if before.get("state") == "launched" else 0)
        tried: list[str] = []
        candidates = list(site.subnets)
        while candidates:
            subnet, az = candidates.pop(0)
            params = self.launch_params(pool, s, site, subnet, batch, generation)
            # Write-ahead: the batch's token and place are known before the call that makes it.
            self.ctx.record(key, {"state": "launching", "region": site.region, "subnet": subnet,
                                  "count": len(batch), "token": params["ClientToken"], "generation": generation})
            with self.api.errors(f"launch {len(batch)} x {s.instanceType} for pool {pool.name} in {az}"):
                try:
                    # The key pair, group and subnet may be moments old (eventual consistency).
                    reservation = settle(ec2.run_instances, **params)
                except Exception as exc:
                    if code_of(exc) not in CAPACITY_CODES:
                        raise
                    tried.append(f"{az}: {code_of(exc)}")
                    self.ctx.log.warning("no capacity for pool %s in %s (%s): %s", pool.name, az, code_of(exc),
                                         message_of(exc))
                    if not candidates:
                        more = self.net.more_subnets(site, s)
                        if more:
                            candidates.append(more)
                    continue
            ids = [i["InstanceId"] for i in reservation["Instances"]]
            if site.subnets and site.subnets[0][0] != subnet:  # later batches start where this one fit
                site.subnets.sort(key=lambda t: t[0] != subnet)
            self.ctx.record(key, {"state": "launched", "region": site.region, "subnet": subnet,
                                  "count": len(batch), "instances": ids, "generation": generation})
            return ids
        self.ctx.record(key, None)
        raise ProviderError(f"AWS has no capacity for {len(batch)} x {s.instanceType} (pool {pool.name}): "
                            + "; ".join(tried),
                            hint="try another instanceType or region, a smaller count, or a VPC/subnet in "
                                 "another zone (aws.vpc / aws.subnet)")

    def _start(self, region: str, pool: str, ids: list[str]) -> dict[str | None, dict[str, Any]]:
        ec2 = self.api.ec2(region)
        with self.api.errors(f"start {len(ids)} stopped instance(s) of pool {pool}"):
            for chunk in chunks(ids, 1000):
                # A stopping instance cannot start yet: wait until it has stopped.
                ec2.get_waiter("instance_stopped").wait(InstanceIds=chunk,
                                                        WaiterConfig={"Delay": 5, "MaxAttempts": 60})
                ec2.start_instances(InstanceIds=chunk)
                ec2.get_waiter("instance_running").wait(InstanceIds=chunk,
                                                        WaiterConfig={"Delay": 5, "MaxAttempts": 120})
        return {self.node_name_of(i): i for i in self.find_instances(region, [pool])}

    def _node(self, inst: dict[str, Any], pool: Any, role: str, s: AwsSettings) -> Node:
        name = self.node_name_of(inst) or inst["InstanceId"]
        private, public = inst.get("PrivateIpAddress", ""), inst.get("PublicIpAddress", "")
        if s.sshAddress == "public" and not public and inst["State"]["Name"] == "running":
            raise ProviderError(f"AWS instance {inst['InstanceId']} ({name}) has no public address",
                                hint="set aws.publicIP: true, or aws.sshAddress: private when dcx runs inside the VPC")
        region = inst.get("Placement", {}).get("AvailabilityZone", "")[:-1] or self.region_of(pool)
        return Node(
            name=name, pool=pool.name, provider=self.name, role=role, hostname=name,
            ssh_address=public if s.sshAddress == "public" else private,
            private_address=private, public_address=public, ssh_user=self.ctx.ssh_user, ssh_port=22,
            provider_ids={"instance": inst["InstanceId"], "region": region},
            network=f"aws:{inst.get('VpcId', '')}",
            extra={"state": inst["State"]["Name"], "zone": inst.get("Placement", {}).get("AvailabilityZone", "")},
        )

    def _regions(self, pools: list[Any]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for pool in pools:
            out.setdefault(self.region_of(pool), []).append(pool)
        return out

    def list_nodes(self, pools: list[Any]) -> list[Node]:
        if not self.ctx.cluster_id:
            return []
        out = []
        for region, mine in self._regions(pools).items():
            by_name = {p.name: p for p in mine}
            for inst in self.find_instances(region, sorted(by_name)):
                pool = by_name.get(tags_of(inst).get("dcx:pool", ""))
                if pool is not None and self.node_name_of(inst):
                    out.append(self._node(inst, pool, pool.role, self.settings(pool)))
        return sorted(out, key=lambda n: n.name)

    def repair_nodes(self, pools: list[Any], nodes: list[Node]) -> list[Node]:
        """Stopped instances are started; the group's rules are checked again (sshCIDR may have changed)."""
        by_pool = {p.name: p for p in pools}
        out = []
        for pool_name in sorted({n.pool for n in nodes}):
            mine = [n for n in nodes if n.pool == pool_name]
            pool = by_pool.get(pool_name)
            if pool is None:
                out += mine
                continue
            self.site_of(pool)
            requests = [NodeRequest(n.name, n.pool, n.role, 0) for n in mine]
            if any(n.extra.get("state") in ("stopped", "stopping") for n in mine):
                out += self.create_nodes(pool, requests)  # finds them (no launch) and starts the stopped
            else:
                out += mine
        return out

    def delete_nodes(self, pools: list[Any], nodes: list[Node]) -> None:
        by_region: dict[str, list[str]] = {}
        for n in nodes:
            if n.provider_ids.get("instance"):
                by_region.setdefault(n.provider_ids.get("region", ""), []).append(n.provider_ids["instance"])
        for region, ids in by_region.items():
            self._terminate(self.api.region(region), ids)

    def _terminate(self, region: str, ids: list[str]) -> None:
        ec2 = self.api.ec2(region)
        with self.api.errors(f"terminate {len(ids)} instance(s) in {region}"):
            live = []
            for chunk in chunks(sorted(ids), 1000):
                try:
                    ec2.terminate_instances(InstanceIds=chunk)
                    live += chunk
                except Exception as exc:
                    if code_of(exc) != "InvalidInstanceID.NotFound":
                        raise
                    # Some are gone already: terminate the ones that still exist (found by filter).
                    existing = [i["InstanceId"] for i in paged(ec2, "describe_instances", "Instances", Filters=[
                        {"Name": "instance-id", "Values": chunk}])]
                    if existing:
                        ec2.terminate_instances(InstanceIds=existing)
                        live += existing
            for chunk in chunks(live, 1000):
                self._wait_for(ec2, chunk, "terminated", 600)

    def _wait_for(self, ec2: Any, ids: list[str], state: str, timeout: float) -> list[dict[str, Any]]:
        """Describe the instances (up to 1000) until all are in `state`; their last description.

        Not botocore's waiters: instance_terminated fails on an instance shown pending or stopping,
        which EC2 may still show right after the terminate call (eventual consistency), and both
        wait 5 s before asking again. Waiting to run fails once an instance is on its way out (a spot
        request not fulfilled, a launch that failed); an instance not known yet (just launched) or
        gone (long terminated) is asked for again or counted as terminated."""
        deadline, delay = time.monotonic() + timeout, 1.0
        while True:
            try:
                found = paged(ec2, "describe_instances", "Instances", InstanceIds=ids)
            except Exception as exc:
                if code_of(exc) != "InvalidInstanceID.NotFound":
                    raise
                found = [] if state == "running" else paged(ec2, "describe_instances", "Instances", Filters=[
                    {"Name": "instance-id", "Values": ids}])
            states = {i["InstanceId"]: i["State"]["Name"] for i in found}
            if state == "running":
                lost = sorted(i for i, st in states.items() if st in ("shutting-down", "terminated", "stopping"))
                if lost:
                    raise ProviderError(f"AWS instance(s) {', '.join(lost[:5])} stopped or terminated instead of "
                                        "running (a spot request not fulfilled, or a launch that failed)")
                left = sorted(set(ids) - {i for i, st in states.items() if st == "running"})
            else:
                left = sorted(i for i, st in states.items() if st != "terminated")
            if not left:
                return found
            if time.monotonic() > deadline:
                raise ProviderError(f"AWS instance(s) {', '.join(left[:5])} not {state} after {int(timeout)} s")
            time.sleep(delay)
            delay = min(delay * 2, 5)

    def sweep(self, pools: list[Any]) -> list[str]:
        """Everything tagged with the cluster in the pools' regions: instances (terminated and waited
        for), spot requests, then the network, group and key (dcx.providers.aws_network)."""
        removed: list[str] = []
        # The pools' regions, and those the journal names (a pool or region dropped from the spec).
        regions = set(self._regions(pools)) | self.journal_regions()
        for region in sorted(regions):
            ec2 = self.api.ec2(region)
            instances = self.find_instances(region, None, LIVE_STATES + ["shutting-down"])
            if instances:
                self._terminate(region, [i["InstanceId"] for i in instances])
                removed += [f"aws instance {i['InstanceId']}" for i in instances]
            with self.api.errors(f"list the cluster's spot requests in {region}"):
                spot = paged(ec2, "describe_spot_instance_requests", "SpotInstanceRequests",
                             Filters=self.net.own_filters() + [{"Name": "state", "Values": ["open", "active"]}])
            if spot:
                with self.api.errors(f"cancel {len(spot)} spot request(s) in {region}"):
                    ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=[r["SpotInstanceRequestId"]
                                                                              for r in spot])
                removed += [f"aws spot-request {r['SpotInstanceRequestId']}" for r in spot]
            removed += self.net.sweep(region)
        for key in self.ctx.recorded_keys("aws/"):
            self.ctx.record(key, None)
        return removed

    def find_clusters(self, pools: list[Any]) -> list[FoundCluster]:
        """Clusters named ctx.cluster_name in the pools' (and the journal's) regions, by the dcx:*
        tags of what dcx makes (a few describe calls per region, filtered by the name tag)."""
        out: list[FoundCluster] = []
        by_name = [{"Name": "tag:dcx:cluster", "Values": [self.ctx.cluster_name]}]
        for region in sorted(set(self._regions(pools)) | self.journal_regions()):
            ec2 = self.api.ec2(region)
            found: list[dict[str, Any]] = []
            with self.api.errors(f"look for dcx clusters named {self.ctx.cluster_name} in {region}"):
                for operation, key in CLUSTER_KINDS:
                    extra = [{"Name": "instance-state-name", "Values": LIVE_STATES}] if key == "Instances" else []
                    found += paged(ec2, operation, key, Filters=by_name + extra)
            clusters: dict[str, FoundCluster] = {}
            for tags in map(tags_of, found):
                cid = tags.get("dcx:cluster-id", "")
                if tags.get("dcx:cluster") != self.ctx.cluster_name or not cid:
                    continue
                c = clusters.setdefault(cid, FoundCluster(id=cid, name=self.ctx.cluster_name, provider=self.name,
                                                          where=f"aws {region}"))
                created = tags.get("dcx:created", "")
                if created and (not c.created or created < c.created):
                    c.created, c.created_by = created, tags.get("dcx:created-by", c.created_by)
                c.created_by = c.created_by or tags.get("dcx:created-by", "")
            out += sorted(clusters.values(), key=lambda c: c.id)
        return out

    def journal_regions(self) -> set[str]:
        """Regions the journal holds resources in: `aws/KIND/REGION/...`, and launches' recorded region."""
        out = set()
        for key in self.ctx.recorded_keys("aws/"):
            kind, _, rest = key[len("aws/"):].partition("/")
            value = self.ctx.recorded(key)
            if kind == "batch":
                if isinstance(value, dict) and value.get("region"):
                    out.add(value["region"])
            elif rest:
                out.add(rest.split("/")[0])
        return out

    def allow_mesh_peers(self, pools: list[Any], peers: list[str], port: int) -> None:
        sites = {(site.region, site.vpc_id): site for site in (self.site_of(p) for p in pools)}
        for site in sites.values():
            self.net.allow_mesh_peers(site, peers, port)
