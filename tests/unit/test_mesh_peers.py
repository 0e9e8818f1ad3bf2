"""Which addresses each provider's firewall lets in on the mesh port."""

from __future__ import annotations

from dcx.lifecycle.apply import mesh_peers
from dcx.providers.base import Node
from dcx.spec import ClusterSpec


def spec(mesh: str, providers: list[str]) -> ClusterSpec:
    pools = [{"name": f"p{i}", "role": "control" if i == 0 else "worker", "count": 1, "provider": p}
             for i, p in enumerate(providers)]
    return ClusterSpec.model_validate({"apiVersion": "dcx/v1", "kind": "Cluster", "metadata": {"name": "c"},
                                       "spec": {"network": {"mesh": mesh}, "pools": pools}})


def node(name: str, provider: str, network: str, public: str) -> Node:
    return Node(name=name, pool="p", provider=provider, role="worker", ssh_address=f"ssh-{name}",
                public_address=public, network=network)


def test_each_provider_lets_in_the_other_providers_nodes() -> None:
    nodes = [node("a1", "aws", "aws:eu:vpc-1", "203.0.113.1"), node("a2", "aws", "aws:eu:vpc-1", "203.0.113.2"),
             node("g1", "gcp", "gcp:p/net", "198.51.100.1"), node("s1", "ssh", "ssh:lab", "")]
    peers = mesh_peers(spec("auto", ["aws", "gcp", "ssh"]), nodes)
    assert peers == {"aws": ["198.51.100.1", "ssh-s1"], "gcp": ["203.0.113.1", "203.0.113.2", "ssh-s1"],
                     "ssh": ["198.51.100.1", "203.0.113.1", "203.0.113.2"]}


def test_a_provider_in_two_networks_lets_in_its_own_nodes_too() -> None:
    nodes = [node("a1", "aws", "aws:eu:vpc-1", "203.0.113.1"), node("a2", "aws", "aws:us:vpc-9", "203.0.113.2")]
    assert mesh_peers(spec("auto", ["aws"]), nodes) == {"aws": ["203.0.113.1", "203.0.113.2"]}


def test_one_network_or_no_mesh_opens_nothing() -> None:
    one = [node("a1", "aws", "aws:eu:vpc-1", "203.0.113.1"), node("a2", "aws", "aws:eu:vpc-1", "203.0.113.2")]
    assert mesh_peers(spec("auto", ["aws"]), one) == {}
    two = one + [node("g1", "gcp", "gcp:p/net", "198.51.100.1")]
    assert mesh_peers(spec("none", ["aws", "gcp"]), two) == {}
