"""The azure provider end to end: the real `dcx` CLI and the real azure-mgmt-* clients and azure-identity
credential against the local ARM fake (tests/fakes/arm.py), served over TLS with a CA the test makes.
The credential flow is the real one: EnvironmentCredential (inside DefaultAzureCredential) with a client
secret, msal asking the fake's OpenID configuration and token endpoints (AZURE_AUTHORITY_HOST). With
namespace hosts available, the fake's VMs boot as real machines (tests/testbed/boot.py) and
`dcx cluster create` goes all the way to a Ready swarm."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tests.fakes.arm import ArmFake, make_test_pki
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

SUB = "7d3c0a51-52b6-4c1e-9d0e-2f1a0b6c9e11"
OTHER_SUB = "0b9e7a44-1c2d-4e5f-8a9b-3c4d5e6f7a8b"
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT_ID = "5f1c2d3e-4a5b-4c6d-8e7f-0a1b2c3d4e5f"
LOCATION = "westeurope"
SSH_CIDR = "198.51.100.7/32"
VNET = "10.214.48.0/20"
SUBNET = "10.214.48.0/24"
VM = "Microsoft.Compute/virtualMachines"
NIC = "Microsoft.Network/networkInterfaces"
PIP = "Microsoft.Network/publicIPAddresses"
NSG = "Microsoft.Network/networkSecurityGroups"
VNET_TYPE = "Microsoft.Network/virtualNetworks"
DISK = "Microsoft.Compute/disks"


def azure_yaml(name: str, pools: list[str], ssh_cidr: str = SSH_CIDR, extra: str = "", user: str = "root") -> str:
    return cloud_cluster_yaml(name, pools, ssh_cidr, extra, user)


def pool(name: str, role: str, count: int, **azure: Any) -> str:
    settings = {"location": LOCATION, "vnetCIDR": VNET, "subnetCIDR": SUBNET, **azure}
    return json.dumps({"name": name, "role": role, "count": count, "provider": "azure", "azure": settings})


@pytest.fixture
def arm(tmp_path: Path) -> Iterator[tuple[ArmFake, str]]:
    """The fake (and its client secret, made up per test)."""
    import secrets

    secret = secrets.token_urlsafe(24)
    fake = ArmFake(make_test_pki(tmp_path / "pki"), (SUB, OTHER_SUB), TENANT, CLIENT_ID, secret).start()
    try:
        yield fake, secret
    finally:
        fake.close()


def azure_env(fake: ArmFake, secret: str) -> dict[str, str]:
    return {"AZURE_AUTHORITY_HOST": fake.url, "AZURE_TENANT_ID": TENANT, "AZURE_CLIENT_ID": CLIENT_ID,
            "AZURE_CLIENT_SECRET": secret, "AZURE_SUBSCRIPTION_ID": SUB, "DCX_AZURE_ENDPOINT": fake.url,
            "DCX_AZURE_CA_BUNDLE": str(fake.ca_file), "DCX_AZURE_POLL_INTERVAL": "0"}


@pytest.fixture
def cli(arm: tuple[ArmFake, str], tmp_path: Path) -> Iterator[tuple[Dcx, list[str]]]:
    """The dcx CLI with its own home, pointed at the fake; destroys the test's clusters at the end."""
    fake, secret = arm
    dcx = Dcx(tmp_path / "dcx-home")
    for var in list(dcx.env):
        if var.startswith(("AZURE_", "DCX_AZURE_")) or var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
                                                               "IDENTITY_ENDPOINT", "MSI_ENDPOINT"):
            dcx.env.pop(var)
    dcx.env.update(azure_env(fake, secret))
    dcx.env["HOME"] = str(tmp_path / "home")  # no az CLI profile or token cache of this machine
    (tmp_path / "home").mkdir()
    with clusters_destroyed_after(dcx) as clusters:
        yield dcx, clusters


def of(fake: ArmFake, rtype: str, cluster: str | None = None) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in fake.of_type(rtype) if cluster is None or r["tags"].get("dcx-cluster") == cluster}


def rules(fake: ArmFake, nsg_id: str) -> dict[str, dict[str, Any]]:
    nsg = fake.get(nsg_id)
    assert nsg is not None, nsg_id
    return {r["name"]: r["properties"] for r in nsg["properties"]["securityRules"]}


def sources(rule: dict[str, Any]) -> list[str]:
    return rule.get("sourceAddressPrefixes") or [rule["sourceAddressPrefix"]]


def ports(rule: dict[str, Any]) -> list[str]:
    return rule.get("destinationPortRanges") or [rule["destinationPortRange"]]


