"""The Compute REST fake answers the real google-cloud-compute client as the real API would: what it
rejects, how operations progress, request-id idempotency, paging and filters, injected failures."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.gce import GceFake, parse_filter

P, Z, R = "dcx-test", "us-central1-a", "us-central1"


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[GceFake]:
    with GceFake() as f:
        f.credentials_file(tmp_path / "sa.json")
        yield f


@pytest.fixture
def clients(fake: GceFake, tmp_path: Path) -> dict[str, Any]:
    from google.cloud import compute_v1
    from google.oauth2 import service_account

    creds = service_account.Credentials.from_service_account_file(
        str(tmp_path / "sa.json"), scopes=["https://www.googleapis.com/auth/compute"])
    opts = {"api_endpoint": fake.url}
    names = ("InstancesClient", "NetworksClient", "SubnetworksClient", "FirewallsClient", "ZoneOperationsClient",
             "GlobalOperationsClient", "RegionOperationsClient")
    return {n: getattr(compute_v1, n)(credentials=creds, client_options=opts) for n in names}


def network(fake: GceFake) -> None:
    fake.add_network(P, "net", {"sub": (R, "10.214.32.0/24")})


def props(**over: Any) -> Any:
    from google.cloud import compute_v1

    base = dict(
        machine_type="e2-small", labels={"dcx-cluster": "c"},
        disks=[compute_v1.AttachedDisk(boot=True, initialize_params=compute_v1.AttachedDiskInitializeParams(
            source_image="projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64", disk_size_gb=20))],
        network_interfaces=[compute_v1.NetworkInterface(network="global/networks/net",
                                                        subnetwork=f"regions/{R}/subnetworks/sub")])
    base.update(over)
    return compute_v1.InstanceProperties(**base)


def instance(name: str, **over: Any) -> Any:
    from google.cloud import compute_v1

    p = props(**over)
    return compute_v1.Instance(name=name, machine_type=f"zones/{Z}/machineTypes/{p.machine_type}", labels=p.labels,
                               disks=p.disks, network_interfaces=p.network_interfaces)


def test_rejects_what_the_api_rejects(fake: GceFake, clients: dict[str, Any]) -> None:
    from google.api_core import exceptions as gexc
    from google.cloud import compute_v1

    network(fake)
    inst = clients["InstancesClient"]
    for bad in (instance(""), instance("Bad_Name"), instance("ok", labels={"team": "Infra"}),
                instance("ok", labels={"9key": "v"})):
        with pytest.raises(gexc.BadRequest):
            inst.insert_unary(project=P, zone=Z, instance_resource=bad)
    with pytest.raises(gexc.BadRequest):
        inst.insert_unary(project=P, zone="uscentral1", instance_resource=instance("ok"))
    with pytest.raises(gexc.NotFound):
        inst.insert_unary(project="no-such-project", zone=Z, instance_resource=instance("ok"))
    # bulkInsert takes machine type names only; preemptible needs TERMINATE on maintenance.
    for p in (props(machine_type=f"zones/{Z}/machineTypes/e2-small"),
              props(scheduling=compute_v1.Scheduling(preemptible=True))):
        with pytest.raises(gexc.BadRequest):
            inst.bulk_insert_unary(project=P, zone=Z, bulk_insert_instance_resource_resource=compute_v1.
                                   BulkInsertInstanceResource(count=1, instance_properties=p,
                                                              per_instance_properties={"a": {"name": "a"}}))
    with pytest.raises(gexc.BadRequest):  # a request id must be a UUID
        inst.insert_unary(request=compute_v1.InsertInstanceRequest(project=P, zone=Z, request_id="not-a-uuid",
                                                                   instance_resource=instance("ok")))
    with pytest.raises(gexc.Conflict):
        clients["NetworksClient"].insert_unary(project=P, network_resource=compute_v1.Network(
            name="net", auto_create_subnetworks=False))
    # A network still used by a subnetwork (or firewall) cannot go.
    with pytest.raises(gexc.BadRequest) as err:
        clients["NetworksClient"].delete_unary(project=P, network="net")
    assert "already being used" in err.value.message
    assert err.value.errors[0]["reason"] == "resourceInUseByAnotherResource"
    assert fake.all_resources()["instances"] == []


def test_tokens_signed_by_another_key_are_refused(fake: GceFake, tmp_path: Path) -> None:
    from google.api_core import exceptions as gexc
    from google.cloud import compute_v1
    from google.oauth2 import service_account

    stranger = GceFake()  # only for its key: never started
    try:
        stranger.credentials_file(tmp_path / "other.json")
    finally:
        stranger.server.server_close()
    creds = service_account.Credentials.from_service_account_file(
        str(tmp_path / "other.json"), scopes=["https://www.googleapis.com/auth/compute"])
    client = compute_v1.InstancesClient(credentials=creds, client_options={"api_endpoint": fake.url})
    with pytest.raises(gexc.Unauthorized):
        client.get(project=P, zone=Z, instance="x")


def test_operations_request_ids_and_bulk_insert(fake: GceFake, clients: dict[str, Any]) -> None:
    from google.cloud import compute_v1

    network(fake)
    inst, zops = clients["InstancesClient"], clients["ZoneOperationsClient"]
    rid = str(uuid.uuid4())
    body = compute_v1.BulkInsertInstanceResource(count=2, min_count=2, instance_properties=props(),
                                                 per_instance_properties={"a-1": {"name": "a-1"}, "a-2": {}})
    request = compute_v1.BulkInsertInstanceRequest(project=P, zone=Z, request_id=rid,
                                                   bulk_insert_instance_resource_resource=body)
    op = inst.bulk_insert_unary(request=request)
    assert op.status == compute_v1.Operation.Status.RUNNING
    again = inst.bulk_insert_unary(request=request)  # the same request id: the same operation
    assert again.name == op.name
    done = zops.wait(project=P, zone=Z, operation=op.name)
    assert done.status == compute_v1.Operation.Status.DONE and not done.error.errors
    assert [i.status for i in inst.list(project=P, zone=Z)] == ["RUNNING", "RUNNING"]
    ips = {i.network_interfaces[0].network_i_p for i in inst.list(project=P, zone=Z)}
    assert ips == {"10.214.32.2", "10.214.32.3"}  # .1 is the gateway's
    # A new request for names that exist: the operation fails with ALREADY_EXISTS and makes nothing.
    request.request_id = str(uuid.uuid4())
    op = inst.bulk_insert_unary(request=request)
    done = zops.wait(project=P, zone=Z, operation=op.name)
    assert done.error.errors[0].code == "ALREADY_EXISTS"
    assert len(list(inst.list(project=P, zone=Z))) == 2


def test_paging_filters_and_injected_failures(fake: GceFake, clients: dict[str, Any]) -> None:
    from google.api_core import exceptions as gexc
    from google.cloud import compute_v1

    network(fake)
    inst, zops = clients["InstancesClient"], clients["ZoneOperationsClient"]
    for i in range(5):
        op = inst.insert_unary(project=P, zone=Z, instance_resource=instance(
            f"n-{i}", labels={"dcx-cluster": "c" if i < 4 else "d", "dcx-pool": "p"}))
        zops.wait(project=P, zone=Z, operation=op.name)
    fake.reset_counts()
    found = list(inst.list(request=compute_v1.ListInstancesRequest(
        project=P, zone=Z, filter='(labels.dcx-cluster = "c") AND (labels.dcx-pool = "p")', max_results=2)))
    assert [i.name for i in found] == ["n-0", "n-1", "n-2", "n-3"]
    assert fake.count("GET") == 2  # two pages of two
    fake.fail_next(1, 503)
    with pytest.raises(gexc.ServiceUnavailable):
        inst.get(project=P, zone=Z, instance="n-0", retry=None)  # (get retries 503 by default)
    fake.fail_next(1, 429)
    with pytest.raises(gexc.TooManyRequests):
        inst.get(project=P, zone=Z, instance="n-0", retry=None)  # (get retries 503 by default)
    assert inst.get(project=P, zone=Z, instance="n-0").name == "n-0"


def test_filter_language() -> None:
    r = {"name": "dcx-ab-ssh", "labels": {"a": "x", "b": "y"}, "status": "RUNNING"}
    assert parse_filter('name eq "dcx-.*"')(r)
    assert not parse_filter('name eq "dcx"')(r)
    assert parse_filter('labels.a = "x" labels.b = "y"')(r)
    assert not parse_filter('(labels.a = "x") AND (labels.b = "z")')(r)
    assert parse_filter('(labels.a = "z") OR (labels.b = "y")')(r)
    assert parse_filter("labels.a:*")(r) and not parse_filter("labels.c:*")(r)
    assert parse_filter('status != "STOPPING"')(r)
    with pytest.raises(Exception, match="filter"):
        parse_filter("labels.a = (")


def test_boot_disk_types_per_machine_series(fake: GceFake, clients: dict[str, Any]) -> None:
    """The API's default boot disk type (pd-standard) is refused by C3/C3D/H3 and the 4th generation;
    the 4th generation takes Hyperdisk only; a type the series takes is accepted (name or zonal URL)."""
    from google.api_core import exceptions as gexc
    from google.cloud import compute_v1

    network(fake)
    inst = clients["InstancesClient"]

    def boot(machine_type: str, disk_type: str = "") -> Any:
        return props(machine_type=machine_type, disks=[compute_v1.AttachedDisk(
            boot=True, initialize_params=compute_v1.AttachedDiskInitializeParams(
                source_image="projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64",
                disk_size_gb=20, disk_type=disk_type))])

    def bulk(name: str, p: Any) -> Any:
        op = inst.bulk_insert_unary(project=P, zone=Z, bulk_insert_instance_resource_resource=compute_v1.
                                    BulkInsertInstanceResource(count=1, instance_properties=p,
                                                               per_instance_properties={name: {"name": name}}))
        return clients["ZoneOperationsClient"].wait(project=P, zone=Z, operation=op.name)

    for machine_type, disk_type in (("c4-standard-2", ""), ("c4a-standard-1", "pd-balanced"),
                                    ("n4-standard-2", "pd-ssd"), ("c3-standard-4", ""),
                                    ("c3d-standard-4", "pd-standard"), ("e2-small", "hyperdisk-throughput")):
        with pytest.raises(gexc.BadRequest):
            bulk("refused", boot(machine_type, disk_type))
    for i, (machine_type, disk_type) in enumerate((
            ("c4-standard-2", "hyperdisk-balanced"), ("n4a-standard-1", "hyperdisk-balanced"),
            ("c3-standard-4", "pd-balanced"), ("c3-standard-4", f"zones/{Z}/diskTypes/hyperdisk-balanced"),
            ("e2-small", ""), ("e2-small", "pd-standard"))):
        assert not bulk(f"ok-{i}", boot(machine_type, disk_type)).error.errors
    with pytest.raises(gexc.NotFound):
        bulk("nope", boot("e2-small", "pd-nonesuch"))


def test_request_ids_are_kept_sixty_minutes(fake: GceFake, clients: dict[str, Any]) -> None:
    from google.cloud import compute_v1

    network(fake)
    inst, zops = clients["InstancesClient"], clients["ZoneOperationsClient"]
    rid = str(uuid.uuid4())
    request = compute_v1.InsertInstanceRequest(project=P, zone=Z, request_id=rid, instance_resource=instance("a"))
    first = inst.insert_unary(request=request)
    zops.wait(project=P, zone=Z, operation=first.name)
    zops.wait(project=P, zone=Z, operation=inst.delete_unary(project=P, zone=Z, instance="a").name)
    fake.advance(59 * 60)
    # Within the hour the finished operation is replayed: the instance is NOT made again.
    assert inst.insert_unary(request=request).name == first.name
    assert list(inst.list(project=P, zone=Z)) == []
    fake.advance(2 * 60)
    # After it, the id is a new request.
    again = inst.insert_unary(request=request)
    assert again.name != first.name
    zops.wait(project=P, zone=Z, operation=again.name)
    assert [i.name for i in inst.list(project=P, zone=Z)] == ["a"]
