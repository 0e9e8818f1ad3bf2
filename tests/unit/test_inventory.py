"""Inventories: Ansible INI and YAML read as Ansible reads them, dcx's own format, located errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from dcx.errors import SpecError
from dcx.inventory import expand_range, load_inventory, parse_inventory_text, proxy_jump_from_args

HERE = Path(__file__).parent / "inventories"


def summary(path: Path, group: str | None = None) -> list[tuple]:
    return [(h.name, h.address, h.port, h.user, h.private_key_file, h.become, h.proxy_jump, h.vars.get("tier"),
             h.vars.get("rack"), h.mesh_endpoint, tuple(h.groups)) for h in load_inventory(path, group)]


def test_ini_inventory_as_ansible_reads_it() -> None:
    hosts = {h.name: h for h in load_inventory(HERE / "lab.ini")}
    assert list(hosts) == ["mgr1.dc1", "web01.dc1", "web02.dc1", "web03.dc1", "db-a.dc1",
                           "10.0.9.1", "10.0.9.2", "10.0.9.3"]
    assert hosts["mgr1.dc1"].address == "10.0.1.10" and hosts["mgr1.dc1"].user == "ops"
    # host var > child group (web) > parent group (workers) > all
    assert (hosts["web02.dc1"].user, hosts["web02.dc1"].vars["tier"]) == ("deploy", "frontend")
    assert (hosts["db-a.dc1"].user, hosts["db-a.dc1"].vars["tier"]) == ("admin", "worker")
    assert hosts["10.0.9.2"].user == "root"  # [private:vars] beats [all:vars]
    assert hosts["db-a.dc1"].port == 2222 and hosts["db-a.dc1"].become is True
    assert hosts["web01.dc1"].private_key_file == str(Path("~/.ssh/lab_ed25519").expanduser())
    assert hosts["10.0.9.1"].proxy_jump == "admin@bastion.example"
    assert hosts["mgr1.dc1"].mesh_endpoint == "203.0.113.9:51820"
    assert hosts["mgr1.dc1"].vars["ansible_python_interpreter"] == "/usr/bin/python3"  # kept, ignored
    assert hosts["web01.dc1"].groups == ["all", "workers", "web"]


def test_yaml_inventory_gives_the_same_hosts() -> None:
    assert summary(HERE / "lab.yaml") == summary(HERE / "lab.ini")
    assert summary(HERE / "lab.yaml", "workers") == summary(HERE / "lab.ini", "workers")


def test_groups_select_hosts_with_their_children() -> None:
    assert [h.name for h in load_inventory(HERE / "lab.ini", "managers")] == ["mgr1.dc1"]
    assert [h.name for h in load_inventory(HERE / "lab.ini", "db")] == ["db-a.dc1"]
    assert len(load_inventory(HERE / "lab.ini", "workers")) == 7


def test_passwords_never_show_in_repr() -> None:
    db = load_inventory(HERE / "lab.ini", "db")[0]
    assert db.become_password == "s3cr3t-pass"
    assert "s3cr3t-pass" not in repr(db) and "s3cr3t-pass" not in str(db)


def test_group_priority_and_name_order_at_equal_depth() -> None:
    text = "[a]\nh1\n[b]\nh1\n[a:vars]\nx=from-a\n[b:vars]\nx=from-b\n"
    assert parse_inventory_text(text, "inv")[0].vars["x"] == "from-b"  # same depth: later name wins
    text += "ansible_group_priority=0\n"
    assert parse_inventory_text(text, "inv")[0].vars["x"] == "from-a"  # b now has the lower priority


def test_inline_values_are_literals_group_values_strings() -> None:
    text = "[g]\nh1 count=3 flag=True name=plain\n[g:vars]\nport_text=22\n"
    h = parse_inventory_text(text, "inv")[0]
    assert h.vars["count"] == 3 and h.vars["flag"] is True and h.vars["name"] == "plain"
    assert h.vars["port_text"] == "22"


def test_ungrouped_hosts_and_port_suffix() -> None:
    hosts = parse_inventory_text("lonely.example:2200\n[g]\nother\n", "inv")
    assert (hosts[0].name, hosts[0].port, hosts[0].groups) == ("lonely.example", 2200, ["all"])


@pytest.mark.parametrize(("pattern", "expected"), [
    ("node[01:03].dc1", ["node01.dc1", "node02.dc1", "node03.dc1"]),
    ("10.0.0.[1:3]", ["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
    ("db-[a:c]", ["db-a", "db-b", "db-c"]),
    ("n[1:9:4]", ["n1", "n5", "n9"]),
    ("r[1:2]-n[1:2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
])
def test_host_ranges(pattern: str, expected: list[str]) -> None:
    assert expand_range(pattern, "inv", 1) == expected


@pytest.mark.parametrize(("args", "jump"), [
    ('-o ProxyCommand="ssh -W %h:%p -q admin@bastion.example"', "admin@bastion.example"),
    ('-o ProxyCommand="ssh -W %h:%p -p 2222 ops@jump"', "ops@jump:2222"),
    ("-J jump1,jump2", "jump1,jump2"),
    ("-o ProxyJump=ops@gw:2200 -o StrictHostKeyChecking=no", "ops@gw:2200"),
    ("-o ServerAliveInterval=5", ""),
])
def test_proxy_jump_from_ssh_args(args: str, jump: str) -> None:
    assert proxy_jump_from_args(args) == jump


def test_dcx_inventory(tmp_path: Path) -> None:
    inv = tmp_path / "hosts.yaml"
    inv.write_text("apiVersion: dcx/v1\nkind: Inventory\nhosts:\n"
                   "  - {name: n1, address: 10.1.0.1, user: ops, become: true, groups: [rack1], "
                   "meshEndpoint: '198.51.100.7:51820', labels: {zone: a}}\n"
                   "  - {name: n2, address: 10.1.0.2, groups: [rack2]}\n")
    hosts = load_inventory(inv, "rack1")
    assert [(h.name, h.address, h.user, h.become, h.mesh_endpoint, h.labels) for h in hosts] == [
        ("n1", "10.1.0.1", "ops", True, "198.51.100.7:51820", {"zone": "a"})]
    assert len(load_inventory(inv)) == 2


MALFORMED = [
    ("bad section header", "[web\nh1\n", 1, "section", "is not a section header"),
    ("unknown section kind", "[web:hostvars]\nh1\n", 1, "[web:hostvars]", "unknown section kind 'hostvars'"),
    ("group its own child", "[g:children]\ng\n", 2, "[g:children]", "a group cannot be its own child"),
    ("children cycle", "[a:children]\nb\n[b:children]\na\n[a]\nh\n", 2, "group b",
     "children form a cycle: a -> b -> a"),
    ("vars line without =", "[g]\nh1\n[g:vars]\njust_a_word\n", 4, "[g:vars]", "'just_a_word' is not key=value"),
    ("host token without =", "[g]\nh1 ansible_user\n", 2, "host h1", "'ansible_user' is not key=value"),
    ("range that runs backwards", "[g]\nnode[9:1]\n", 2, "host node[9:1]", "starts after it ends"),
    ("range of mixed kinds", "[g]\nnode[a:3]\n", 2, "host node[a:3]", "must be numbers or single letters"),
    ("port not a number", "[g]\nh1 ansible_port=abc\n", 2, "host h1: ansible_port", "'abc' is not a port"),
    ("port out of range", "[g]\nh1 ansible_port=70000\n", 2, "host h1: ansible_port", "'70000' is not a port"),
    ("become not a boolean", "[g]\nh1 ansible_become=maybe\n", 2, "host h1: ansible_become", "is not a boolean"),
    ("yaml hosts as a list", "all:\n  children:\n    g:\n      hosts:\n        - h1\n", 4, "all.children.g.hosts",
     "must be a mapping of host names"),
    ("yaml unknown group key", "all:\n  hostz:\n    h1:\n", 2, "all.hostz", "unknown group key"),
    ("dcx unknown field", "apiVersion: dcx/v1\nkind: Inventory\nhosts:\n  - {name: n1, adress: x}\n", 4,
     "hosts[0].adress", "unknown field"),
    ("dcx missing name", "apiVersion: dcx/v1\nkind: Inventory\nhosts:\n  - {address: 10.0.0.1}\n", 4,
     "hosts[0].name", "is required"),
    ("dcx duplicate host", "apiVersion: dcx/v1\nkind: Inventory\nhosts:\n  - {name: a}\n  - {name: a}\n", 5,
     "hosts[1].name", "host 'a' is listed twice"),
    ("empty inventory", "# nothing here\n", None, "inventory", "has no hosts"),
    ("vaulted sudo password", "all:\n  hosts:\n    h1:\n      ansible_become_password: !vault |\n"
     "        $ANSIBLE_VAULT;1.1;AES256\n        6231\n", 3, "host h1: ansible_become_password",
     "is vault-encrypted or templated"),
    ("templated sudo password", "[g]\nh1 ansible_become_password='{{ vault_pw }}'\n", 2,
     "host h1: ansible_become_password", "is vault-encrypted or templated"),
]


@pytest.mark.parametrize(("text", "line", "field", "problem"), [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed_inventories_are_located(tmp_path: Path, text: str, line: int | None, field: str,
                                           problem: str) -> None:
    path = tmp_path / "hosts"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_inventory(path)
    where = f"{path}:{line}" if line else str(path)
    assert info.value.message.startswith(f"{where}: {field}: "), info.value.message
    assert problem in info.value.message


def test_unknown_group_lists_the_known_ones() -> None:
    with pytest.raises(SpecError) as info:
        load_inventory(HERE / "lab.ini", "rack9")
    assert "group rack9: no such group (groups: all, db, managers, private, web, workers)" in info.value.message
