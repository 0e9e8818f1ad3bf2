"""The gcp provider end to end: the real `dcx` CLI and the real google-cloud-compute client against
the local Compute REST fake (tests/fakes/gce.py), authenticated with a service-account key whose
token_uri is the fake's. With namespace hosts available, the fake's instances boot as real
machines (tests/testbed/boot.py) and `dcx cluster create` goes all the way to a Ready swarm."""

from __future__ import annotations

import io
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tests.fakes.gce import GceFake
from tests.testbed.journal import MemoryJournal
from tests.testbed.local import (
    Dcx,
    cloud_cluster_yaml,
    clusters_destroyed_after,
    destroy_without_state_picks_by_id,
    skip_without_namespace_nodes,
    write,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

PROJECT = "dcx-test"
ZONE = "us-central1-a"
SSH_CIDR = "198.51.100.7/32"


def gcp_yaml(name: str, pools: list[str], ssh_cidr: str = SSH_CIDR, extra: str = "", user: str = "root") -> str:
    return cloud_cluster_yaml(name, pools, ssh_cidr, extra, user)


def pool(name: str, role: str, count: int, **gcp: Any) -> str:
    settings = {"project": PROJECT, "zone": ZONE, "subnetCIDR": "10.214.32.0/24", **gcp}
    return json.dumps({"name": name, "role": role, "count": count, "provider": "gcp", "gcp": settings})


@pytest.fixture
def gce(tmp_path: Path) -> Iterator[GceFake]:
    fake = GceFake(projects=(PROJECT, "other-project")).start()
    try:
        fake.credentials_file(tmp_path / "sa.json")
        yield fake
    finally:
        fake.close()


@pytest.fixture
def cli(gce: GceFake, tmp_path: Path) -> Iterator[tuple[Dcx, list[str]]]:
    """The dcx CLI with its own home, pointed at the fake; destroys the test's clusters at the end."""
    dcx = Dcx(tmp_path / "dcx-home")
    dcx.env.update(GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / "sa.json"), DCX_GCP_ENDPOINT=gce.url,
                   NO_GCE_CHECK="True")
    for var in ("GOOGLE_CLOUD_PROJECT", "CLOUDSDK_CORE_PROJECT", "CLOUDSDK_COMPUTE_ZONE"):
        dcx.env.pop(var, None)
    with clusters_destroyed_after(dcx) as clusters:
        yield dcx, clusters


def instances(fake: GceFake, cluster: str) -> dict[str, dict[str, Any]]:
    with fake.lock:
        return {k[2]: v for k, v in fake.instances.items() if v["labels"].get("dcx-cluster") == cluster}


def mutations(fake: GceFake) -> list[tuple[str, str]]:
    with fake.lock:
        return [(m, p) for m, p in fake.requests if m in ("POST", "PATCH", "DELETE") and not p.endswith("/wait")]


