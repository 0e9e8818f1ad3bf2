"""The aws provider against moto in server mode on 127.0.0.1 (the real boto3 client, endpoint from
AWS_ENDPOINT_URL), and end to end: moto's instances booted as namespace hosts -> a real swarm.

What moto does not do, and how these tests cope: it ignores ClientToken (re-runs are proven by the
tag look-up), tags no network interfaces at launch (interface tags are checked on the request), and
never fails for capacity or throttling (a small HTTP proxy in front of it injects those errors).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import ipaddress
import json
import logging
import os
import shutil
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from dcx.errors import ProviderError
from dcx.providers.base import NodeRequest
from dcx.spec import NetworkSpec, PoolSpec
from tests.fakes.aws_strict import StrictEc2
from tests.fakes.server import LoopbackServer
from tests.testbed.journal import MemoryJournal
from tests.testbed.local import Dcx, clusters_destroyed_after, skip_without_namespace_nodes, wait_for

pytestmark = [pytest.mark.timeout(600)]
REGION = "us-east-1"
VPC_CIDR = "10.214.16.0/20"  # this test file's range (boot-simulated hosts live in 10.214.16.0/24)
SUBNET_CIDR = "10.214.16.0/24"
CANONICAL = "099720109477"
log = logging.getLogger("test-aws")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def aws_env(url: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}


@pytest.fixture
def strict(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[StrictEc2]:
    """A clean moto (reset per test) behind a fresh strict EC2 layer (tests/fakes/aws_strict.py), and
    this process's AWS environment pointed at the layer."""
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(moto_url).netloc, timeout=30)
    conn.request("POST", "/moto-api/reset")
    assert conn.getresponse().status == 200
    conn.close()
    for key in ("AWS_PROFILE", "AWS_REGION", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_EC2"):
        monkeypatch.delenv(key, raising=False)
    with StrictEc2(moto_url) as layer:
        for key, value in aws_env(layer.url).items():
            monkeypatch.setenv(key, value)
        yield layer


@pytest.fixture
def moto(strict: StrictEc2) -> str:
    """The URL dcx and the tests talk EC2 to: moto behind the strict layer."""
    return strict.url


def ec2_client(url: str, region: str = REGION) -> Any:
    import boto3

    return boto3.client("ec2", region_name=region, endpoint_url=url, aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def public_key() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " dcx-t"


class Ctx:
    """A provider context with an in-memory journal (what the engine's state would hold)."""

    def __init__(self, tmp: Path, name: str = "awst", cluster_id: str = "c0ffee01", ssh_cidr: str = "10.214.16.0/20",
                 user: str = "ubuntu") -> None:
        self.journal = MemoryJournal()
        self.resources = self.journal.resources
        self.ctx = self.journal.context(name, cluster_id, tmp, ssh_public_key=public_key(), log=log,
                                        network=NetworkSpec(sshCIDR=ssh_cidr), ssh_user=user)

    def provider(self) -> Any:
        from dcx.providers.aws import AwsProvider

        return AwsProvider(self.ctx)


def pool(name: str = "workers", count: int = 3, role: str = "worker", **aws: Any) -> PoolSpec:
    settings = {"region": REGION, "vpcCIDR": VPC_CIDR, "subnetCIDR": SUBNET_CIDR, "sshAddress": "private",
                "publicIP": False, **aws}
    return PoolSpec(name=name, role=role, count=count, provider="aws", aws=settings)


def requests_for(cluster: str, p: PoolSpec, indices: range | list[int]) -> list[NodeRequest]:
    return [NodeRequest(f"{cluster}-{p.name}-{i}", p.name, p.role, i) for i in indices]


def count_calls(provider: Any, region: str = REGION) -> dict[str, int]:
    """API calls the provider's client makes from now on, by operation (botocore's event hooks)."""
    calls: dict[str, int] = {}

    def before_call(model: Any, **_: Any) -> None:
        calls[model.name] = calls.get(model.name, 0) + 1

    provider.api.ec2(region).meta.events.register("before-call.ec2", before_call)
    return calls


def instances(ec2: Any, cluster: str, states: tuple[str, ...] = ("pending", "running", "stopping", "stopped"),
              key: str = "dcx:cluster") -> list[dict[str, Any]]:
    out = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=[
            {"Name": f"tag:{key}", "Values": [cluster]}, {"Name": "instance-state-name", "Values": list(states)}]):
        for r in page["Reservations"]:
            out += r["Instances"]
    return out


def tags(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags") or []}


def tagged_leftovers(url: str, cluster: str, key: str = "dcx:cluster", region: str = REGION) -> list[str]:
    """Every resource of any type that still carries the cluster's tag (EC2 describes per type, and
    the tagging API across types), terminated instances aside. `key` dcx:cluster-id: by the id."""
    import boto3

    ec2 = ec2_client(url, region)
    f = [{"Name": f"tag:{key}", "Values": [cluster]}]
    out = [f"instance {i['InstanceId']}" for i in instances(ec2, cluster, ("pending", "running", "stopping",
                                                                          "stopped", "shutting-down"), key)]
    for op, key, ident in (("describe_volumes", "Volumes", "VolumeId"),
                           ("describe_network_interfaces", "NetworkInterfaces", "NetworkInterfaceId"),
                           ("describe_security_groups", "SecurityGroups", "GroupId"),
                           ("describe_key_pairs", "KeyPairs", "KeyName"), ("describe_vpcs", "Vpcs", "VpcId"),
                           ("describe_subnets", "Subnets", "SubnetId"),
                           ("describe_internet_gateways", "InternetGateways", "InternetGatewayId"),
                           ("describe_route_tables", "RouteTables", "RouteTableId"),
                           ("describe_spot_instance_requests", "SpotInstanceRequests", "SpotInstanceRequestId")):
        out += [f"{key} {r[ident]}" for r in getattr(ec2, op)(Filters=f)[key]]
    tagging = boto3.client("resourcegroupstaggingapi", region_name=region, endpoint_url=url,
                           aws_access_key_id="testing", aws_secret_access_key="testing")
    terminated = {i["InstanceId"] for i in instances(ec2, cluster, ("terminated",), key)}
    for r in tagging.get_resources(TagFilters=[{"Key": key, "Values": [cluster]}])["ResourceTagMappingList"]:
        arn = r["ResourceARN"]
        if arn.rsplit("/", 1)[-1] not in terminated:
            out.append(f"arn {arn}")
    return sorted(set(out))


# --- a proxy in front of moto that injects AWS errors -------------------------------------------------


class FaultProxy(LoopbackServer):
    """Forwards to moto; `decide(action, form)` may answer instead with (status, code) -> an EC2 error."""

    def __init__(self, target: str, decide: Callable[[str, dict[str, str]], tuple[int, str] | None]) -> None:
        self.target = urllib.parse.urlsplit(target).netloc
        self.decide = decide
        self.injected: list[str] = []
        self.forwarded: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                form = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode()).items()}
                action = form.get("Action", "")
                fault = proxy.decide(action, form)
                if fault is not None:
                    status, code = fault
                    proxy.injected.append(f"{action}:{code}")
                    xml = (f'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{code}</Code>'
                           f"<Message>injected by the test proxy</Message></Error></Errors>"
                           f"<RequestID>test-{len(proxy.injected)}</RequestID></Response>").encode()
                    self._answer(status, {"Content-Type": "text/xml"}, xml)
                    return
                proxy.forwarded.append(action)
                conn = http.client.HTTPConnection(proxy.target, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request("POST", self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                keep = {k: v for k, v in resp.getheaders()
                        if k.lower() not in ("content-length", "transfer-encoding", "connection")}
                self._answer(resp.status, keep, data)

            def _answer(self, status: int, headers: dict[str, str], data: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        super().__init__(Handler, "aws-fault-proxy")
        self.start()


@contextlib.contextmanager
def fault_proxy(moto: str, decide: Callable[[str, dict[str, str]], tuple[int, str] | None],
                monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    proxy = FaultProxy(moto, decide)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield proxy
    finally:
        monkeypatch.setenv("AWS_ENDPOINT_URL", moto)
        proxy.close()


# --- provider tests against moto ----------------------------------------------------------------------


def test_create_tags_user_data_and_default_image(moto: str, strict: StrictEc2, tmp_path: Path) -> None:
    c = Ctx(tmp_path)
    p = c.provider()
    workers = pool()
    calls = count_calls(p)
    launches: list[dict[str, Any]] = []
    p.api.ec2(REGION).meta.events.register(
        "provide-client-params.ec2.RunInstances", lambda params, **_: launches.append(params))
    nodes = p.create_nodes(workers, requests_for("awst", workers, range(1, 4)))

    assert [n.name for n in nodes] == ["awst-workers-1", "awst-workers-2", "awst-workers-3"]
    # One launch (a launch refused as NotFound right after the key/group were made is tried again).
    retried = sum(r.startswith("RunInstances:") for r in strict.refused)
    assert calls["RunInstances"] == 1 + retried and launches[0]["MinCount"] == launches[0]["MaxCount"] == 3
    ec2 = ec2_client(moto)
    found = instances(ec2, "awst")
    assert sorted(i["InstanceId"] for i in found) == sorted(n.provider_ids["instance"] for n in nodes)
    vpc = c.resources[f"aws/vpc/{REGION}"]["id"]
    for inst, node in zip(sorted(found, key=lambda i: i["AmiLaunchIndex"]), nodes, strict=True):
        t = tags(inst)
        assert t["dcx:cluster"] == "awst" and t["dcx:cluster-id"] == "c0ffee01" and t["dcx:pool"] == "workers"
        assert t["Name"] == "awst-workers" and t["dcx:index-base"] == "1"
        assert inst["KeyName"] == "dcx-awst-c0ffee01"
        assert ipaddress.ip_address(inst["PrivateIpAddress"]) in ipaddress.ip_network(SUBNET_CIDR)
        assert node.ssh_address == node.private_address == inst["PrivateIpAddress"] and node.public_address == ""
        assert node.network == f"aws:{vpc}" and node.ssh_user == "ubuntu"
        assert node.provider_ids == {"instance": inst["InstanceId"], "region": REGION}
        data = ec2.describe_instance_attribute(InstanceId=inst["InstanceId"], Attribute="userData")
        user_data = base64.b64decode(data["UserData"]["Value"]).decode()
        assert user_data.startswith("#cloud-config") and c.ctx.ssh_public_key in user_data
        assert "name: ubuntu" in user_data and "disable_root: true" in user_data
        volumes = ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [inst["InstanceId"]]}])
        assert volumes["Volumes"] and all(tags(v)["dcx:cluster-id"] == "c0ffee01" for v in volumes["Volumes"])
        assert volumes["Volumes"][0]["Size"] == 20
    # moto does not tag interfaces at launch: the request is what shows they are asked for.
    kinds = {s["ResourceType"]: tags(s) for s in launches[0]["TagSpecifications"]}
    assert set(kinds) == {"instance", "volume", "network-interface"}
    assert all(k["dcx:cluster"] == "awst" and k["dcx:pool"] == "workers" for k in kinds.values())
    # The default image: Canonical's newest LTS that moto knows for amd64.
    ubuntu = ec2.describe_images(Owners=[CANONICAL])["Images"]
    lts = [i for i in ubuntu if "-amd64-server-" in i["Name"] and ".04-" in i["Name"]]
    newest = max(lts, key=lambda i: i["Name"].split("-")[-4])
    assert {i["ImageId"] for i in found} == {newest["ImageId"]}
    # Network resources dcx made are tagged and journaled.
    for key in (f"aws/vpc/{REGION}", f"aws/igw/{REGION}", f"aws/rtb/{REGION}", f"aws/keypair/{REGION}",
                f"aws/subnet/{REGION}/us-east-1a", f"aws/sg/{REGION}/{vpc}"):
        assert key in c.resources, key
    # Write-ahead: the intent is journaled before the resource's id is.
    first = [k for k, v in c.journal.writes if k == f"aws/vpc/{REGION}"]
    assert c.journal.writes[[k for k, _ in c.journal.writes].index(first[0])][1]["state"] == "creating"
    assert tags(ec2.describe_vpcs(VpcIds=[vpc])["Vpcs"][0])["dcx:cluster-id"] == "c0ffee01"


def test_explicit_image_spot_and_public_address(moto: str, tmp_path: Path) -> None:
    ec2 = ec2_client(moto)
    image = ec2.register_image(Name="my-golden", RootDeviceName="/dev/xvda", Architecture="x86_64")["ImageId"]
    c = Ctx(tmp_path)
    p = c.provider()
    control = pool("control", 1, "control", image=image, spot=True, rootVolumeGiB=30, sshAddress="public",
                   publicIP=True, tags={"team": "infra"})
    [node] = p.create_nodes(control, requests_for("awst", control, [1]))
    [inst] = instances(ec2, "awst")
    assert inst["ImageId"] == image and inst.get("InstanceLifecycle") == "spot"
    assert tags(inst)["Name"] == "awst-control-1" and tags(inst)["team"] == "infra"
    assert node.public_address and node.ssh_address == node.public_address == inst["PublicIpAddress"]
    assert node.private_address == inst["PrivateIpAddress"]
    [volume] = ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [inst["InstanceId"]]}])[
        "Volumes"]
    assert volume["Size"] == 30

    missing = pool("control", 1, "control", image="ami-0123456789abcdef0")
    with pytest.raises(ProviderError, match="image ami-0123456789abcdef0 does not exist"):
        Ctx(tmp_path, name="awsu", cluster_id="u1").provider().create_nodes(missing, requests_for("awsu", missing, [1]))


