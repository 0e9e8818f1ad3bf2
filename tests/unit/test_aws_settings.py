"""The aws provider's pure parts: settings validation, batching, tokens, subnet layout and the
security group rule bookkeeping (no SDK calls; those are tested against moto in tests/e2e/test_aws.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from dcx.providers.aws import AwsSettings, arch_of, batches, client_token
from dcx.providers.aws_network import AwsNetwork, _is_mesh, _managed, permissions_of, rules
from dcx.providers.base import NodeRequest


def reqs(*indices: int) -> list[NodeRequest]:
    return [NodeRequest(f"c-p-{i}", "p", "worker", i) for i in indices]


def test_defaults_and_bad_values_are_rejected() -> None:
    s = AwsSettings()
    assert (s.instanceType, s.sshAddress, s.rootVolumeGiB, s.vpcCIDR) == ("t3.small", "public", 20, "10.0.0.0/16")
    for bad, field in (({"image": "ubuntu"}, "image"), ({"region": "useast1"}, "region"),
                       ({"subnet": "sn-1"}, "subnet"), ({"vpc": "vpc_1"}, "vpc"),
                       ({"vpcCIDR": "10.0.0.0/8"}, "vpcCIDR"),
                       ({"sshAddress": "both"}, "sshAddress"), ({"rootVolumeGiB": 2}, "rootVolumeGiB"),
                       ({"tags": {"dcx:cluster": "x"}}, "tags"), ({"tags": {"Name": "x"}}, "tags"),
                       ({"instanceType": "t3"}, "instanceType"), ({"zone": "us-east-1a"}, "zone")):
        with pytest.raises(ValidationError) as err:
            AwsSettings.model_validate(bad)
        assert err.value.errors()[0]["loc"][:1] == (field,), (bad, err.value)
    with pytest.raises(ValidationError, match="inside vpcCIDR"):
        AwsSettings(vpcCIDR="10.214.16.0/20", subnetCIDR="10.214.40.0/24")
    with pytest.raises(ValidationError, match="needs publicIP"):
        AwsSettings(sshAddress="public", publicIP=False)
    assert AwsSettings(image="ami-0123456789abcdef0", tags={"team": "a"}).image == "ami-0123456789abcdef0"


def test_arch_follows_the_instance_family() -> None:
    assert [arch_of(t) for t in ("t3.small", "t4g.small", "m7gd.large", "c6gn.xlarge", "a1.medium", "g5.xlarge",
                                 "im4gn.large", "m5dn.large", "inf2.xlarge")] == \
        ["amd64", "arm64", "arm64", "arm64", "arm64", "amd64", "arm64", "amd64", "amd64"]


def test_batches_are_runs_of_consecutive_indices() -> None:
    got = [[r.index for r in b] for b in batches(reqs(7, 1, 2, 3, 5))]
    assert got == [[1, 2, 3], [5], [7]]
    big = batches(reqs(*range(1, 1202)))
    assert [len(b) for b in big] == [500, 500, 201] and big[1][0].index == 501


def test_client_token_is_stable_and_distinct() -> None:
    t = client_token("id1", "p", 1, 3, "subnet-1")
    assert t == client_token("id1", "p", 1, 3, "subnet-1") and len(t) <= 64
    assert len({t, client_token("id2", "p", 1, 3, "subnet-1"), client_token("id1", "q", 1, 3, "subnet-1"),
                client_token("id1", "p", 1, 4, "subnet-1"), client_token("id1", "p", 1, 3, "subnet-2")}) == 5


def test_subnets_of_the_cluster_vpc_follow_each_other() -> None:
    net = AwsNetwork.__new__(AwsNetwork)
    s = AwsSettings(vpcCIDR="10.214.16.0/20", subnetCIDR="10.214.16.0/24")
    assert [net.subnet_cidr(s, i) for i in range(3)] == ["10.214.16.0/24", "10.214.17.0/24", "10.214.18.0/24"]
    assert net.subnet_cidr(AwsSettings(), 1) == "10.0.16.0/20"
    assert net.subnet_cidr(AwsSettings(vpcCIDR="10.214.16.0/20"), 0) == "10.214.16.0/24"


def test_rules_round_trip_and_ownership() -> None:
    wanted = {("tcp", 22, 22, "192.0.2.7/32"), ("-1", None, None, "sg-1"), ("udp", 51820, 51820, "198.51.100.1/32")}
    perms = permissions_of(wanted)
    assert rules(perms) == wanted
    assert all("0.0.0.0/0" not in str(p) for p in perms)
    assert {r for r in wanted if _managed(r, "sg-1")} == {("tcp", 22, 22, "192.0.2.7/32"), ("-1", None, None, "sg-1")}
    assert {r for r in wanted if _is_mesh(r)} == {("udp", 51820, 51820, "198.51.100.1/32")}


def test_ssh_cidr_defaults() -> None:
    """sshCIDR as given; for private addresses the VPC's range; never a silent 0.0.0.0/0."""
    net = AwsNetwork.__new__(AwsNetwork)
    site = SimpleNamespace(vpc_cidrs=["10.214.16.0/20"])
    net.ctx = SimpleNamespace(network=SimpleNamespace(sshCIDR="192.0.2.7, 198.51.100.0/24"), log=None)
    assert net.ssh_cidrs(site, AwsSettings()) == ["192.0.2.7/32", "198.51.100.0/24"]
    net.ctx = SimpleNamespace(network=SimpleNamespace(sshCIDR=""), log=None)
    assert net.ssh_cidrs(site, AwsSettings(sshAddress="private", publicIP=False)) == ["10.214.16.0/20"]