def test_create_labels_metadata_firewalls_rerun_and_destroy(gce: GceFake, cli: tuple[Dcx, list[str]],
                                                            tmp_path: Path) -> None:
    dcx, clusters = cli
    name = "gcp-main"
    clusters.append(name)
    spec = write(tmp_path, gcp_yaml(name, [pool("control", "control", 1),
                                           pool("workers", "worker", 2, labels={"team": "infra"})]))
    dcx.run("cluster", "create", "-f", str(spec), "--provision-only", check=True)
    state = dcx.state(name)
    cid = state["id"]
    tag = f"dcx-{cid}"
    public_key = (dcx.home / "clusters" / name / "ssh" / "id_ed25519.pub").read_text().strip()

    made = instances(gce, name)
    assert sorted(made) == [f"{name}-control-1", f"{name}-workers-1", f"{name}-workers-2"]
    for iname, inst in made.items():
        pool_name = iname.split("-")[-2]
        expected = {"dcx-cluster": name, "dcx-cluster-id": cid, "dcx-pool": pool_name,
                    # who made it: the credentials' service account, label-safe
                    "dcx-created-by": f"dcx-test_{PROJECT}_iam_gserviceaccount_com"}
        if pool_name == "workers":
            expected["team"] = "infra"
        created = inst["labels"].pop("dcx-created")
        assert re.fullmatch(r"\d{8}t\d{6}z", created)
        assert inst["labels"] == expected
        assert inst["tags"]["items"] == [tag]
        meta = {i["key"]: i["value"] for i in inst["metadata"]["items"]}
        assert meta["ssh-keys"] == f"root:{public_key}"
        user_data = YAML(typ="safe").load(io.StringIO(meta["user-data"]))
        assert meta["user-data"].startswith("#cloud-config\n")
        assert user_data["users"][1]["ssh_authorized_keys"] == [public_key]
        assert inst["disks"][0]["initializeParams"]["sourceImage"].startswith(
            "projects/ubuntu-os-cloud/global/images/family/ubuntu-")
        assert inst["machineType"].endswith(f"/zones/{ZONE}/machineTypes/e2-small")
        # The state's node: public SSH address (the default), private address, network and ids.
        nic = inst["networkInterfaces"][0]
        node = state["nodes"][iname]
        assert node["ssh_address"] == nic["accessConfigs"][0]["natIP"] == node["public_address"]
        assert node["private_address"] == nic["networkIP"]
        assert node["network"] == f"gcp:{PROJECT}/{tag}"
        assert node["provider_ids"] == {"instance": iname, "zone": ZONE, "project": PROJECT}

    with gce.lock:
        rules = {k[1]: v for k, v in gce.firewalls.items()}
        networks = dict(gce.networks)
        subnets = dict(gce.subnetworks)
    assert sorted(rules) == [f"{tag}-internal", f"{tag}-ssh"]
    ssh = rules[f"{tag}-ssh"]
    assert ssh["sourceRanges"] == [SSH_CIDR] and ssh["targetTags"] == [tag]
    assert ssh["allowed"] == [{"IPProtocol": "tcp", "ports": ["22"]}]
    internal = rules[f"{tag}-internal"]
    assert internal["sourceTags"] == [tag] and internal["targetTags"] == [tag] and "sourceRanges" not in internal
    assert {"IPProtocol": "tcp", "ports": ["2377", "7946"]} in internal["allowed"]
    # No port of the cluster is open to the world.
    assert not [n for n, r in rules.items() if "0.0.0.0/0" in r.get("sourceRanges", [])]
    assert networks[(PROJECT, tag)]["autoCreateSubnetworks"] is False
    assert subnets[(PROJECT, "us-central1", f"{tag}-us-central1")]["ipCidrRange"] == "10.214.32.0/24"

    # A re-run finds everything by labels and names: nothing is created, changed or deleted.
    gce.reset_counts()
    dcx.run("cluster", "create", "-f", str(spec), "--provision-only", check=True)
    assert mutations(gce) == []
    assert sorted(instances(gce, name)) == sorted(made)

    # An edited sshCIDR is applied to the existing rule (and nothing else changes).
    write(tmp_path, gcp_yaml(name, [pool("control", "control", 1),
                                    pool("workers", "worker", 2, labels={"team": "infra"})],
                             ssh_cidr="198.51.100.7/32,192.0.2.0/28"))
    gce.reset_counts()
    dcx.run("cluster", "create", "-f", str(spec), "--provision-only", check=True)
    assert [m for m, _ in mutations(gce)] == ["PATCH"]
    with gce.lock:
        assert gce.firewalls[(PROJECT, f"{tag}-ssh")]["sourceRanges"] == ["192.0.2.0/28", SSH_CIDR]

    r = dcx.run("cluster", "destroy", name, "--yes")
    assert r.returncode == 0, r.stderr
    assert gce.all_resources() == {"instances": [], "firewalls": [], "networks": [], "subnetworks": []}
    assert not (dcx.home / "clusters" / name).exists()