def test_security_group_opens_no_cluster_port_to_the_world(moto: str, tmp_path: Path) -> None:
    c = Ctx(tmp_path, ssh_cidr="192.0.2.7/32")
    p = c.provider()
    workers = pool(sshAddress="public", publicIP=True)
    p.create_nodes(workers, requests_for("awst", workers, range(1, 3)))
    ec2 = ec2_client(moto)
    [sg] = ec2.describe_security_groups(Filters=[{"Name": "tag:dcx:cluster-id", "Values": ["c0ffee01"]}])[
        "SecurityGroups"]

    def ingress() -> list[tuple[Any, ...]]:
        group = ec2.describe_security_groups(GroupIds=[sg["GroupId"]])["SecurityGroups"][0]
        out = []
        for perm in group["IpPermissions"]:
            for r in perm.get("IpRanges", []):
                out.append((perm["IpProtocol"], perm.get("FromPort"), perm.get("ToPort"), r["CidrIp"]))
            for r in perm.get("UserIdGroupPairs", []):
                out.append((perm["IpProtocol"], perm.get("FromPort"), perm.get("ToPort"), r["GroupId"]))
        return sorted(out, key=str)

    rules = ingress()
    assert ("tcp", 22, 22, "192.0.2.7/32") in rules
    assert ("-1", None, None, sg["GroupId"]) in rules or ("-1", -1, -1, sg["GroupId"]) in rules
    assert [r for r in rules if r[3] == "0.0.0.0/0"] == []
    assert len(rules) == 2
    for inst in instances(ec2, "awst"):  # the group is the interface's (moto lists it there only)
        assert [g["GroupId"] for g in inst["NetworkInterfaces"][0]["Groups"]] == [sg["GroupId"]]

    # Across providers: the mesh port from exactly the given peers; stale peers lose their rule.
    p.allow_mesh_peers([workers], ["198.51.100.10", "198.51.100.11"], 51820)
    mesh = [r for r in ingress() if r[0] == "udp"]
    assert mesh == [("udp", 51820, 51820, "198.51.100.10/32"), ("udp", 51820, 51820, "198.51.100.11/32")]
    c.provider().allow_mesh_peers([workers], ["198.51.100.11", "203.0.113.5"], 51820)
    assert [r for r in ingress() if r[0] == "udp"] == [("udp", 51820, 51820, "198.51.100.11/32"),
                                                       ("udp", 51820, 51820, "203.0.113.5/32")]
    assert ("tcp", 22, 22, "192.0.2.7/32") in ingress()

    # A changed sshCIDR replaces the SSH rule on the next run (repair checks the group again).
    c2 = Ctx(tmp_path, ssh_cidr="192.0.2.8/32")
    c2.ctx.cluster_id = "c0ffee01"
    p2 = c2.provider()
    p2.repair_nodes([workers], p2.list_nodes([workers]))
    ssh = [r for r in ingress() if r[0] == "tcp"]
    assert ssh == [("tcp", 22, 22, "192.0.2.8/32")]
    assert [r for r in ingress() if r[3] == "0.0.0.0/0"] == []