def test_create_tags_rules_custom_data_rerun_and_destroy(arm: tuple[ArmFake, str], cli: tuple[Dcx, list[str]],
                                                         tmp_path: Path) -> None:
    fake, _ = arm
    dcx, clusters = cli
    name = "az-main"
    clusters.append(name)
    spec = write(tmp_path, azure_yaml(name, [pool("control", "control", 1),
                                             pool("workers", "worker", 2, tags={"team": "infra"}, spot=True,
                                                  vmSize="Standard_D2s_v5")]))
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode == 0, r.stdout + r.stderr
    assert fake.token_requests >= 1  # the real credential flow ran against the fake authority
    state = dcx.state(name)
    cid = state["id"]
    group = f"dcx-{name}-{cid}"  # the id in it: another cluster of the name gets its own group
    public_key = (dcx.home / "clusters" / name / "ssh" / "id_ed25519.pub").read_text().strip()

    # Every resource carries the cluster's tags; the resource group is dcx's.
    inventory = fake.inventory()
    assert inventory["resourceGroups"] == [group]
    nodes = [f"{name}-control-1", f"{name}-workers-1", f"{name}-workers-2"]
    assert inventory["virtualMachines"] == nodes
    assert inventory["networkInterfaces"] == [f"{n}-nic" for n in nodes]
    assert inventory["publicIPAddresses"] == [f"{n}-pip" for n in nodes]
    assert inventory["disks"] == [f"{n}-osdisk" for n in nodes]
    assert inventory["virtualNetworks"] == [f"dcx-{name}-vnet"]
    assert inventory["networkSecurityGroups"] == [f"dcx-{name}-nsg"]
    rg = fake.get(f"/subscriptions/{SUB}/resourceGroups/{group}")
    assert rg is not None and rg["tags"]["dcx-cluster"] == name and rg["tags"]["dcx-cluster-id"] == cid
    # Who made it: the credential's token claims (a service principal: its appid).
    assert rg["tags"]["dcx-created-by"] == f"app:{CLIENT_ID}" and rg["tags"]["dcx-created"].endswith("Z")
    for rtype in (VM, NIC, PIP, DISK, NSG, VNET_TYPE):
        for rname, res in of(fake, rtype).items():
            assert res["tags"]["dcx-cluster"] == name and res["tags"]["dcx-cluster-id"] == cid, (rtype, rname)
            assert res["tags"]["dcx-pool"] in ("control", "workers"), (rtype, rname)
            assert res["location"] == LOCATION
    vms = of(fake, VM, name)
    assert vms[f"{name}-workers-1"]["tags"] == {"team": "infra", "dcx-cluster": name, "dcx-cluster-id": cid,
                                                "dcx-pool": "workers", "dcx-created": rg["tags"]["dcx-created"],
                                                "dcx-created-by": f"app:{CLIENT_ID}"}

    for vname, vm in vms.items():
        props = vm["properties"]
        os_profile = props["osProfile"]
        assert "customData" not in os_profile  # as Azure: never returned
        assert os_profile["computerName"] == vname
        # root is not an admin name Azure allows: the VM's admin is azureuser, root gets the key by cloud-init.
        assert os_profile["adminUsername"] == "azureuser"
        linux = os_profile["linuxConfiguration"]
        assert linux["disablePasswordAuthentication"] is True
        assert linux["ssh"]["publicKeys"] == [{"path": "/home/azureuser/.ssh/authorized_keys", "keyData": public_key}]
        assert props["storageProfile"]["imageReference"] == {"publisher": "Canonical", "offer": "ubuntu-24_04-lts",
                                                             "sku": "server", "version": "latest"}
        assert props["storageProfile"]["osDisk"]["deleteOption"] == "Delete"
        assert props["hardwareProfile"]["vmSize"] == ("Standard_D2s_v5" if "workers" in vname else "Standard_B2s")
        assert (props.get("priority") == "Spot") == ("workers" in vname)
        with fake.lock:
            custom = fake.custom_data[vm["id"].lower()]
        assert custom.startswith("#cloud-config\n")
        user_data = YAML(typ="safe").load(custom)
        assert user_data["users"][1] == {"name": "root", "shell": "/bin/bash", "sudo": "ALL=(ALL) NOPASSWD:ALL",
                                         "ssh_authorized_keys": [public_key]}
        assert user_data["ssh_pwauth"] is False

    # The state's nodes: public SSH address (the default), private address from the subnet, network, ids.
    for n in nodes:
        node = state["nodes"][n]
        nic = fake.get(f"/subscriptions/{SUB}/resourceGroups/{group}/providers/{NIC}/{n}-nic")
        pip = fake.get(f"/subscriptions/{SUB}/resourceGroups/{group}/providers/{PIP}/{n}-pip")
        assert nic is not None and pip is not None
        private = nic["properties"]["ipConfigurations"][0]["properties"]["privateIPAddress"]
        assert node["private_address"] == private and private.startswith("10.214.48.")
        assert node["ssh_address"] == node["public_address"] == pip["properties"]["ipAddress"]
        assert node["network"] == f"azure:{SUB}/{group}/dcx-{name}-vnet"
        assert node["provider_ids"] == {"vm": n, "resourceGroup": group, "subscription": SUB, "location": LOCATION}
        assert node["ssh_user"] == "root"
        assert nic["properties"]["networkSecurityGroup"]["id"].endswith(f"/networkSecurityGroups/dcx-{name}-nsg")

    # The security group: SSH from sshCIDR only, cluster ports only from the subnet, the Internet denied.
    nsg = rules(fake, f"/subscriptions/{SUB}/resourceGroups/{group}/providers/{NSG}/dcx-{name}-nsg")
    assert sources(nsg["dcx-ssh"]) == [SSH_CIDR] and ports(nsg["dcx-ssh"]) == ["22"]
    assert nsg["dcx-ssh"]["protocol"] == "Tcp" and nsg["dcx-ssh"]["access"] == "Allow"
    assert ports(nsg["dcx-cluster-tcp"]) == ["2377", "7946"]
    assert sorted(ports(nsg["dcx-cluster-udp"])) == ["4789", "51820", "7946"]
    assert nsg["dcx-cluster-esp"]["protocol"] == "Esp"
    deny = nsg["dcx-deny-internet"]
    assert (deny["access"], sources(deny), deny["protocol"]) == ("Deny", ["Internet"], "*")
    assert all(nsg[r]["priority"] < deny["priority"] for r in nsg if r != "dcx-deny-internet")
    for rname, rule in nsg.items():
        if rname.startswith("dcx-cluster-"):
            assert sources(rule) == [SUBNET], rname
        if rule["access"] == "Allow":  # no port open to the world
            assert not {"*", "0.0.0.0/0", "Internet", "Any"} & set(sources(rule)), rname
    assert "dcx-mesh" not in nsg  # one network: no mesh port from outside
    vnet = of(fake, VNET_TYPE)[f"dcx-{name}-vnet"]
    assert vnet["properties"]["addressSpace"]["addressPrefixes"] == [VNET]
    assert [s["properties"]["addressPrefix"] for s in vnet["properties"]["subnets"]] == [SUBNET]
    assert vnet["properties"]["subnets"][0]["properties"]["defaultOutboundAccess"] is True

    # A re-run finds everything by name and tags: nothing is created, changed or deleted.
    fake.reset_counts()
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode == 0, r.stdout + r.stderr
    assert fake.mutations() == []
    assert fake.inventory() == inventory

    # An edited sshCIDR changes the security group (one PUT) and nothing else.
    write(tmp_path, azure_yaml(name, [pool("control", "control", 1),
                                      pool("workers", "worker", 2, tags={"team": "infra"}, spot=True,
                                                  vmSize="Standard_D2s_v5")],
                               ssh_cidr=f"{SSH_CIDR},192.0.2.0/28"))
    fake.reset_counts()
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [(m, p.rsplit("/", 1)[1]) for m, p in fake.mutations()] == [("PUT", f"dcx-{name}-nsg")]
    nsg = rules(fake, f"/subscriptions/{SUB}/resourceGroups/{group}/providers/{NSG}/dcx-{name}-nsg")
    assert sorted(sources(nsg["dcx-ssh"])) == ["192.0.2.0/28", SSH_CIDR]

    r = dcx.run("cluster", "destroy", name, "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert fake.inventory() == {}
    assert not (dcx.home / "clusters" / name).exists()


def test_user_resource_group_and_network_and_destroy_without_state(arm: tuple[ArmFake, str],
                                                                   cli: tuple[Dcx, list[str]],
                                                                   tmp_path: Path) -> None:
    """In a resource group and virtual network the user owns, dcx deletes only its tagged resources (in
    dependency order); with the state directory gone, destroy -f FILE finds them, and the group dcx made
    for another pool, by tag."""
    fake, secret = arm
    dcx, clusters = cli
    fake.add_resource_group(SUB, "shared-rg", LOCATION, tags={"owner": "me"})
    fake_net = _user_network(fake, secret, "shared-rg", "shared-vnet", "10.214.50.0/24")
    clusters += ["az-sweep", "az-sweep-b"]
    spec = write(tmp_path, azure_yaml("az-sweep", [
        pool("control", "control", 1),
        pool("w", "worker", 2, resourceGroup="shared-rg", vnet="shared-vnet", subnet="default",
             sshAddress="private")]))
    other = write(tmp_path, azure_yaml("az-sweep-b", [pool("control", "control", 1, resourceGroup="shared-rg",
                                                           vnet=fake_net, subnet="default")]), "other.yaml")
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode == 0, r.stdout + r.stderr
    r = dcx.run("cluster", "create", "-f", str(other), "--provision-only")
    assert r.returncode == 0, r.stdout + r.stderr
    state = dcx.state("az-sweep")
    w1 = state["nodes"]["az-sweep-w-1"]
    assert w1["ssh_address"] == w1["private_address"] and w1["public_address"] == ""  # sshAddress: private
    assert w1["network"] == f"azure:{SUB}/shared-rg/shared-vnet"
    assert of(fake, PIP, "az-sweep").keys() == {"az-sweep-control-1-pip"}
    # Two NSGs in the shared group (one per cluster); a pool's cluster ports come only from its subnets.
    shared_nsg = rules(fake, f"/subscriptions/{SUB}/resourceGroups/shared-rg/providers/{NSG}/dcx-az-sweep-nsg")
    assert sources(shared_nsg["dcx-cluster-tcp"]) == ["10.214.50.0/24"]
    inventory = fake.inventory()
    assert inventory["resourceGroups"] == [f"dcx-az-sweep-{state['id']}", "shared-rg"]

    shutil.rmtree(dcx.home / "clusters" / "az-sweep")
    fake.reset_counts()
    r = dcx.run("cluster", "destroy", "-f", str(spec), "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    # Dependency order in the user's group: VMs, then NICs, then public IPs, disks, NSGs, networks.
    kinds = [p.split("/providers/")[1].split("/")[1] for m, p in fake.mutations() if m == "DELETE"
             and "/resourceGroups/shared-rg/" in p]
    assert kinds == sorted(kinds, key=["virtualMachines", "networkInterfaces", "publicIPAddresses", "disks",
                                       "networkSecurityGroups", "virtualNetworks"].index)
    assert kinds.count("virtualMachines") == 2
    left = fake.inventory()
    # The other cluster and the user's own resources stay.
    assert left["resourceGroups"] == ["shared-rg"]
    assert left["virtualMachines"] == ["az-sweep-b-control-1"]
    assert left["networkSecurityGroups"] == ["dcx-az-sweep-b-nsg"]
    assert left["virtualNetworks"] == ["shared-vnet"]
    assert left["networkInterfaces"] == ["az-sweep-b-control-1-nic"]
    assert fake.get(f"/subscriptions/{SUB}/resourceGroups/shared-rg")["tags"] == {"owner": "me"}

    r = dcx.run("cluster", "destroy", "az-sweep-b", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert fake.inventory() == {"resourceGroups": ["shared-rg"], "virtualNetworks": ["shared-vnet"]}


def _user_network(fake: ArmFake, secret: str, group: str, name: str, prefix: str) -> str:
    """A user's virtual network, made through the real SDK (as the user would); returns its id."""
    from azure.identity import ClientSecretCredential
    from azure.mgmt.network import NetworkManagementClient

    credential = ClientSecretCredential(TENANT, CLIENT_ID, secret, authority=fake.url, disable_instance_discovery=True,
                                        connection_verify=str(fake.ca_file))
    client = NetworkManagementClient(credential, SUB, base_url=fake.url, credential_scopes=[f"{fake.url}/.default"],
                                     polling_interval=0, connection_verify=str(fake.ca_file))
    vnet = client.virtual_networks.begin_create_or_update(group, name, {
        "location": LOCATION, "properties": {"addressSpace": {"addressPrefixes": ["10.214.50.0/23"]},
                                             "subnets": [{"name": "default", "properties": {"addressPrefix": prefix}}]}
    }).result()
    return vnet.id


def test_two_locations_make_two_networks_and_open_the_mesh_between_them(arm: tuple[ArmFake, str],
                                                                         cli: tuple[Dcx, list[str]],
                                                                         tmp_path: Path) -> None:
    """A pool outside the resource group's location gets its own virtual network and security group
    (names with the location); the cluster then spans two networks, and each security group lets in
    the mesh port from exactly the nodes' public addresses (its own nodes too: they are in another network)."""
    fake, _ = arm
    dcx, clusters = cli
    name = "az-two"
    clusters.append(name)
    spec = write(tmp_path, azure_yaml(name, [pool("control", "control", 1),
                                             pool("north", "worker", 2, location="northeurope")]))
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode == 0, r.stdout + r.stderr
    group = f"dcx-{name}-{dcx.state(name)['id']}"
    assert fake.inventory()["virtualNetworks"] == [f"dcx-{name}-vnet", f"dcx-{name}-vnet-northeurope"]
    assert fake.inventory()["networkSecurityGroups"] == [f"dcx-{name}-nsg", f"dcx-{name}-nsg-northeurope"]
    nodes = dcx.state(name)["nodes"]
    assert nodes[f"{name}-north-1"]["network"] == f"azure:{SUB}/{group}/dcx-{name}-vnet-northeurope"
    assert nodes[f"{name}-control-1"]["network"] == f"azure:{SUB}/{group}/dcx-{name}-vnet"
    assert nodes[f"{name}-north-1"]["provider_ids"]["location"] == "northeurope"
    publics = sorted(f"{n['public_address']}/32" for n in nodes.values())
    for nsg in (f"dcx-{name}-nsg", f"dcx-{name}-nsg-northeurope"):
        mesh = rules(fake, f"/subscriptions/{SUB}/resourceGroups/{group}/providers/{NSG}/{nsg}")["dcx-mesh"]
        assert sorted(sources(mesh)) == publics and ports(mesh) == ["51820"] and mesh["protocol"] == "Udp"

    r = dcx.run("cluster", "destroy", name, "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert fake.inventory() == {}


def test_throttling_is_retried(arm: tuple[ArmFake, str], cli: tuple[Dcx, list[str]], tmp_path: Path) -> None:
    fake, _ = arm
    dcx, clusters = cli
    name = "az-429"
    clusters.append(name)
    spec = write(tmp_path, azure_yaml(name, [pool("control", "control", 1), pool("w", "worker", 2)]))
    fake.throttle_next(2, "/resourcegroups/")  # the first look-ups
    fake.throttle_next(1, "/virtualmachines/")  # a VM PUT
    fake.throttle_next(1, "/fake/operations/")  # a poll of an operation
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode == 0, r.stdout + r.stderr
    assert fake.throttles_left() == 0, "every throttled request was met"
    assert sorted(of(fake, VM, name)) == [f"{name}-control-1", f"{name}-w-1", f"{name}-w-2"]
    # The throttled VM PUT was sent again: one more PUT than VMs, and no duplicate.
    assert fake.count("PUT", "/virtualMachines/") == 3 + 1
    assert len(dcx.state(name)["nodes"]) == 3
    r = dcx.run("cluster", "destroy", name, "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert fake.inventory() == {}


def test_vms_of_a_pool_are_created_together(arm: tuple[ArmFake, str], cli: tuple[Dcx, list[str]],
                                            tmp_path: Path) -> None:
    """The fake holds every VM creation InProgress until all the pool's VM PUTs have arrived: a provider
    that waited for each VM before sending the next PUT would see its first VM fail."""
    fake, _ = arm
    dcx, clusters = cli
    name = "az-par"
    clusters.append(name)
    spec = write(tmp_path, azure_yaml(name, [pool("w", "control", 5)]))
    fake.gate_vm_creates(5)
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode == 0, r.stdout + r.stderr
    with fake.lock:
        events = list(fake.events)
    puts = [i for i, (kind, _) in enumerate(events) if kind == "vm-put"]
    created = [i for i, (kind, _) in enumerate(events) if kind == "vm-created"]
    assert len(puts) == 5 and len(created) == 5
    assert max(puts) < min(created), events  # every PUT before the first VM was done
    assert len(dcx.state(name)["nodes"]) == 5


def test_bad_input_and_missing_credentials_are_one_line(arm: tuple[ArmFake, str], cli: tuple[Dcx, list[str]],
                                                        tmp_path: Path) -> None:
    fake, _ = arm
    dcx, clusters = cli
    clusters.append("az-bad")

    def one_error_line(stderr: str) -> bool:
        return "Traceback" not in stderr and len([ln for ln in stderr.splitlines() if ln.startswith("error")]) == 1

    # No sshCIDR: dcx refuses to open SSH to the world (exit 2, says what to set), before making anything.
    spec = write(tmp_path, azure_yaml("az-bad", [pool("control", "control", 1)], ssh_cidr=""))
    fake.reset_counts()
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode == 2 and "sshCIDR" in r.stderr and one_error_line(r.stderr), r.stderr
    assert fake.mutations() == []
    # A tag dcx sets itself is located in the file.
    spec = write(tmp_path, azure_yaml("az-bad", [pool("control", "control", 1, tags={"dcx-pool": "x"})]))
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode == 2 and "cluster.yaml:" in r.stderr and "dcx-pool" in r.stderr, r.stderr
    # Spot on a B-series size (Azure refuses those): located, before anything is made.
    spec = write(tmp_path, azure_yaml("az-bad", [pool("control", "control", 1, spot=True)]))
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode == 2 and "cluster.yaml:" in r.stderr and "B-series" in r.stderr, r.stderr
    assert fake.mutations() == []
    # A subscription the account cannot see: the API's words, one line, a hint.
    spec = write(tmp_path, azure_yaml("az-bad", [pool("control", "control", 1,
                                                      subscription="11111111-2222-3333-4444-555555555555")]))
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode == 1 and "SubscriptionNotFound" in r.stderr and one_error_line(r.stderr), r.stderr
    assert "AZURE_SUBSCRIPTION_ID" in r.stderr.split("hint:")[1]

    # No subscription anywhere.
    spec = write(tmp_path, azure_yaml("az-bad", [pool("control", "control", 1)]))
    env = dict(dcx.env)
    dcx.env.pop("AZURE_SUBSCRIPTION_ID")
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode == 1 and "no Azure subscription" in r.stderr and one_error_line(r.stderr), r.stderr
    assert "AZURE_SUBSCRIPTION_ID" in r.stderr
    dcx.env = env

    # A wrong client secret: refused by the authority; the secret is not in the output.
    dcx.env["AZURE_CLIENT_SECRET"] = "not-the-secret-" + "x" * 12
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode == 1 and "credentials were refused" in r.stderr and "AADSTS7000215" in r.stderr, r.stderr
    assert one_error_line(r.stderr) and "not-the-secret" not in r.stdout + r.stderr
    dcx.env = dict(env)

    # No credentials at all (no environment, no managed identity, no az login).
    for var in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_AUTHORITY_HOST"):
        dcx.env.pop(var)
    dcx.env["PATH"] = "/usr/bin:/bin"  # no az, azd or pwsh
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only", timeout=120)
    assert r.returncode == 1 and "no Azure credentials found" in r.stderr and "az login" in r.stderr, r.stderr
    assert one_error_line(r.stderr)
    dcx.env = env
    assert fake.inventory().get("virtualMachines") is None


def test_mesh_port_only_from_other_networks_nodes(arm: tuple[ArmFake, str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The provider in-process (no mocks: real SDK, real fake): the mesh rule has exactly the peers."""
    from dcx.providers.azure import AzureProvider
    from dcx.providers.base import NodeRequest
    from dcx.spec import load

    fake, secret = arm
    for var, value in azure_env(fake, secret).items():
        monkeypatch.setenv(var, value)
    spec = load(write(tmp_path, azure_yaml("az-mesh", [pool("control", "control", 1)])))
    journal = MemoryJournal()
    resources = journal.resources
    ctx = journal.context(spec.name, "0a1b2c3d", tmp_path, network=spec.spec.network, spec=spec)
    provider = AzureProvider(ctx)
    provider.check_prerequisites()
    pools = spec.spec.pools
    made = provider.create_nodes(pools[0], [NodeRequest("az-mesh-control-1", "control", "control", 1)])
    assert [n.name for n in made] == ["az-mesh-control-1"]
    assert {"azure/group/" + f"{SUB}/dcx-az-mesh-0a1b2c3d", "azure/vm/az-mesh-control-1"} <= set(resources)
    nsg_id = f"/subscriptions/{SUB}/resourceGroups/dcx-az-mesh-0a1b2c3d/providers/{NSG}/dcx-az-mesh-nsg"

    fake.reset_counts()
    provider.allow_mesh_peers(pools, [], 51820)  # never opened: not even a call
    assert fake.count() == 0
    provider.allow_mesh_peers(pools, ["192.0.2.10", "192.0.2.11"], 51820)
    mesh = rules(fake, nsg_id)["dcx-mesh"]
    assert sorted(sources(mesh)) == ["192.0.2.10/32", "192.0.2.11/32"]
    assert (mesh["protocol"], ports(mesh), mesh["access"]) == ("Udp", ["51820"], "Allow")
    assert any(k.startswith("azure/mesh/") for k in resources)  # journalled

    # The same peers again: no change. A peer gone and one new: exactly the new set.
    fake.reset_counts()
    provider.allow_mesh_peers(pools, ["192.0.2.11", "192.0.2.10"], 51820)
    assert fake.mutations() == []
    provider.allow_mesh_peers(pools, ["192.0.2.11", "192.0.2.12"], 51820)
    assert sorted(sources(rules(fake, nsg_id)["dcx-mesh"])) == ["192.0.2.11/32", "192.0.2.12/32"]
    # A single peer given by name is resolved.
    provider.allow_mesh_peers(pools, ["localhost"], 51820)
    assert sources(rules(fake, nsg_id)["dcx-mesh"]) == ["127.0.0.1/32"]

    # A later run (new provider, say an edited sshCIDR) keeps the mesh rule when it updates the group.
    spec2 = load(write(tmp_path, azure_yaml("az-mesh", [pool("control", "control", 1)],
                                            ssh_cidr="192.0.2.99/32"), "second.yaml"))
    ctx.spec, ctx.network = spec2, spec2.spec.network
    provider2 = AzureProvider(ctx)
    provider2.repair_nodes(spec2.spec.pools, made)
    now = rules(fake, nsg_id)
    assert sources(now["dcx-ssh"]) == ["192.0.2.99/32"] and sources(now["dcx-mesh"]) == ["127.0.0.1/32"]

    # No peers left: the rule goes (and its journal entry).
    provider2.allow_mesh_peers(spec2.spec.pools, [], 51820)
    assert "dcx-mesh" not in rules(fake, nsg_id)
    assert not any(k.startswith("azure/mesh/") for k in resources)

    removed = provider2.sweep(spec2.spec.pools)
    assert removed == ["azure resource group dcx-az-mesh-0a1b2c3d"]
    assert fake.inventory() == {}
    assert not [k for k in resources if k.startswith("azure/")]


def test_evicted_spot_vm_is_started_again(arm: tuple[ArmFake, str], cli: tuple[Dcx, list[str]],
                                          tmp_path: Path) -> None:
    fake, _ = arm
    dcx, clusters = cli
    name = "az-spot"
    clusters.append(name)
    spec = write(tmp_path, azure_yaml(name, [pool("control", "control", 1, spot=True, vmSize="Standard_D2s_v5")]))
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode == 0, r.stdout + r.stderr
    vm = of(fake, VM, name)[f"{name}-control-1"]
    fake.deallocate(vm["id"])
    fake.reset_counts()
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [(m, p.rsplit("/", 2)[1:]) for m, p in fake.mutations()] == [("POST", [f"{name}-control-1", "start"])]
    with fake.lock:
        assert fake.resources[vm["id"].lower()]["_power"] == "running"


# --- boot simulation: from the fake's VMs to a real swarm ------------------------------------------


@pytest.mark.namespace_hosts
def test_boot_simulation_reaches_a_ready_swarm(arm: tuple[ArmFake, str], cli: tuple[Dcx, list[str]],
                                               tmp_path: Path) -> None:
    skip_without_namespace_nodes()
    from tests.testbed.boot import BootSimulator, authorized_key_from_user_data

    fake, _ = arm
    dcx, clusters = cli
    name = "az-boot"
    clusters.append(name)
    with BootSimulator(SUBNET, tag="azure") as sim:
        def on_created(vm: dict[str, Any], private_ip: str, custom_data: str) -> None:
            user = YAML(typ="safe").load(custom_data)["users"][1]["name"]  # the login user cloud-init makes
            sim.boot_in_background(vm["name"], private_ip, authorized_key_from_user_data(custom_data), vm["name"],
                                   user)

        fake.on_vm_created = on_created
        fake.on_vm_deleted = lambda vm: sim.halt(vm["name"])
        try:
            spec = write(tmp_path, azure_yaml(name, [pool("control", "control", 1, sshAddress="private"),
                                                     pool("workers", "worker", 2, sshAddress="private")],
                                              ssh_cidr=VNET, user="ubuntu"))
            r = dcx.run("cluster", "create", "-f", str(spec), timeout=600)
            sim.wait_for_boots()
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            sim.assert_ready_swarm(dcx, name, "10.214.48.")
            assert {vm["properties"]["osProfile"]["adminUsername"] for vm in of(fake, VM, name).values()} == {"ubuntu"}

            r = dcx.run("cluster", "destroy", name, "--yes", timeout=300)
            assert r.returncode == 0, r.stderr
            assert sim.hosts == {}, "destroy stopped every machine"
            assert fake.inventory() == {}
        finally:
            fake.on_vm_created = None
            if (dcx.home / "clusters" / name).exists():
                dcx.run("cluster", "destroy", name, "--yes", timeout=300)


# --- fidelity to the ARM reference (issue 12) -----------------------------------------------------


def azure_provider(fake: ArmFake, secret: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   text: str) -> tuple[Any, Any, dict[str, Any]]:
    """An AzureProvider as the engine makes it (no mocks: real SDK, real fake), with an in-memory journal."""
    from dcx.providers.azure import AzureProvider
    from dcx.spec import load

    for var, value in azure_env(fake, secret).items():
        monkeypatch.setenv(var, value)
    spec = load(write(tmp_path, text))
    journal = MemoryJournal()
    provider = AzureProvider(journal.context(spec.name, "0a1b2c3d", tmp_path, network=spec.spec.network, spec=spec))
    provider.check_prerequisites()
    return provider, spec, journal.resources


def test_scale_down_leaves_no_nic_nor_public_ip(arm: tuple[ArmFake, str], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A NIC deleted right after its VM answers NicReservedForAnotherVm for 180 s (the fake keeps the
    real 180 s here). dcx makes NIC and public IP with deleteOption Delete: they go with the VM."""
    from dcx.providers.base import NodeRequest

    fake, secret = arm
    provider, spec, _ = azure_provider(fake, secret, tmp_path, monkeypatch,
                                       azure_yaml("az-down", [pool("control", "control", 1), pool("w", "worker", 2)]))
    w = spec.spec.pools[1]
    made = provider.create_nodes(w, [NodeRequest(f"az-down-w-{i}", "w", "worker", i) for i in (1, 2)])
    assert fake.nic_reservation == 180.0
    provider.delete_nodes(spec.spec.pools, [n for n in made if n.name == "az-down-w-2"])
    left = fake.inventory()
    assert left["virtualMachines"] == ["az-down-w-1"]
    assert left["networkInterfaces"] == ["az-down-w-1-nic"] and left["publicIPAddresses"] == ["az-down-w-1-pip"]
    assert left["disks"] == ["az-down-w-1-osdisk"]


def test_sweep_retries_a_nic_reserved_for_its_deleted_vm(arm: tuple[ArmFake, str], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine made before deleteOption (its NIC and public IP outlive the VM): the sweep retries the
    NIC while it is reserved, then deletes the billed static public IP too. The reservation is
    shortened to 2 s (the shape, 400 NicReservedForAnotherVm until it ends, is the real one)."""
    from azure.mgmt.compute import ComputeManagementClient

    fake, secret = arm
    fake.nic_reservation = 2.0
    text = azure_yaml("az-old", [pool("control", "control", 1, resourceGroup="mine")])
    fake.add_resource_group(SUB, "mine", LOCATION)
    provider, spec, _ = azure_provider(fake, secret, tmp_path, monkeypatch, text)
    from dcx.providers.base import NodeRequest

    provider.create_nodes(spec.spec.pools[0], [NodeRequest("az-old-control-1", "control", "control", 1)])
    # Re-attach the NIC the way dcx used to (no deleteOption: Detach), with a plain SDK call.
    cc: ComputeManagementClient = provider.api.compute(SUB)
    vm = cc.virtual_machines.get("mine", "az-old-control-1").as_dict()
    with fake.lock:
        stored = fake.resources[vm["id"].lower()]
        for ref in stored["properties"]["networkProfile"]["networkInterfaces"]:
            ref["properties"].pop("deleteOption", None)
    removed = provider.sweep(spec.spec.pools)
    assert "azure network interface az-old-control-1-nic" in removed
    assert "azure public IP az-old-control-1-pip" in removed
    assert fake.inventory() == {"resourceGroups": ["mine"]}


def test_resource_providers_are_registered_on_first_use(arm: tuple[ArmFake, str], cli: tuple[Dcx, list[str]],
                                                        tmp_path: Path) -> None:
    """A subscription that never registered Microsoft.Network answers 409 MissingSubscriptionRegistration
    until it is registered: an identity that may not register gets one line saying what to ask the
    admin for; one that may gets it registered (the SDK's policy does it, polling every 10 s) and the
    cluster made."""
    fake, _ = arm
    dcx, clusters = cli
    name = "az-reg"
    clusters.append(name)
    spec = write(tmp_path, azure_yaml(name, [pool("control", "control", 1)]))
    fake.unregister(SUB, "Microsoft.Network")
    fake.may_register = False
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "az provider register --namespace Microsoft.Network" in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error")]) == 1
    fake.may_register = True
    r = dcx.run("cluster", "create", "-f", str(spec), "--provision-only")
    assert r.returncode == 0, r.stdout + r.stderr
    assert fake.registration[(SUB, "microsoft.network")] == "Registered"
    assert list(of(fake, VM, name)) == [f"{name}-control-1"]


def test_ssh_rule_api_rule_and_user_data_keep_to_what_dcx_uses(arm: tuple[ArmFake, str], cli: tuple[Dcx, list[str]],
                                                               tmp_path: Path) -> None:
    """SSH opens 22, where dcx connects (the image's sshd; spec.ssh.port is the ssh pools' default);
    k3s opens 6443 to spec.network.apiCIDR (default sshCIDR) for kubectl; the custom data leaves the
    hostname dcx sets alone at every boot."""
    from tests.unit.test_cloud_init import keeps_dcx_hostname

    fake, _ = arm
    dcx, clusters = cli
    name = "az-port"
    clusters.append(name)
    text = azure_yaml(name, [pool("control", "control", 1)]).replace("ssh: {user: root}",
                                                                     "ssh: {user: root, port: 2222}")
    dcx.run("cluster", "create", "-f", str(write(tmp_path, text)), "--provision-only", check=True)
    node = dcx.state(name)["nodes"][f"{name}-control-1"]
    nsg_id = f"/subscriptions/{SUB}/resourceGroups/dcx-{name}-{dcx.state(name)['id']}/providers/{NSG}/dcx-{name}-nsg"
    now = rules(fake, nsg_id)
    assert ports(now["dcx-ssh"]) == [str(node["ssh_port"])] == ["22"] and "dcx-api" not in now
    assert node["hostname"] == f"{name}-control-1"
    vm = of(fake, VM, name)[f"{name}-control-1"]
    with fake.lock:
        custom = fake.custom_data[vm["id"].lower()]
    assert keeps_dcx_hostname(YAML(typ="safe").load(custom))

    k3s = text.replace("engine: {type: swarm}", "engine: {type: k3s}")
    dcx.run("cluster", "create", "-f", str(write(tmp_path, k3s)), "--provision-only", check=True)
    api = rules(fake, nsg_id)["dcx-api"]
    assert (api["protocol"], ports(api), sources(api), api["access"]) == ("Tcp", ["6443"], [SSH_CIDR], "Allow")


def test_destroy_by_id_spares_another_cluster_of_the_same_name(arm: tuple[ArmFake, str], cli: tuple[Dcx, list[str]],
                                                               tmp_path: Path) -> None:
    """Two clusters named alike in one subscription (two colleagues, two DCX_HOMEs) get a resource group
    each (dcx-NAME-ID). With one's state gone, `destroy -f` lists both (id, when, by whom) and asks
    for --cluster-id; with it, only that cluster's group goes, never the colleague's."""
    fake, _ = arm
    dcx, clusters = cli
    name = "az-twin"
    clusters.append(name)
    colleague = Dcx(tmp_path / "colleague-home")
    colleague.env = {**dcx.env, "DCX_HOME": str(colleague.home)}
    spec = write(tmp_path, azure_yaml(name, [pool("control", "control", 1)]))
    try:
        dcx.run("cluster", "create", "-f", str(spec), "--provision-only", check=True)
        colleague.run("cluster", "create", "-f", str(spec), "--provision-only", check=True)
        mine, theirs = dcx.state(name)["id"], colleague.state(name)["id"]
        assert fake.inventory()["resourceGroups"] == sorted([f"dcx-{name}-{mine}", f"dcx-{name}-{theirs}"])
        destroy_without_state_picks_by_id(dcx, spec, name, mine, theirs)
        assert fake.inventory()["resourceGroups"] == [f"dcx-{name}-{theirs}"]
        assert list(of(fake, VM, name)) == [f"{name}-control-1"]
    finally:
        if (colleague.home / "clusters" / name).exists():
            colleague.run("cluster", "destroy", name, "--yes", timeout=300)
    assert fake.inventory() == {}
