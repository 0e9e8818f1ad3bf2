"""The aws provider's checks of what it sends (descriptions, tags, tokens, image owners) and the local
provider's find_clusters; the API behaviour is tested against moto + tests/fakes/aws_strict.py."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from dcx.errors import ProviderError
from dcx.providers import aws_network
from dcx.providers.aws import CANONICAL, canonical_owner, client_token
from dcx.providers.aws_api import checked_tags, ec2_text
from tests.testbed.journal import MemoryJournal


def test_every_description_dcx_sends_is_valid_for_ec2() -> None:
    """The constants rule descriptions are made of, and the check itself (EC2 API reference, IpRange
    Description: a-zA-Z0-9, space and ._-:/()#,@[]+=&;{}!$*, up to 255)."""
    for text in (aws_network.SELF_RULE, aws_network.SSH_RULE, aws_network.API_RULE, aws_network.MESH_RULE):
        assert ec2_text(text, "rule") == text
    rules = {("tcp", 22, 22, "192.0.2.7/32"), ("-1", None, None, "sg-1"), ("udp", 1, 1, "2001:db8::/64"),
             ("tcp", 6443, 6443, "192.0.2.0/24")}
    descriptions = [r["Description"] for p in aws_network.permissions_of(rules)
                    for kind in ("IpRanges", "Ipv6Ranges", "UserIdGroupPairs") for r in p.get(kind, [])]
    assert len(descriptions) == 4 and len(set(descriptions)) == 4
    with pytest.raises(ProviderError, match=r"characters \"'\" are not allowed"):
        ec2_text("the cluster's nodes", "rule description")
    with pytest.raises(ProviderError, match="over 255"):
        ec2_text("x" * 256, "rule description")
    assert ec2_text("ok ._-:/()#,@[]+=&;{}!$*", "d")


def test_tags_dcx_sends_are_checked() -> None:
    assert checked_tags({"k" * 128: "v" * 256}) == {"k" * 128: "v" * 256}
    for bad in ({"aws:x": "v"}, {"AWS:x": "v"}, {"": "v"}, {"k" * 129: "v"}, {"k": "v" * 257}):
        with pytest.raises(ProviderError):
            checked_tags(bad)


def test_canonical_owner_per_partition() -> None:
    assert canonical_owner("us-east-1") == CANONICAL == "099720109477"
    assert canonical_owner("us-gov-west-1") == "513442679011"
    assert canonical_owner("cn-northwest-1") == "837727238323"


def test_client_token_changes_with_the_generation() -> None:
    tokens = {client_token("id", "p", 1, 3, "subnet-1", g) for g in range(3)}
    assert len(tokens) == 3 and all(re.fullmatch(r"[0-9a-f]{64}", t) for t in tokens)
    assert client_token("id", "p", 1, 3, "subnet-1") == client_token("id", "p", 1, 3, "subnet-1", 0)


def test_local_find_clusters_lists_each_id_of_the_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dcx.providers import local

    monkeypatch.setattr(local, "REGISTRY", tmp_path)
    for ns, cluster, cid in (("dcx-a1-n1", "web", "a1"), ("dcx-a1-n2", "web", "a1"), ("dcx-b2-n1", "web", "b2"),
                             ("dcx-c3-n1", "db", "c3")):
        (tmp_path / f"{ns}.json").write_text(json.dumps({"cluster": cluster, "cluster_id": cid, "netns": ns}))
    ctx = MemoryJournal().context("web", "", tmp_path, log=logging.getLogger("t"))
    found = local.LocalProvider(ctx).find_clusters([])
    assert [(c.id, c.name, c.provider) for c in found] == [("a1", "web", "local"), ("b2", "web", "local")]
    assert all(c.created and c.created_by for c in found)