def test_destroy_without_state_sweeps_by_labels_and_names(gce: GceFake, cli: tuple[Dcx, list[str]],
                                                          tmp_path: Path) -> None:
    dcx, clusters = cli
    # Another cluster whose name starts the same, in the same project, and a user's own network.
    gce.add_network(PROJECT, "shared", {"shared-us": ("us-central1", "10.214.40.0/24")})
    clusters += ["sweep", "sweep-b"]
    spec = write(tmp_path, gcp_yaml("sweep", [pool("control", "control", 1),
                                              pool("w", "worker", 2, network="shared", subnetwork="shared-us")]))
    other = write(tmp_path, gcp_yaml("sweep-b", [pool("control", "control", 1, subnetCIDR="10.214.33.0/24")]),
                  "other.yaml")
    dcx.run("cluster", "create", "-f", str(spec), "--provision-only", check=True)
    dcx.run("cluster", "create", "-f", str(other), "--provision-only", check=True)
    other_before = {k: v for k, v in gce.all_resources().items()}
    assert len(instances(gce, "sweep")) == 3 and len(instances(gce, "sweep-b")) == 1

    shutil.rmtree(dcx.home / "clusters" / "sweep")
    r = dcx.run("cluster", "destroy", "-f", str(spec), "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert instances(gce, "sweep") == {}
    left = gce.all_resources()
    other_id = dcx.state("sweep-b")["id"]
    # Only the other cluster's resources and the user's network remain.
    assert left["instances"] == ["sweep-b-control-1"]
    assert left["firewalls"] == [f"dcx-{other_id}-internal", f"dcx-{other_id}-ssh"]
    assert left["networks"] == sorted([f"dcx-{other_id}", "shared"])
    assert left["subnetworks"] == sorted([f"dcx-{other_id}-us-central1", "shared-us"])
    # sweep had ssh, internal and mesh rules in each of its two networks (VPC networks do not reach
    # each other: the mesh joins them): all six went.
    assert len(other_before["firewalls"]) == 2 + 6

    dcx.run("cluster", "destroy", "sweep-b", "--yes", check=True)
    assert gce.all_resources() == {"instances": [], "firewalls": [], "networks": ["shared"],
                                   "subnetworks": ["shared-us"]}


def test_transient_errors_are_retried_without_duplicates(gce: GceFake, cli: tuple[Dcx, list[str]],
                                                         tmp_path: Path) -> None:
    dcx, clusters = cli
    name = "gcp-retry"
    clusters.append(name)
    spec = write(tmp_path, gcp_yaml(name, [pool("control", "control", 1), pool("w", "worker", 3)]))
    gce.fail_next(2, 429, "/instances")  # the first look-ups
    gce.fail_next(1, 503, "/global/networks")
    # The first bulkInsert is done but its answer is lost: the retry (same request id) must not
    # make a second set of instances nor fail on their names.
    gce.fail_next(1, 503, "/bulkInsert", after=True)
    gce.fail_next(1, 429, "/operations/")
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(instances(gce, name)) == [f"{name}-control-1", f"{name}-w-1", f"{name}-w-2", f"{name}-w-3"]
    with gce.lock:
        assert not gce._failures, "every injected failure was met"
    assert gce.count("POST", "/bulkInsert") == 3  # control, w (answer lost), w again
    state = dcx.state(name)
    assert len(state["nodes"]) == 4
    dcx.run("cluster", "destroy", name, "--yes", check=True)
    assert gce.all_resources()["instances"] == []


def test_preempted_instance_is_started_again(gce: GceFake, cli: tuple[Dcx, list[str]], tmp_path: Path) -> None:
    dcx, clusters = cli
    name = "gcp-spot"
    clusters.append(name)
    spec = write(tmp_path, gcp_yaml(name, [pool("control", "control", 1, preemptible=True)]))
    dcx.run("cluster", "create", "-f", str(spec), "--provision-only", check=True)
    node = f"{name}-control-1"
    before = dcx.state(name)["nodes"][node]["ssh_address"]
    gce.preempt(PROJECT, ZONE, node)
    gce.reset_counts()
    dcx.run("cluster", "create", "-f", str(spec), "--provision-only", check=True)
    assert [p.rsplit("/", 1)[1] for _, p in mutations(gce)] == ["start"]
    inst = instances(gce, name)[node]
    assert inst["status"] == "RUNNING"
    after = dcx.state(name)["nodes"][node]["ssh_address"]
    assert after == inst["networkInterfaces"][0]["accessConfigs"][0]["natIP"] and after != before


def test_api_errors_and_bad_input_are_one_line(gce: GceFake, cli: tuple[Dcx, list[str]], tmp_path: Path) -> None:
    dcx, clusters = cli
    clusters += ["gcp-bad"]
    # No sshCIDR: dcx refuses to open SSH to the world (exit 2, says what to set).
    spec = write(tmp_path, gcp_yaml("gcp-bad", [pool("control", "control", 1)], ssh_cidr=""))
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode == 2 and "sshCIDR" in r.stderr and "Traceback" not in r.stderr
    # An invalid label value is located in the file.
    spec = write(tmp_path, gcp_yaml("gcp-bad", [pool("control", "control", 1, labels={"team": "Infra"})]))
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode == 2 and "cluster.yaml:" in r.stderr and "label 'team'" in r.stderr
    # Two regions of the VPC dcx makes with the same subnetwork range: refused before anything is made.
    spec = write(tmp_path, gcp_yaml("gcp-bad", [pool("control", "control", 1),
                                                pool("east", "worker", 1, zone="us-east1-b")]))
    gce.reset_counts()
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode == 2 and "overlapping gcp.subnetCIDR" in r.stderr and mutations(gce) == []
    # A quota error from the API's operation: one line with the API's words and a hint.
    gce.instance_quota = 1
    spec = write(tmp_path, gcp_yaml("gcp-bad", [pool("control", "control", 2)]))
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode == 1 and "QUOTA_EXCEEDED" in r.stderr and "Traceback" not in r.stderr
    assert "quota" in r.stderr.lower().split("hint:")[1]
    # A project that does not exist.
    spec = write(tmp_path, gcp_yaml("gcp-bad", [pool("control", "control", 1, project="nope-project")]))
    r = dcx.run("cluster", "destroy", "-f", str(spec), "--yes")
    assert r.returncode == 1 and "nope-project" in r.stderr and "Traceback" not in r.stderr


def test_missing_credentials_or_project_is_one_clear_line(gce: GceFake, cli: tuple[Dcx, list[str]],
                                                          tmp_path: Path) -> None:
    dcx, _ = cli
    spec = write(tmp_path, gcp_yaml("gcp-nocred", [pool("control", "control", 1)]))
    empty_home = tmp_path / "empty-home"
    empty_home.mkdir()
    dcx.env.pop("GOOGLE_APPLICATION_CREDENTIALS")
    dcx.env.update(HOME=str(empty_home), CLOUDSDK_CONFIG=str(empty_home / "gcloud"))
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode != 0
    assert "no Google credentials" in r.stderr and "gcloud auth application-default login" in r.stderr
    assert "Traceback" not in r.stderr and len([ln for ln in r.stderr.splitlines() if ln.startswith("error")]) == 1

    # Credentials without a project, and no project in the spec or the environment.
    gce.credentials_file(tmp_path / "sa-noproject.json", project="")
    dcx.env["GOOGLE_APPLICATION_CREDENTIALS"] = str(tmp_path / "sa-noproject.json")
    spec = write(tmp_path, gcp_yaml("gcp-nocred", [json.dumps({"name": "c", "role": "control", "count": 1,
                                                               "provider": "gcp", "gcp": {"zone": ZONE}})]))
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode == 2 and "no GCP project" in r.stderr and "GOOGLE_CLOUD_PROJECT" in r.stderr
    # ... which the environment can give.
    dcx.env["GOOGLE_CLOUD_PROJECT"] = PROJECT
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode == 0, r.stderr
    assert "gcp-nocred-c-1" in gce.all_resources()["instances"]
    dcx.run("cluster", "destroy", "gcp-nocred", "--yes", check=True)


def test_hundred_node_pool_provision_only(gce: GceFake, cli: tuple[Dcx, list[str]], tmp_path: Path) -> None:
    dcx, clusters = cli
    name = "gcp-big"
    clusters.append(name)
    spec = write(tmp_path, gcp_yaml(name, [pool("control", "control", 1, subnetCIDR="10.214.36.0/23"),
                                           pool("w", "worker", 100, subnetCIDR="10.214.36.0/23",
                                                sshAddress="private", preemptible=True)]))
    dcx.run("cluster", "create", "-f", str(spec), "--provision-only", check=True, timeout=600)
    made = instances(gce, name)
    assert len(made) == 101
    assert gce.count("POST", "/bulkInsert") == 2  # one per pool
    state = dcx.state(name)
    workers = [n for n in state["nodes"].values() if n["pool"] == "w"]
    assert len(workers) == 100 and len({n["ssh_address"] for n in workers}) == 100
    assert all(n["ssh_address"] == n["private_address"] for n in workers)  # sshAddress: private
    assert all(made[n]["scheduling"]["preemptible"] for n in made if "-w-" in n)
    gce.reset_counts()
    dcx.run("cluster", "destroy", name, "--yes", check=True, timeout=600)
    assert gce.all_resources() == {"instances": [], "firewalls": [], "networks": [], "subnetworks": []}


# --- boot simulation: from the fake's instances to a real swarm ------------------------------------


@pytest.mark.namespace_hosts
def test_boot_simulation_reaches_a_ready_swarm(gce: GceFake, cli: tuple[Dcx, list[str]], tmp_path: Path) -> None:
    skip_without_namespace_nodes()
    from tests.testbed.boot import BootSimulator, authorized_key_from_user_data

    dcx, clusters = cli
    name = "gcp-boot"
    clusters.append(name)
    subnet = "10.214.34.0/24"
    with BootSimulator(subnet, tag="gcp") as sim:
        def on_insert(inst: dict[str, Any]) -> None:
            meta = {i["key"]: i["value"] for i in inst["metadata"]["items"]}
            user = meta["ssh-keys"].split(":", 1)[0]  # the login user, as the guest agent makes it
            sim.boot_in_background(inst["name"], inst["networkInterfaces"][0]["networkIP"],
                                   authorized_key_from_user_data(meta["user-data"]), inst["name"], user)

        gce.on_insert = on_insert
        gce.on_delete = lambda inst: sim.halt(inst["name"])
        try:
            spec = write(tmp_path, gcp_yaml(name, [pool("control", "control", 1, subnetCIDR=subnet,
                                                        sshAddress="private"),
                                                   pool("workers", "worker", 2, subnetCIDR=subnet,
                                                        sshAddress="private")], ssh_cidr="10.214.32.0/20",
                                            user="ubuntu"))  # Ubuntu images' login user: sudo, not root
            r = dcx.run("cluster", "create", "-f", str(spec), timeout=600)
            sim.wait_for_boots()
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            sim.assert_ready_swarm(dcx, name, "10.214.34.")

            r = dcx.run("cluster", "destroy", name, "--yes", timeout=300)
            assert r.returncode == 0, r.stderr
            assert sim.hosts == {}, "destroy stopped every machine"
            assert gce.all_resources() == {"instances": [], "firewalls": [], "networks": [], "subnetworks": []}
        finally:
            gce.on_insert = None
            if (dcx.home / "clusters" / name).exists():
                dcx.run("cluster", "destroy", name, "--yes", timeout=300)


# --- the provider in-process: mesh rules between providers ---------------------------------------


def provider_for(spec_path: Path, tmp_path: Path) -> tuple[Any, Any, dict[str, Any]]:
    """A GcpProvider as the engine makes it (no mocks: real SDK, real fake), with an in-memory journal."""
    from dcx.providers.gcp import GcpProvider
    from dcx.spec import load

    spec = load(spec_path)
    journal = MemoryJournal()
    provider = GcpProvider(journal.context(spec.name, "0a1b2c3d", tmp_path, network=spec.spec.network, spec=spec))
    provider.check_prerequisites()
    return provider, spec, journal.resources


def test_mesh_port_only_from_other_providers_nodes(gce: GceFake, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from dcx.providers.base import NodeRequest

    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "sa.json"))
    monkeypatch.setenv("DCX_GCP_ENDPOINT", gce.url)
    spec_path = write(tmp_path, gcp_yaml("gcp-mesh", [pool("control", "control", 1)]))
    provider, spec, resources = provider_for(spec_path, tmp_path)
    pools = spec.spec.pools
    provider.create_nodes(pools[0], [NodeRequest("gcp-mesh-control-1", "control", "control", 1)])
    rule = "dcx-0a1b2c3d-mesh"

    provider.allow_mesh_peers(pools, ["192.0.2.10", "192.0.2.11"], 51820)
    with gce.lock:
        mesh = dict(gce.firewalls[(PROJECT, rule)])
    assert mesh["sourceRanges"] == ["192.0.2.10/32", "192.0.2.11/32"]
    assert mesh["allowed"] == [{"IPProtocol": "udp", "ports": ["51820"]}]
    assert mesh["targetTags"] == ["dcx-0a1b2c3d"]
    assert f"gcp/firewall/{rule}" in resources  # journalled before it was made

    # The same peers again: no call changes anything. A peer gone and one new: exactly the new set.
    gce.reset_counts()
    provider.allow_mesh_peers(pools, ["192.0.2.11", "192.0.2.10"], 51820)
    assert mutations(gce) == []
    provider.allow_mesh_peers(pools, ["192.0.2.11", "192.0.2.12"], 51820)
    with gce.lock:
        assert gce.firewalls[(PROJECT, rule)]["sourceRanges"] == ["192.0.2.11/32", "192.0.2.12/32"]
    # A peer given by name (an ssh host's address may be one) is resolved to its address.
    provider.allow_mesh_peers(pools, ["192.0.2.11", "localhost"], 51820)
    with gce.lock:
        assert gce.firewalls[(PROJECT, rule)]["sourceRanges"] == ["127.0.0.1/32", "192.0.2.11/32"]
    # No peers left: the rule goes.
    provider.allow_mesh_peers(pools, [], 51820)
    with gce.lock:
        assert (PROJECT, rule) not in gce.firewalls
    provider.allow_mesh_peers(pools, [], 51820)  # and its absence is fine

    removed = provider.sweep(pools)
    assert "gcp instance gcp-mesh-control-1" in removed and "gcp network dcx-0a1b2c3d" in removed
    assert gce.all_resources() == {"instances": [], "firewalls": [], "networks": [], "subnetworks": []}
    assert not [k for k in resources if k.startswith("gcp/")]