def test_rerun_creates_nothing(moto: str, tmp_path: Path) -> None:
    c = Ctx(tmp_path)
    workers = pool()
    first = c.provider().create_nodes(workers, requests_for("awst", workers, range(1, 6)))
    # A new run (a new provider, as a new dcx process would have) asks for the same nodes again.
    p = c.provider()
    calls = count_calls(p)
    again = p.create_nodes(workers, requests_for("awst", workers, range(1, 6)))
    assert [n.provider_ids for n in again] == [n.provider_ids for n in first]
    creating = sorted(op for op in calls if op.startswith(("Create", "Run", "Import", "Authorize", "Attach",
                                                            "Associate")))
    assert creating == []
    ec2 = ec2_client(moto)
    assert len(instances(ec2, "awst")) == 5
    assert len(ec2.describe_vpcs(Filters=[{"Name": "tag:dcx:cluster", "Values": ["awst"]}])["Vpcs"]) == 1
    # One more node: only it is launched (its own batch: index-base 6), the others are found.
    more = p.create_nodes(workers, requests_for("awst", workers, range(1, 7)))
    assert calls["RunInstances"] == 1 and len(instances(ec2, "awst")) == 6
    assert [n.name for n in more][-1] == "awst-workers-6"
    assert sorted(n.name for n in p.list_nodes([workers])) == sorted(n.name for n in more)


