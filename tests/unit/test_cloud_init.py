"""The cloud-init user-data dcx gives every cloud machine keeps the hostname dcx sets over SSH across
reboots. cloud-init's reference (modules "Set Hostname" / "Update Hostname" and "Update Etc Hosts"):
`preserve_hostname: false` lets cloud-init set the metadata's name again at every boot, over dcx's
/etc/hostname; `manage_etc_hosts: true` (or `localhost`) rewrites /etc/hosts at every boot, dropping
dcx's 127.0.1.1 line. The GCP and Azure e2e tests check the same on the user-data the fakes receive."""

from __future__ import annotations

from typing import Any

from ruamel.yaml import YAML

from dcx.templates import render

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample dcx-demo"


def keeps_dcx_hostname(user_data: dict[str, Any]) -> bool:
    """What a rebooted node needs: cloud-init leaves /etc/hostname and /etc/hosts to dcx."""
    return user_data.get("preserve_hostname") is True and user_data.get("manage_etc_hosts", False) is False


def test_user_data_keeps_the_hostname_dcx_sets_across_reboots() -> None:
    for user, disable_root in (("root", "false"), ("ubuntu", "true")):
        text = render("cloud-init.yaml", user=user, public_key=KEY, disable_root=disable_root)
        data = YAML(typ="safe").load(text)
        assert keeps_dcx_hostname(data), data
        assert "hostname" not in data and "fqdn" not in data  # one user-data serves a batch of machines


def test_the_check_tells_a_name_rewriting_user_data_apart() -> None:
    assert not keeps_dcx_hostname({"preserve_hostname": False})
    assert not keeps_dcx_hostname({"preserve_hostname": True, "manage_etc_hosts": True})
    assert not keeps_dcx_hostname({"preserve_hostname": True, "manage_etc_hosts": "localhost"})
    assert not keeps_dcx_hostname({})  # cloud-init's default is preserve_hostname: false