@pytest.mark.namespace_hosts
def test_a_provider_dropped_from_the_spec_loses_everything_it_made(gce: GceFake, cli: tuple[Dcx, list[str]],
                                                                  tmp_path: Path) -> None:
    """Machines on GCE joined a cluster whose control node is local; the gcp pool leaves the spec: its
    instances go at the next create, then its firewalls and network, as Terraform would destroy them."""
    skip_without_namespace_nodes()
    dcx, clusters = cli
    name = "dropgcp"
    clusters.append(name)
    local = json.dumps({"name": "control", "role": "control", "count": 1, "provider": "local",
                        "local": {"subnet": "10.214.47.0/24"}})
    both = write(tmp_path, gcp_yaml(name, [local, pool("cloud", "worker", 2)]))
    dcx.run("cluster", "create", "-f", str(both), "--provision-only", check=True)
    assert len(instances(gce, name)) == 2
    assert gce.all_resources()["firewalls"]

    only_local = write(tmp_path, gcp_yaml(name, [local]), "local.yaml")
    r = dcx.run("cluster", "create", "-f", str(only_local), "--ssh-timeout", "5", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert instances(gce, name) == {}
    assert gce.all_resources() == {"instances": [], "firewalls": [], "networks": [], "subnetworks": []}
    assert "gcp is no longer in the spec: removed" in r.stdout + r.stderr
    status = dcx.json("cluster", "status", name)
    assert [n["name"] for n in status["nodes"]] == [f"{name}-control-1"] and status["healthy"] is True


@pytest.mark.namespace_hosts
def test_destroy_by_name_finds_a_provider_the_spec_no_longer_names(gce: GceFake, cli: tuple[Dcx, list[str]],
                                                                   tmp_path: Path) -> None:
    """The last applied spec has no gcp pool, but the cluster still has gcp instances (they were
    provisioned, then the pool was dropped before a full create): `destroy NAME` removes them too."""
    skip_without_namespace_nodes()
    dcx, clusters = cli
    name = "dropped"
    clusters.append(name)
    local = json.dumps({"name": "control", "role": "control", "count": 1, "provider": "local",
                        "local": {"subnet": "10.214.46.0/24"}})
    dcx.run("cluster", "create", "-f", str(write(tmp_path, gcp_yaml(name, [local, pool("cloud", "worker", 2)]))),
            "--provision-only", check=True)
    dcx.run("cluster", "create", "-f", str(write(tmp_path, gcp_yaml(name, [local]), "local.yaml")),
            "--provision-only", check=True)
    assert set(dcx.state(name)["nodes"]) == {f"{name}-control-1", f"{name}-cloud-1", f"{name}-cloud-2"}
    r = dcx.run("cluster", "destroy", name, "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert gce.all_resources() == {"instances": [], "firewalls": [], "networks": [], "subnetworks": []}
    assert not (dcx.home / "clusters" / name).exists()


# --- fidelity to the Compute reference (issue 12) -------------------------------------------------


def test_boot_disk_type_fits_the_machine_series(gce: GceFake, cli: tuple[Dcx, list[str]], tmp_path: Path) -> None:
    """The API's default boot disk (pd-standard) is refused by C3/C4/C4A/N4 (the fake enforces the
    series rules): dcx names a type per series, and the pool's diskType overrides it."""
    dcx, clusters = cli
    name = "gcp-disks"
    clusters.append(name)
    spec = write(tmp_path, gcp_yaml(name, [pool("control", "control", 1, machineType="c4a-standard-1"),
                                           pool("c3", "worker", 1, machineType="c3-standard-4"),
                                           pool("n4", "worker", 1, machineType="n4-standard-2"),
                                           pool("e2", "worker", 1, diskType="pd-ssd")]))
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode == 0, r.stdout + r.stderr
    made = instances(gce, name)
    disk = {n.split("-")[-2]: i["disks"][0]["initializeParams"]["diskType"] for n, i in made.items()}
    assert disk == {"control": "hyperdisk-balanced", "c3": "pd-balanced", "n4": "hyperdisk-balanced", "e2": "pd-ssd"}
    assert made[f"{name}-control-1"]["disks"][0]["initializeParams"]["sourceImage"].endswith("-arm64")
    # A type the series refuses is bad input, located in the file, before any call.
    bad = write(tmp_path, gcp_yaml(name, [pool("control", "control", 1, machineType="c4-standard-2",
                                               diskType="pd-balanced")]), "bad.yaml")
    gce.reset_counts()
    r = dcx.run("cluster", "create", "-f", str(bad), "--provision-only")
    assert r.returncode == 2 and "bad.yaml:" in r.stderr and "diskType pd-balanced" in r.stderr
    assert mutations(gce) == []


def test_scale_down_and_up_within_the_hour_makes_the_node_again(gce: GceFake, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Compute keeps a requestId 60 minutes and replays its finished operation: a node made, removed
    and wanted again within the hour (scale 3 -> 2 -> 3) must be a new request, not a replay that
    makes nothing. The provider in-process, as the engine drives it."""
    from dcx.providers import gcp
    from dcx.providers.base import NodeRequest

    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "sa.json"))
    monkeypatch.setenv("DCX_GCP_ENDPOINT", gce.url)
    monkeypatch.setattr(gcp, "ADDRESS_TIMEOUT", 5.0)  # a replay makes nothing: fail fast, not in 5 minutes
    spec_path = write(tmp_path, gcp_yaml("gcp-scale", [pool("control", "control", 1), pool("w", "worker", 3)]))
    provider, spec, resources = provider_for(spec_path, tmp_path)
    w = spec.spec.pools[1]

    def want(count: int) -> list[str]:
        nodes = provider.create_nodes(w, [NodeRequest(f"gcp-scale-w-{i}", "w", "worker", i)
                                          for i in range(1, count + 1)])
        return sorted(n.name for n in nodes)

    assert want(2) == ["gcp-scale-w-1", "gcp-scale-w-2"]
    assert want(3) == ["gcp-scale-w-1", "gcp-scale-w-2", "gcp-scale-w-3"]  # a bulkInsert of [w-3]
    third = [n for n in provider.list_nodes([w]) if n.name == "gcp-scale-w-3"]
    provider.delete_nodes([w], third)
    gce.advance(10 * 60)  # well within the request ids' hour
    assert want(3) == ["gcp-scale-w-1", "gcp-scale-w-2", "gcp-scale-w-3"]
    assert gce.count("POST", "/bulkInsert") == 3
    # A retry of one attempt still sends the same id: the answer lost, the instance is made once.
    provider.delete_nodes([w], [n for n in provider.list_nodes([w]) if n.name == "gcp-scale-w-3"])
    gce.fail_next(1, 503, "/bulkInsert", after=True)
    assert want(3) == ["gcp-scale-w-1", "gcp-scale-w-2", "gcp-scale-w-3"]
    assert gce.count("POST", "/bulkInsert") == 5  # the lost answer and its retry
    provider.sweep([w])
    assert not [k for k in resources if k.startswith("gcp/")]


def test_ssh_rule_opens_the_port_dcx_connects_to_and_user_data_keeps_the_hostname(
        gce: GceFake, cli: tuple[Dcx, list[str]], tmp_path: Path) -> None:
    """spec.ssh.port is the ssh pools' default port; cloud images' sshd listens on 22, which is where
    dcx connects (Node.ssh_port), so the firewall opens 22. The user-data the API receives leaves the
    hostname (set by dcx) alone at every boot."""
    from tests.unit.test_cloud_init import keeps_dcx_hostname

    dcx, clusters = cli
    name = "gcp-port"
    clusters.append(name)
    text = gcp_yaml(name, [pool("control", "control", 1)]).replace("ssh: {user: root}", "ssh: {user: root, port: 2222}")
    spec = write(tmp_path, text)
    dcx.run("cluster", "create", "-f", str(spec), "--provision-only", check=True)
    node = dcx.state(name)["nodes"][f"{name}-control-1"]
    tag = f"dcx-{dcx.state(name)['id']}"
    with gce.lock:
        rule = gce.firewalls[(PROJECT, f"{tag}-ssh")]
    assert rule["allowed"] == [{"IPProtocol": "tcp", "ports": [str(node["ssh_port"])]}] and node["ssh_port"] == 22
    assert node["hostname"] == f"{name}-control-1"  # bootstrap sets it; cloud-init keeps it
    inst = instances(gce, name)[f"{name}-control-1"]
    meta = {i["key"]: i["value"] for i in inst["metadata"]["items"]}
    assert keeps_dcx_hostname(YAML(typ="safe").load(io.StringIO(meta["user-data"])))
    assert f"{tag}-api" not in gce.all_resources()["firewalls"]  # swarm: no Kubernetes API

    # k3s: the kubeconfig points at a server's address on 6443; kubectl comes from spec.network.apiCIDR.
    k3s = text.replace("engine: {type: swarm}", "engine: {type: k3s}").replace(
        f"sshCIDR: '{SSH_CIDR}'", f"sshCIDR: '{SSH_CIDR}', apiCIDR: '192.0.2.0/24'")
    dcx.run("cluster", "create", "-f", str(write(tmp_path, k3s)), "--provision-only", check=True)
    with gce.lock:
        api = gce.firewalls[(PROJECT, f"{tag}-api")]
    assert api["allowed"] == [{"IPProtocol": "tcp", "ports": ["6443"]}] and api["sourceRanges"] == ["192.0.2.0/24"]
    assert api["targetTags"] == [tag]


def ids_of(fake: GceFake, cluster: str) -> list[str]:
    """The cluster ids of the instances of clusters named `cluster`, in every zone."""
    with fake.lock:
        return sorted(i["labels"]["dcx-cluster-id"] for i in fake.instances.values()
                      if i["labels"].get("dcx-cluster") == cluster)


def test_destroy_by_id_spares_another_cluster_of_the_same_name(gce: GceFake, cli: tuple[Dcx, list[str]],
                                                               tmp_path: Path) -> None:
    """Two clusters named alike in one project (two colleagues, two DCX_HOMEs). With one's state gone,
    `destroy -f` lists both (id, when, by whom) and asks for --cluster-id; with it, only that one goes."""
    dcx, clusters = cli
    name = "twin"
    clusters.append(name)
    colleague = Dcx(tmp_path / "colleague-home")
    colleague.env = {**dcx.env, "DCX_HOME": str(colleague.home)}
    spec = write(tmp_path, gcp_yaml(name, [pool("control", "control", 1)]))
    # Instance names are unique per zone: the colleague's cluster is in another zone of the project.
    theirs_spec = write(tmp_path, gcp_yaml(name, [pool("control", "control", 1, zone="us-central1-b")]), "b.yaml")
    try:
        dcx.run("cluster", "create", "-f", str(spec), "--provision-only", check=True)
        colleague.run("cluster", "create", "-f", str(theirs_spec), "--provision-only", check=True)
        mine, theirs = dcx.state(name)["id"], colleague.state(name)["id"]
        assert mine != theirs and ids_of(gce, name) == sorted([mine, theirs])
        destroy_without_state_picks_by_id(dcx, spec, name, mine, theirs)
        left = gce.all_resources()
        assert ids_of(gce, name) == [theirs]
        assert left["networks"] == [f"dcx-{theirs}"] and left["firewalls"] == [f"dcx-{theirs}-internal",
                                                                               f"dcx-{theirs}-ssh"]
    finally:
        if (colleague.home / "clusters" / name).exists():
            colleague.run("cluster", "destroy", name, "--yes", timeout=300)
    assert gce.all_resources() == {"instances": [], "firewalls": [], "networks": [], "subnetworks": []}
