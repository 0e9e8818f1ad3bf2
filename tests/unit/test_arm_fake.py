"""The ARM fake answers the real azure-mgmt-* clients as Azure's references say, for the rules dcx's
requests depend on: resource names per type, tags, the NIC reservation after a VM's deletion and
deleteOption, and resource provider registration."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.arm import ArmFake, make_test_pki

SUB = "7d3c0a51-52b6-4c1e-9d0e-2f1a0b6c9e11"
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT_ID = "5f1c2d3e-4a5b-4c6d-8e7f-0a1b2c3d4e5f"
RG = "rg"
LOC = "westeurope"


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[ArmFake, str]]:
    secret = secrets.token_urlsafe(24)
    with ArmFake(make_test_pki(tmp_path / "pki"), (SUB,), TENANT, CLIENT_ID, secret) as f:
        f.add_resource_group(SUB, RG, LOC)
        yield f, secret


@pytest.fixture
def clients(fake: tuple[ArmFake, str]) -> dict[str, Any]:
    from azure.identity import ClientSecretCredential
    from azure.mgmt.compute import ComputeManagementClient
    from azure.mgmt.network import NetworkManagementClient
    from azure.mgmt.resource.resources import ResourceManagementClient

    arm, secret = fake
    credential = ClientSecretCredential(TENANT, CLIENT_ID, secret, authority=arm.url, disable_instance_discovery=True,
                                        connection_verify=str(arm.ca_file))
    kwargs = {"base_url": arm.url, "credential_scopes": [f"{arm.url}/.default"], "polling_interval": 0,
              "connection_verify": str(arm.ca_file)}
    return {"network": NetworkManagementClient(credential, SUB, **kwargs),
            "compute": ComputeManagementClient(credential, SUB, **kwargs),
            "resource": ResourceManagementClient(credential, SUB, **kwargs)}


def network(nc: Any) -> str:
    vnet = nc.virtual_networks.begin_create_or_update(RG, "net", {"location": LOC, "properties": {
        "addressSpace": {"addressPrefixes": ["10.0.0.0/16"]},
        "subnets": [{"name": "default", "properties": {"addressPrefix": "10.0.0.0/24"}}]}}).result()
    return f"{vnet.id}/subnets/default"


def machine(clients: dict[str, Any], name: str, subnet: str, delete_option: str = "") -> None:
    nc, cc = clients["network"], clients["compute"]
    extra = {"deleteOption": delete_option} if delete_option else {}
    pip = nc.public_ip_addresses.begin_create_or_update(RG, f"{name}-pip", {
        "location": LOC, "sku": {"name": "Standard"}, "properties": {"publicIPAllocationMethod": "Static", **extra}
    }).result()
    nic = nc.network_interfaces.begin_create_or_update(RG, f"{name}-nic", {"location": LOC, "properties": {
        "ipConfigurations": [{"name": "ipconfig1", "properties": {"subnet": {"id": subnet},
                                                                  "publicIPAddress": {"id": pip.id}}}]}}).result()
    ref: dict[str, Any] = {"id": nic.id, "properties": {"primary": True}}
    if delete_option:
        ref["properties"]["deleteOption"] = delete_option
    cc.virtual_machines.begin_create_or_update(RG, name, {"location": LOC, "properties": {
        "hardwareProfile": {"vmSize": "Standard_B2s"},
        "storageProfile": {"imageReference": {"publisher": "Canonical", "offer": "o", "sku": "s", "version": "latest"},
                           "osDisk": {"name": f"{name}-osdisk", "createOption": "FromImage", "deleteOption": "Delete"}},
        "osProfile": {"computerName": name, "adminUsername": "azureuser", "linuxConfiguration": {
            "disablePasswordAuthentication": True, "ssh": {"publicKeys": [
                {"path": "/home/azureuser/.ssh/authorized_keys", "keyData": "ssh-ed25519 AAAA"}]}}},
        "networkProfile": {"networkInterfaces": [ref]}}}).result()


def test_names_and_tags_follow_the_naming_rules(fake: tuple[ArmFake, str], clients: dict[str, Any]) -> None:
    from azure.core.exceptions import HttpResponseError

    nc, rc = clients["network"], clients["resource"]
    for bad_name in ("-nsg", "nsg.", "n" * 81, "a b"):
        with pytest.raises(HttpResponseError) as err:
            nc.network_security_groups.begin_create_or_update(RG, bad_name, {"location": LOC}).result()
        assert err.value.error.code == "InvalidResourceName"
    nc.network_security_groups.begin_create_or_update(RG, "n" * 80, {"location": LOC}).result()
    for tags in ({"a/b": "v"}, {"k<": "v"}, {"k" * 513: "v"}, {"k": "v" * 257},
                 {f"t{i}": "v" for i in range(51)}):
        with pytest.raises(HttpResponseError):
            rc.resource_groups.create_or_update("tagged", {"location": LOC, "tags": tags})
    rc.resource_groups.create_or_update("tagged", {"location": LOC, "tags": {
        **{f"t{i}": "v" for i in range(49)}, "k" * 512: "v" * 256}})
    with pytest.raises(HttpResponseError):
        rc.resource_groups.create_or_update("ends-with-a-period.", {"location": LOC})


def test_nic_reserved_after_its_vm_unless_deleted_with_it(fake: tuple[ArmFake, str], clients: dict[str, Any]) -> None:
    from azure.core.exceptions import HttpResponseError

    arm, _ = fake
    arm.nic_reservation = 1.0
    nc, cc = clients["network"], clients["compute"]
    subnet = network(nc)
    machine(clients, "old", subnet)  # deleteOption left out: Detach
    machine(clients, "new", subnet, "Delete")
    cc.virtual_machines.begin_delete(RG, "old").result()
    cc.virtual_machines.begin_delete(RG, "new").result()
    left = arm.inventory()
    assert left["networkInterfaces"] == ["old-nic"] and left["publicIPAddresses"] == ["old-pip"]
    assert "disks" not in left  # the OS disks' deleteOption: Delete
    with pytest.raises(HttpResponseError) as err:
        nc.network_interfaces.begin_delete(RG, "old-nic")
    assert err.value.status_code == 400 and err.value.error.code == "NicReservedForAnotherVm"
    time.sleep(1.1)
    nc.network_interfaces.begin_delete(RG, "old-nic").result()
    nc.public_ip_addresses.begin_delete(RG, "old-pip").result()
    assert arm.inventory() == {"resourceGroups": [RG], "virtualNetworks": ["net"]}


def test_unregistered_namespaces_answer_409_until_registered(fake: tuple[ArmFake, str],
                                                             clients: dict[str, Any]) -> None:
    from azure.core.exceptions import HttpResponseError

    arm, _ = fake
    arm.unregister(SUB, "Microsoft.Network")
    rc = clients["resource"]
    assert rc.providers.get("Microsoft.Network").registration_state == "NotRegistered"
    arm.may_register = False
    with pytest.raises(HttpResponseError) as err:  # the SDK's own registration attempt is refused too
        clients["network"].virtual_networks.get(RG, "net")
    assert err.value.status_code == 409 and err.value.error.code == "MissingSubscriptionRegistration"
    with pytest.raises(HttpResponseError) as err:
        rc.providers.register("Microsoft.Network")
    assert err.value.status_code == 403
    arm.may_register = True
    assert rc.providers.register("Microsoft.Network").registration_state == "Registering"
    assert rc.providers.get("Microsoft.Network").registration_state == "Registered"
    assert list(clients["network"].virtual_networks.list(RG)) == []
