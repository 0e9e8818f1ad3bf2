"""The cluster spec: valid files load; malformed ones fail with `file:line: field: problem`."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from dcx import spec
from dcx.errors import SpecError
from dcx.inventory import load_inventory
from dcx.plan import validate_provider_settings

ROOT = Path(__file__).resolve().parents[2]

VALID = """\
apiVersion: dcx/v1
kind: Cluster
metadata: {name: demo}
spec:
  engine: {type: swarm, version: ""}
  ssh: {user: root, port: 22, privateKey: ""}
  network: {mesh: auto, meshCIDR: 100.96.0.0/16, sshCIDR: ""}
  pools:
    - name: control
      role: control
      count: 1
      provider: local
      local: {subnet: 10.213.0.0/24}
      labels: {tier: core}
    - name: workers
      role: worker
      count: 2
      provider: local
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cluster.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_the_documented_shape_loads(tmp_path: Path) -> None:
    s = spec.load(write(tmp_path, VALID))
    assert s.name == "demo"
    assert [p.name for p in s.spec.pools] == ["control", "workers"]
    assert s.spec.pools[0].settings == {"subnet": "10.213.0.0/24"}
    assert s.spec.network.meshCIDR == "100.96.0.0/16"
    validate_provider_settings(s)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_examples_load(name: str) -> None:
    s = spec.load(ROOT / "examples" / name)
    validate_provider_settings(s)
    for pool in s.spec.pools:
        if pool.provider == "ssh" and pool.settings.get("inventory"):
            hosts = load_inventory(s.base_dir / pool.settings["inventory"], pool.settings.get("group"))
            assert hosts, f"{name}: pool {pool.name} has no hosts in its inventory group"


def test_published_schema_is_current() -> None:
    """examples/ point yaml-language-server at schema/cluster.schema.json: it must match the code."""
    published = json.loads((ROOT / "schema" / "cluster.schema.json").read_text())
    assert published == spec.json_schema(), "regenerate it: dcx schema > schema/cluster.schema.json"


def replace(old: str, new: str) -> str:
    assert old in VALID, old
    return VALID.replace(old, new, 1)


MALFORMED = [
    # (description, text, expected line, expected field, expected problem)
    ("count below 1", replace("      count: 2\n", "      count: 0\n"), 17, "spec.pools[1].count", "must be >= 1"),
    ("count not a number", replace("      count: 2\n", "      count: two\n"), 17, "spec.pools[1].count",
     "must be an integer"),
    ("unknown role", replace("role: worker", "role: minion"), 16, "spec.pools[1].role",
     "must be one of: control, worker"),
    ("unknown engine", replace("type: swarm", "type: nomad"), 5, "spec.engine.type", "must be one of: swarm, k3s"),
    ("typo in a field", replace("      labels: {tier: core}\n", "      lables: {tier: core}\n"), 14,
     "spec.pools[0].lables", "unknown field; did you mean 'labels'?"),
    ("unknown field, nothing like it", replace("      labels: {tier: core}\n", "      zzz: {tier: core}\n"), 14,
     "spec.pools[0].zzz", "unknown field"),
    ("wrong apiVersion", replace("apiVersion: dcx/v1", "apiVersion: dcx/v2"), 1, "apiVersion",
     "must be one of: dcx/v1"),
    ("wrong kind", replace("kind: Cluster", "kind: Clutser"), 2, "kind", "must be one of: Cluster"),
    ("missing metadata name", replace("metadata: {name: demo}", "metadata: {}"), 3, "metadata.name", "is required"),
    ("uppercase cluster name", replace("name: demo}", "name: Demo}"), 3, "metadata.name",
     "must be lowercase letters, digits and '-', starting with a letter"),
    ("ssh port out of range", replace("port: 22,", "port: 70000,"), 6, "spec.ssh.port", "must be <= 65535"),
    ("bad mesh CIDR", replace("meshCIDR: 100.96.0.0/16", "meshCIDR: 100.96.0.0/30"), 7, "spec.network.meshCIDR",
     "must be an IPv4 network of /24 or larger"),
    ("mesh mode", replace("mesh: auto", "mesh: sometimes"), 7, "spec.network.mesh",
     "must be one of: auto, wireguard, none"),
    ("no pools", VALID.split("  pools:")[0] + "  pools: []\n", 8, "spec.pools", "must have at least 1 item(s)"),
    ("section of another provider", replace("      local: {subnet: 10.213.0.0/24}\n",
                                            "      aws: {region: eu-west-1}\n"), 9, "spec.pools[0]",
     "has a 'aws' section but provider is 'local'"),
    ("duplicate pool names", replace("name: workers", "name: control"), 8, "spec.pools",
     "pool names must be unique; repeated: control"),
    ("no control pool", replace("role: control", "role: worker"), 8, "spec.pools",
     "at least one pool must have role: control"),
    ("labels not a mapping", replace("labels: {tier: core}", "labels: [core]"), 14, "spec.pools[0].labels",
     "must be a mapping"),
    ("count missing", replace("      count: 2\n", ""), 15, "spec.pools[1]", "count is required"),
]


@pytest.mark.parametrize(("text", "line", "field", "problem"), [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed_specs_name_file_line_and_field(tmp_path: Path, text: str, line: int, field: str,
                                                  problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        spec.load(path)
    assert info.value.message == f"{path}:{line}: {field}: {problem}"


def test_invalid_yaml_is_located(tmp_path: Path) -> None:
    path = write(tmp_path, "apiVersion: dcx/v1\nkind: [Cluster\nmetadata: {}\n")
    with pytest.raises(SpecError) as info:
        spec.load(path)
    assert info.value.message.startswith(f"{path}:")
    assert "invalid YAML" in info.value.message
    assert info.value.line in (2, 3, 4)


def test_duplicate_keys_are_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("kind: Cluster\n", "kind: Cluster\nkind: Cluster\n"))
    with pytest.raises(SpecError) as info:
        spec.load(path)
    assert "invalid YAML" in info.value.message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        spec.load(tmp_path / "nope.yaml")
    assert info.value.message == f"{tmp_path / 'nope.yaml'}: file not found"


def test_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- just\n- a list\n")
    with pytest.raises(SpecError) as info:
        spec.load(path)
    assert info.value.line == 1


def test_provider_section_is_validated_by_the_provider(tmp_path: Path) -> None:
    path = write(tmp_path, replace("local: {subnet: 10.213.0.0/24}", "local: {subnet: 10.213.0.0/30}"))
    s = spec.load(path)
    with pytest.raises(SpecError) as info:
        validate_provider_settings(s)
    assert info.value.message == (f"{path}:13: spec.pools[0].local.subnet: "
                                  "must be an IPv4 network of /28 or larger")


def test_unknown_provider_is_located(tmp_path: Path) -> None:
    path = write(tmp_path, replace("      provider: local\n      local:", "      provider: openstack\n      local:")
                 .replace("      local: {subnet: 10.213.0.0/24}\n", ""))
    s = spec.load(path)
    with pytest.raises(SpecError) as info:
        validate_provider_settings(s)
    assert info.value.message.startswith(f"{path}:12: spec.pools[0].provider: unknown provider 'openstack'")


def test_json_schema_describes_the_spec() -> None:
    schema = spec.json_schema()
    assert schema["title"] == "dcx Cluster"
    assert set(schema["properties"]) == {"apiVersion", "kind", "metadata", "spec"}
    assert "PoolSpec" in schema["$defs"]


def test_node_names_are_stable() -> None:
    assert spec.node_name("demo", "workers", 3) == "demo-workers-3"