def test_destroy_leaves_no_tagged_resource(moto: str, tmp_path: Path) -> None:
    c = Ctx(tmp_path)
    p = c.provider()
    control, workers = pool("control", 1, "control", spot=True), pool()
    nodes = p.create_nodes(control, requests_for("awst", control, [1]))
    nodes += p.create_nodes(workers, requests_for("awst", workers, range(1, 4)))
    other = Ctx(tmp_path, name="keep", cluster_id="0ther")  # another cluster: must survive
    other.provider().create_nodes(pool(), requests_for("keep", pool(), [1]))
    assert tagged_leftovers(moto, "awst")

    p.delete_nodes([control, workers], nodes[:2])
    assert len(instances(ec2_client(moto), "awst")) == 2
    removed = c.provider().sweep([control, workers])
    assert sum(r.startswith("aws instance ") for r in removed) == 2
    assert {r.split()[1] for r in removed} >= {"instance", "security-group", "key-pair", "internet-gateway",
                                               "subnet", "route-table", "vpc"}
    assert tagged_leftovers(moto, "awst") == []
    assert not [k for k in c.resources if k.startswith("aws/")]
    assert len(instances(ec2_client(moto), "keep")) == 1 and tagged_leftovers(moto, "keep")


def test_capacity_error_moves_to_another_zone(moto: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    refused: set[str] = set()

    def decide(action: str, form: dict[str, str]) -> tuple[int, str] | None:
        # The first zone's subnet cannot take this instance type (moto never says so itself).
        subnet = form.get("NetworkInterface.1.SubnetId", "")
        if action == "RunInstances" and (not refused or subnet in refused):
            refused.add(subnet)
            return 400, "Unsupported"
        return None

    c = Ctx(tmp_path)
    with fault_proxy(moto, decide, monkeypatch) as proxy:
        workers = pool()
        nodes = c.provider().create_nodes(workers, requests_for("awst", workers, range(1, 3)))
    assert proxy.injected == ["RunInstances:Unsupported"]
    assert {n.extra["zone"] for n in nodes} == {"us-east-1b"}
    assert all(ipaddress.ip_address(n.private_address) in ipaddress.ip_network("10.214.17.0/24") for n in nodes)
    assert f"aws/subnet/{REGION}/us-east-1b" in c.resources

    # A subnet the user gave has no other zone to go to: one clear error.
    subnet = c.resources[f"aws/subnet/{REGION}/us-east-1a"]["id"]
    with fault_proxy(moto, lambda a, f: (400, "InsufficientInstanceCapacity") if a == "RunInstances" else None,
                     monkeypatch):
        given = pool("given", 1, subnet=subnet)
        with pytest.raises(ProviderError, match="no capacity for 1 x t3.small") as err:
            Ctx(tmp_path, name="awsg", cluster_id="g1").provider().create_nodes(given, requests_for("awsg", given, [1]))
    assert "us-east-1a: InsufficientInstanceCapacity" in err.value.message and err.value.hint


def test_throttling_is_retried(moto: str, strict: StrictEc2, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              ) -> None:
    """RequestLimitExceeded (HTTP 503) on every 10th call and on the first launch: botocore's adaptive
    retry mode rides it out, and no launch is doubled."""
    seen = {"n": 0, "launch": 0}
    lock = threading.Lock()

    def decide(action: str, form: dict[str, str]) -> tuple[int, str] | None:
        with lock:
            seen["n"] += 1
            if action == "RunInstances":
                seen["launch"] += 1
                if seen["launch"] == 1:
                    return 503, "RequestLimitExceeded"
            return (503, "RequestLimitExceeded") if seen["n"] % 10 == 0 else None

    c = Ctx(tmp_path)
    with fault_proxy(moto, decide, monkeypatch) as proxy:
        p = c.provider()
        workers = pool(count=10)
        nodes = p.create_nodes(workers, requests_for("awst", workers, range(1, 11)))
        removed = p.sweep([workers])
    assert len(nodes) == 10 and len({n.provider_ids["instance"] for n in nodes}) == 10
    assert "RunInstances:RequestLimitExceeded" in proxy.injected and len(proxy.injected) >= 3
    # One launch reached EC2 (besides launches refused as NotFound right after the key/group were made).
    assert proxy.forwarded.count("RunInstances") == 1 + sum(r.startswith("RunInstances:") for r in strict.refused)
    assert "aws vpc" in " ".join(removed) and tagged_leftovers(moto, "awst") == []


def test_missing_credentials_or_region_is_one_clear_line(moto: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ProviderError) as err:
        Ctx(tmp_path).provider().create_nodes(pool(), requests_for("awst", pool(), [1]))
    assert err.value.message == "no AWS credentials found" and "AWS_ACCESS_KEY_ID" in (err.value.hint or "")

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    no_region = PoolSpec(name="w", role="worker", count=1, provider="aws", aws={})
    with pytest.raises(ProviderError) as err:
        Ctx(tmp_path).provider().create_nodes(no_region, requests_for("awst", no_region, [1]))
    assert err.value.message == "no AWS region for an aws pool" and "AWS_REGION" in (err.value.hint or "")

    # Through the CLI: one line and a hint, exit 1, no traceback.
    spec = tmp_path / "c.yaml"
    spec.write_text(cluster_spec("awsnc", 1, 0))
    cli = Dcx(tmp_path / "home")
    cli.env.update(aws_env(moto))
    del cli.env["AWS_SECRET_ACCESS_KEY"]
    r = cli.run("cluster", "create", "-f", str(spec), "--provision-only", timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "error: incomplete AWS credentials: " in r.stderr and "missing: AWS_SECRET_ACCESS_KEY" in r.stderr
    assert "hint: set AWS_ACCESS_KEY_ID" in r.stderr and "Traceback" not in r.stderr and "internal" not in r.stderr
    del cli.env["AWS_ACCESS_KEY_ID"]
    r = cli.run("cluster", "create", "-f", str(spec), "--provision-only", timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: no AWS credentials found\nhint: "), r.stderr
    cli.env.update(aws_env(moto))
    del cli.env["AWS_DEFAULT_REGION"]
    spec.write_text(cluster_spec("awsnc", 1, 0).replace(f"region: {REGION}, ", ""))
    r = cli.run("cluster", "create", "-f", str(spec), "--provision-only", timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: no AWS region for an aws pool\nhint: "), r.stderr


# --- through the CLI ------------------------------------------------------------------------------------


def cluster_spec(name: str, control: int, workers: int, user: str = "ubuntu", subnet: str = SUBNET_CIDR) -> str:
    aws = (f"{{region: {REGION}, vpcCIDR: {VPC_CIDR}, subnetCIDR: {subnet}, sshAddress: private, "
           "publicIP: false, instanceType: t3.micro}")
    lines = ["apiVersion: dcx/v1", "kind: Cluster", f"metadata: {{name: {name}}}", "spec:",
             "  engine: {type: swarm}", f"  ssh: {{user: {user}}}", f"  network: {{sshCIDR: {VPC_CIDR}}}", "  pools:",
             f"    - {{name: control, role: control, count: {control}, provider: aws, aws: {aws}}}"]
    if workers:
        lines.append(f"    - {{name: workers, role: worker, count: {workers}, provider: aws, aws: {aws}}}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def aws_cli(moto: str, tmp_path: Path) -> Iterator[tuple[Dcx, list[str]]]:
    """The real CLI with its own home and moto's environment; whatever a test leaves is destroyed."""
    cli = Dcx(tmp_path / "dcx-home")
    cli.env.update(aws_env(moto))
    with clusters_destroyed_after(cli) as clusters:
        yield cli, clusters


def test_cli_provision_rerun_and_destroy_without_state(aws_cli: tuple[Dcx, list[str]], moto: str,
                                                       tmp_path: Path) -> None:
    cli, clusters = aws_cli
    clusters.append("awscli")
    spec = tmp_path / "cluster.yaml"
    spec.write_text(cluster_spec("awscli", 1, 2))
    cli.run("cluster", "create", "-f", str(spec), "--provision-only", check=True)
    ec2 = ec2_client(moto)
    made = sorted(i["InstanceId"] for i in instances(ec2, "awscli"))
    state = cli.state("awscli")
    assert len(made) == 3 and sorted(state["nodes"]) == ["awscli-control-1", "awscli-workers-1", "awscli-workers-2"]
    assert all(tags(i)["dcx:cluster-id"] == state["id"] for i in instances(ec2, "awscli"))

    cli.run("cluster", "create", "-f", str(spec), "--provision-only", check=True)
    assert sorted(i["InstanceId"] for i in instances(ec2, "awscli")) == made

    # The state directory is lost: destroy -f sweeps by the cluster's name in the spec's regions.
    shutil.rmtree(cli.home / "clusters" / "awscli")
    r = cli.run("cluster", "destroy", "-f", str(spec), "--yes", check=True)
    assert tagged_leftovers(moto, "awscli") == [], r.stdout
    assert {i["State"]["Name"] for i in ec2.describe_instances(InstanceIds=made)["Reservations"][0]["Instances"]} \
        == {"terminated"}


def test_cli_1000_nodes_provision_only(aws_cli: tuple[Dcx, list[str]], moto: str, tmp_path: Path) -> None:
    cli, clusters = aws_cli
    clusters.append("awsbig")
    spec = tmp_path / "cluster.yaml"
    # 1000 addresses need a /22 (moto hands out a subnet's addresses like EC2: 5 reserved).
    spec.write_text(cluster_spec("awsbig", 1, 999, subnet="10.214.20.0/22"))
    cli.run("cluster", "create", "-f", str(spec), "--provision-only", check=True, timeout=600)
    state = cli.state("awsbig")
    assert len(state["nodes"]) == 1000 and state["status"] == "provisioned"
    found = instances(ec2_client(moto), "awsbig")
    assert len(found) == 1000
    assert len({i["PrivateIpAddress"] for i in found}) == 1000
    assert {n["ssh_address"] for n in state["nodes"].values()} == {i["PrivateIpAddress"] for i in found}
    cli.run("cluster", "destroy", "awsbig", "--yes", check=True, timeout=600)
    assert tagged_leftovers(moto, "awsbig") == []


# --- boot simulation: moto's instances become namespace hosts -> a real swarm ----------------------------


class Booter:
    """Watches moto: a running instance in the test subnet boots as a namespace host with the key from
    its user-data; a terminated one halts."""

    def __init__(self, moto: str, sim: Any, login_user: str) -> None:
        self.ec2 = ec2_client(moto)
        self.sim = sim
        self.login_user = login_user
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception as exc:  # recorded for the test to show; the watcher keeps going
                self.errors.append(repr(exc))
            self._stop.wait(0.3)

    def poll(self) -> None:
        subnet = ipaddress.ip_network(SUBNET_CIDR)
        for page in self.ec2.get_paginator("describe_instances").paginate():
            for r in page["Reservations"]:
                for inst in r["Instances"]:
                    iid, state, ip = inst["InstanceId"], inst["State"]["Name"], inst.get("PrivateIpAddress")
                    if state == "running" and ip and ipaddress.ip_address(ip) in subnet and iid not in self.sim.hosts:
                        data = self.ec2.describe_instance_attribute(InstanceId=iid, Attribute="userData")
                        user_data = base64.b64decode(data["UserData"]["Value"]).decode()
                        from tests.testbed.boot import authorized_key_from_user_data

                        # EC2 names the guest after its private address; cloud-init makes the login user.
                        self.sim.boot(iid, ip, authorized_key_from_user_data(user_data),
                                      hostname=f"ip-{ip.replace('.', '-')}", login_user=self.login_user)
                    elif state in ("shutting-down", "terminated") and iid in self.sim.hosts:
                        self.sim.halt(iid)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


@pytest.mark.e2e
@pytest.mark.namespace_hosts
def test_boot_simulation_to_a_ready_swarm(aws_cli: tuple[Dcx, list[str]], moto: str, tmp_path: Path) -> None:
    skip_without_namespace_nodes()
    from tests.testbed.boot import BootSimulator

    cli, clusters = aws_cli
    name = "awsboot"
    clusters.append(name)
    spec = tmp_path / "cluster.yaml"
    spec.write_text(cluster_spec(name, 1, 2))
    with BootSimulator(SUBNET_CIDR, tag="aws") as sim:
        booter = Booter(moto, sim, "ubuntu")
        try:
            r = cli.run("cluster", "create", "-f", str(spec), timeout=900)
            assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\nwatcher: {booter.errors}"
            status = cli.json("cluster", "status", name)
            assert status["healthy"] is True and status["engine"] == "swarm"
            assert sorted(n["name"] for n in status["nodes"]) == [f"{name}-control-1", f"{name}-workers-1",
                                                                  f"{name}-workers-2"]
            assert all(n["ready"] for n in status["nodes"]), status
            made = {i["InstanceId"]: i["PrivateIpAddress"] for i in instances(ec2_client(moto), name)}
            assert sorted(sim.hosts) == sorted(made)
            assert {n["address"] for n in status["nodes"]} == set(made.values())
            # EC2's ip-10-214-16-x names become the node names (they repeat across regions otherwise).
            swarm_names = cli.run("node", "ssh", name, f"{name}-control-1", "--",
                                  "sudo docker node ls --format '{{.Hostname}}'", check=True).stdout.split()
            assert sorted(swarm_names) == sorted(n["name"] for n in status["nodes"])

            # Scale down: the worker leaves the swarm, then its instance is terminated (and halts).
            spec.write_text(cluster_spec(name, 1, 1))
            r = cli.run("cluster", "create", "-f", str(spec), timeout=600)
            assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
            left = {i["InstanceId"] for i in instances(ec2_client(moto), name)}
            assert left < set(made) and len(left) == 2
            status = cli.json("cluster", "status", name)
            assert sorted(n["name"] for n in status["nodes"]) == [f"{name}-control-1", f"{name}-workers-1"]
            assert status["healthy"] is True
            wait_for(lambda: sorted(sim.hosts) == sorted(left), 60, "the removed worker's machine to halt")

            cli.run("cluster", "destroy", name, "--yes", check=True, timeout=300)
            assert instances(ec2_client(moto), name) == []
            wait_for(lambda: not sim.hosts, 60, "the simulated machines to halt after termination")
            assert tagged_leftovers(moto, name) == []
            assert not (cli.home / "clusters" / name).exists()
        finally:
            booter.close()


def test_import_does_not_load_boto3() -> None:
    import subprocess
    import sys

    code = "import sys, dcx.providers.aws; print(sorted(m for m in ('boto3', 'botocore') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert json.loads(r.stdout.replace("'", '"')) == []


# --- the strict layer, and the defects it catches ------------------------------------------------------


def client_error(call: Callable[[], Any]) -> str:
    """The EC2 error code a call answers ('' when it succeeds)."""
    try:
        call()
    except Exception as exc:
        return str(getattr(exc, "response", {}).get("Error", {}).get("Code", repr(exc)))
    return ""


def test_strict_layer_enforces_the_reference(moto: str) -> None:
    """Each rule of tests/fakes/aws_strict.py, briefly: refused when broken, accepted at its limit."""
    ec2 = ec2_client(moto)
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    # Eventual consistency: the first call naming the new VPC does not know it, the next does.
    assert client_error(lambda: ec2.describe_vpcs(VpcIds=[vpc])) == "InvalidVpcID.NotFound"
    assert client_error(lambda: ec2.describe_vpcs(VpcIds=[vpc])) == ""
    assert client_error(lambda: ec2.create_security_group(GroupName="g'", Description="d", VpcId=vpc)) \
        == "InvalidParameterValue"
    assert client_error(lambda: ec2.create_security_group(GroupName="g", Description="x" * 256, VpcId=vpc)) \
        == "InvalidParameterValue"
    sg = ec2.create_security_group(GroupName="g", Description="ok ._-:/()#,@[]+=&;{}!$*" + "x" * 231,
                                   VpcId=vpc)["GroupId"]
    assert client_error(lambda: ec2.describe_security_groups(GroupIds=[sg])) == "InvalidGroup.NotFound"

    def rule(cidrs: list[str], desc: str = "fine") -> str:
        return client_error(lambda: ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
             "IpRanges": [{"CidrIp": c, "Description": desc} for c in cidrs]}]))

    assert rule(["192.0.2.1/32"], "the cluster's nodes") == "InvalidParameterValue"
    assert rule([f"10.1.0.{i}/32" for i in range(60)]) == ""  # 60 inbound IPv4 rules: the quota
    assert rule(["10.1.1.1/32"]) == "RulesPerSecurityGroupLimitExceeded"
    tag = {"ResourceType": "vpc", "Tags": [{"Key": "aws:x", "Value": "v"}]}
    assert client_error(lambda: ec2.create_vpc(CidrBlock="10.8.0.0/16", TagSpecifications=[tag])) \
        == "InvalidParameterValue"
    tag["Tags"] = [{"Key": "k" * 128, "Value": "v" * 257}]
    assert client_error(lambda: ec2.create_vpc(CidrBlock="10.8.0.0/16", TagSpecifications=[tag])) \
        == "InvalidParameterValue"
    tag["Tags"] = [{"Key": "k" * 128, "Value": "v' \u00e9" * 64}]  # at the limits; any characters
    assert client_error(lambda: ec2.create_vpc(CidrBlock="10.8.0.0/16", TagSpecifications=[tag])) == ""
    # A referenced prefix list weighs its MaxEntries against the quota (a fresh group: 59 + 2 > 60).
    sg2 = ec2.create_security_group(GroupName="g2", Description="d", VpcId=vpc)["GroupId"]
    pl = ec2.create_managed_prefix_list(PrefixListName="p", MaxEntries=2, AddressFamily="IPv4")["PrefixList"]
    client_error(lambda: ec2.describe_security_groups(GroupIds=[sg2]))  # their eventual-consistency misses
    client_error(lambda: ec2.describe_managed_prefix_lists(PrefixListIds=[pl["PrefixListId"]]))
    ec2.authorize_security_group_ingress(GroupId=sg2, IpPermissions=[{"IpProtocol": "udp", "FromPort": 1, "ToPort": 1,
                                         "IpRanges": [{"CidrIp": f"10.2.0.{i}/32"} for i in range(59)]}])
    assert client_error(lambda: ec2.authorize_security_group_ingress(GroupId=sg2, IpPermissions=[
        {"IpProtocol": "udp", "FromPort": 2, "ToPort": 2, "PrefixListIds": [{"PrefixListId": pl["PrefixListId"]}]}])) \
        == "RulesPerSecurityGroupLimitExceeded"
    # ClientToken: a repeat replays the first reservation, even after termination; changed -> mismatch.
    image = ec2.describe_images(Owners=[CANONICAL])["Images"][0]["ImageId"]
    first = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, ClientToken="t-1")["Instances"][0]["InstanceId"]
    ec2.terminate_instances(InstanceIds=[first])
    assert ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, ClientToken="t-1")["Instances"][0]["InstanceId"] \
        == first
    assert client_error(lambda: ec2.run_instances(ImageId=image, MinCount=2, MaxCount=2, ClientToken="t-1")) \
        == "IdempotentParameterMismatch"
    assert client_error(lambda: ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, ClientToken="t" * 65)) \
        == "InvalidParameterValue"


def test_vpc_found_on_rerun_gets_its_unfinished_steps(moto: str, moto_url: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that fails right after making the VPC: the next run finds the VPC and still enables its
    DNS hostnames (before: a found VPC was taken as finished)."""
    def fail_once(action: str, form: dict[str, str]) -> tuple[int, str] | None:
        return (400, "UnauthorizedOperation") if action == "ModifyVpcAttribute" and not proxy.injected else None

    c = Ctx(tmp_path)
    workers = pool(count=1)
    with fault_proxy(moto, fail_once, monkeypatch) as proxy, pytest.raises(ProviderError, match="DNS hostnames"):
        c.provider().create_nodes(workers, requests_for("awst", workers, [1]))
    vpc = c.resources[f"aws/vpc/{REGION}"]["id"]
    ec2 = ec2_client(moto_url)  # moto itself: the test's look-ups are not dcx's calls
    assert not ec2.describe_vpc_attribute(VpcId=vpc, Attribute="enableDnsHostnames")["EnableDnsHostnames"]["Value"]
    nodes = c.provider().create_nodes(workers, requests_for("awst", workers, [1]))
    assert nodes[0].network == f"aws:{vpc}"
    assert ec2.describe_vpc_attribute(VpcId=vpc, Attribute="enableDnsHostnames")["EnableDnsHostnames"]["Value"]
    # Finished and journaled: a third run asks nothing more of the VPC.
    p = c.provider()
    calls = count_calls(p)
    p.create_nodes(workers, requests_for("awst", workers, [1]))
    assert "DescribeVpcAttribute" not in calls and "ModifyVpcAttribute" not in calls


def test_nodes_made_again_get_new_instances(moto: str, tmp_path: Path) -> None:
    """Scale 2 -> 1 -> 2 -> 1 -> 2, then 0 -> 2: every node made again is a new instance (EC2 keeps a
    ClientToken after its instances are terminated and would answer with the old reservation)."""
    c = Ctx(tmp_path)
    workers = pool(count=2)
    p = c.provider()
    nodes = p.create_nodes(workers, requests_for("awst", workers, [1, 2]))
    seen = {n.provider_ids["instance"] for n in nodes}
    for _ in range(2):
        p.delete_nodes([workers], [nodes[1]])
        nodes = c.provider().create_nodes(workers, requests_for("awst", workers, [1, 2]))
        assert nodes[1].provider_ids["instance"] not in seen and nodes[1].extra["state"] == "running"
        seen.add(nodes[1].provider_ids["instance"])
    p.delete_nodes([workers], nodes)
    nodes = c.provider().create_nodes(workers, requests_for("awst", workers, [1, 2]))
    assert not {n.provider_ids["instance"] for n in nodes} & seen
    assert len(instances(ec2_client(moto), "awst")) == 2


def test_sweep_rides_out_pending_instances_and_gateway_dependencies(moto: str, strict: StrictEc2,
                                                                    tmp_path: Path) -> None:
    """An instance a killed run launched (still shown pending right after its termination) and a
    gateway EC2 will not detach while the VPC's instances release their addresses: the sweep waits
    for both, and leaves nothing."""
    c = Ctx(tmp_path)
    workers = pool(count=1)
    p = c.provider()
    p.create_nodes(workers, requests_for("awst", workers, [1]))
    ec2 = ec2_client(moto)
    image = p.image_of(REGION, p.settings(workers))[0]
    subnet = c.resources[f"aws/subnet/{REGION}/us-east-1a"]["id"]
    ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, SubnetId=subnet, TagSpecifications=[
        {"ResourceType": "instance", "Tags": [{"Key": "dcx:cluster", "Value": "awst"},
                                              {"Key": "dcx:cluster-id", "Value": "c0ffee01"}]}])
    removed = c.provider().sweep([workers])
    assert sum(r.startswith("aws instance ") for r in removed) == 2
    assert "DetachInternetGateway:DependencyViolation" in strict.refused
    assert tagged_leftovers(moto, "awst") == []


def test_k3s_api_port_opened_to_api_cidr(moto: str, tmp_path: Path) -> None:
    """engine k3s: 6443 from spec.network.apiCIDR (default sshCIDR), for the kubeconfig dcx writes."""
    from dcx import spec as spec_mod

    path = tmp_path / "k.yaml"
    path.write_text(cluster_spec("awsk", 1, 0).replace("type: swarm", "type: k3s"))
    c = Ctx(tmp_path, name="awsk")
    c.ctx.spec = spec_mod.load(path)
    c.ctx.network = c.ctx.spec.spec.network
    control = pool("control", 1, "control")
    c.provider().create_nodes(control, requests_for("awsk", control, [1]))
    ec2 = ec2_client(moto)

    def api_sources() -> list[str]:
        (sg,) = ec2.describe_security_groups(
            Filters=[{"Name": "tag:dcx:cluster", "Values": ["awsk"]}])["SecurityGroups"]
        return sorted(r["CidrIp"] for p in sg["IpPermissions"] if p.get("FromPort") == 6443 for r in p["IpRanges"])

    assert api_sources() == [VPC_CIDR]
    path.write_text(path.read_text().replace(f"sshCIDR: {VPC_CIDR}", f"sshCIDR: {VPC_CIDR}, apiCIDR: 198.51.100.0/24"))
    c2 = Ctx(tmp_path, name="awsk")
    c2.ctx.spec = spec_mod.load(path)
    c2.ctx.network = c2.ctx.spec.spec.network
    c2.provider().create_nodes(control, requests_for("awsk", control, [1]))
    assert api_sources() == ["198.51.100.0/24"]


def two_region_spec(name: str, east: int) -> str:
    def aws(region: str, subnet: str) -> str:
        return (f"{{region: {region}, vpcCIDR: {VPC_CIDR}, subnetCIDR: {subnet}, sshAddress: private, "
                "publicIP: true, instanceType: t3.micro}")

    return "\n".join([
        "apiVersion: dcx/v1", "kind: Cluster", f"metadata: {{name: {name}}}", "spec:", "  engine: {type: swarm}",
        "  ssh: {user: ubuntu}", f"  network: {{sshCIDR: {VPC_CIDR}}}", "  pools:",
        f"    - {{name: control, role: control, count: 1, provider: aws, aws: {aws('us-west-2', SUBNET_CIDR)}}}",
        f"    - {{name: east, role: worker, count: {east}, provider: aws, aws: {aws(REGION, SUBNET_CIDR)}}}"]) + "\n"


def test_cli_two_regions_beyond_the_rule_quota(aws_cli: tuple[Dcx, list[str]], moto: str, strict: StrictEc2,
                                               tmp_path: Path) -> None:
    """72 nodes in us-east-1 and one in us-west-2: each group's mesh peers outgrow its 60-rule quota,
    so the mesh port (only it) opens to all; SSH stays on sshCIDR; nothing else is open to 0.0.0.0/0."""
    cli, clusters = aws_cli
    clusters.append("aws2r")
    spec = tmp_path / "cluster.yaml"
    spec.write_text(two_region_spec("aws2r", 72))
    cli.run("cluster", "create", "-f", str(spec), "--provision-only", check=True, timeout=600)
    state = cli.state("aws2r")
    assert len(state["nodes"]) == 73 and state["status"] == "provisioned"
    assert "AuthorizeSecurityGroupIngress:RulesPerSecurityGroupLimitExceeded" in strict.refused
    for region in (REGION, "us-west-2"):
        (sg,) = ec2_client(moto, region).describe_security_groups(
            Filters=[{"Name": "tag:dcx:cluster", "Values": ["aws2r"]}])["SecurityGroups"]
        world = [(p["IpProtocol"], p.get("FromPort")) for p in sg["IpPermissions"]
                 for r in p.get("IpRanges") or [] if r["CidrIp"] == "0.0.0.0/0"]
        assert world == [("udp", 51820)], region
        ssh = sorted(r["CidrIp"] for p in sg["IpPermissions"] if p.get("FromPort") == 22 for r in p["IpRanges"])
        assert ssh == [VPC_CIDR]
    # Fewer peers again (the east pool shrinks): the port narrows back to their /32s.
    spec.write_text(two_region_spec("aws2r", 2))
    cli.run("cluster", "create", "-f", str(spec), "--provision-only", check=True, timeout=600)
    (sg,) = ec2_client(moto, "us-west-2").describe_security_groups(
        Filters=[{"Name": "tag:dcx:cluster", "Values": ["aws2r"]}])["SecurityGroups"]
    mesh = sorted(r["CidrIp"] for p in sg["IpPermissions"] if p.get("FromPort") == 51820 for r in p["IpRanges"])
    assert len(mesh) == 3 and "0.0.0.0/0" not in mesh


def test_cli_destroy_without_state_chooses_by_id(aws_cli: tuple[Dcx, list[str]], moto: str, tmp_path: Path) -> None:
    """Two clusters of one name in one account (two homes). With one home's state gone, `destroy -f`
    lists both and removes nothing; with --cluster-id it removes that one only."""
    cli, clusters = aws_cli
    clusters.append("awsdup")
    other = Dcx(tmp_path / "home-b")
    other.env.update(aws_env(moto))
    spec = tmp_path / "cluster.yaml"
    spec.write_text(cluster_spec("awsdup", 1, 0))
    with clusters_destroyed_after(other) as others:
        others.append("awsdup")
        cli.run("cluster", "create", "-f", str(spec), "--provision-only", check=True)
        other.run("cluster", "create", "-f", str(spec), "--provision-only", check=True)
        mine, theirs = cli.state("awsdup")["id"], other.state("awsdup")["id"]
        theirs_before = tagged_leftovers(moto, theirs, "dcx:cluster-id")
        assert mine != theirs and theirs_before
        # With its state, a home destroys its own cluster only: another id is refused.
        r = cli.run("cluster", "destroy", "-f", str(spec), "--yes", "--cluster-id", theirs)
        assert r.returncode == 2 and f"is cluster {mine}, not {theirs}" in r.stderr, r.stderr
        shutil.rmtree(cli.home / "clusters" / "awsdup")

        r = cli.run("cluster", "destroy", "-f", str(spec), "--yes")
        assert r.returncode == 2, r.stdout + r.stderr
        assert "2 clusters named 'awsdup'" in r.stderr and "--cluster-id" in r.stderr and "Traceback" not in r.stderr
        rows = [line.split() for line in r.stdout.splitlines()[1:]]
        assert sorted(row[0] for row in rows) == sorted([mine, theirs])
        assert all(row[2].startswith("arn:aws:") and row[3:] == ["aws", REGION] for row in rows), r.stdout
        assert tagged_leftovers(moto, mine, "dcx:cluster-id") and tagged_leftovers(moto, theirs, "dcx:cluster-id") \
            == theirs_before
        r = cli.run("cluster", "destroy", "-f", str(spec), "--yes", "-o", "json")
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 2, r.stderr  # the line and its hint
        listed = json.loads(r.stdout)["clusters"]
        assert sorted(c["id"] for c in listed) == sorted([mine, theirs]) and all(c["created"] for c in listed)

        r = cli.run("cluster", "destroy", "-f", str(spec), "--yes", "--cluster-id", mine, check=True)
        assert tagged_leftovers(moto, mine, "dcx:cluster-id") == []
        assert tagged_leftovers(moto, theirs, "dcx:cluster-id") == theirs_before
        assert len(instances(ec2_client(moto), theirs, key="dcx:cluster-id")) == 1
        # Only theirs is left: found by its tags, destroyed by its id; then nothing of the name remains.
        r = cli.run("cluster", "destroy", "-f", str(spec), "--yes", check=True)
        assert tagged_leftovers(moto, "awsdup") == []
        r = cli.run("cluster", "destroy", "-f", str(spec), "--yes", check=True)
        assert "nothing named awsdup was found (0 resources removed)" in r.stdout
