"""Bare metal over SSH end to end: an Ansible INI inventory (children groups, group vars, a host
range, a bastion) describing a non-root login with passwordless sudo, one whose sudo needs a
password, and two hosts reachable only through a bastion -> a real swarm; host-key checks; reset."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcx.netns import LoginUser
from tests.testbed.lab import Lab
from tests.testbed.local import Dcx, skip_without_namespace_nodes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
SUDO_PASSWORD = "correct-horse-battery"


@pytest.fixture
def rack() -> Iterator[Lab]:
    skip_without_namespace_nodes()
    lab = Lab("bm")
    try:
        lab.network("lan", "10.214.10.0/24", operator_ip="10.214.10.1")
        lab.network("dark", "10.214.20.0/24")  # no address of the operator's: not routed from here
        lab.host("bastion", "lan", "10.214.10.10", extra=[("dark", "10.214.20.1")], forward=True)
        lab.host("mgr", "lan", "10.214.10.11", gateway="10.214.10.10", users=[LoginUser("ops")])
        lab.host("wpw", "lan", "10.214.10.12", gateway="10.214.10.10",
                 users=[LoginUser("deploy", sudo="password", password=SUDO_PASSWORD)])
        lab.host("dark1", "dark", "10.214.20.21", gateway="10.214.20.1")
        lab.host("dark2", "dark", "10.214.20.22", gateway="10.214.20.1")
        yield lab
    finally:
        lab.close()


def write_files(lab: Lab, tmp: Path) -> tuple[Path, Path]:
    inventory = tmp / "hosts.ini"
    inventory.write_text(f"""\
[managers]
mgr ansible_host=10.214.10.11 ansible_user=ops

[lan_workers]
wpw ansible_host=10.214.10.12 ansible_user=deploy ansible_become=yes

[dark]
10.214.20.[21:22]

[dark:vars]
ansible_user=root
ansible_ssh_common_args='-o ProxyCommand="ssh -W %h:%p -q root@10.214.10.10"'

[workers:children]
lan_workers
dark

[all:vars]
ansible_ssh_private_key_file={lab.key}
ansible_python_interpreter=/usr/bin/python3
""")
    spec = tmp / "cluster.yaml"
    spec.write_text("""\
apiVersion: dcx/v1
kind: Cluster
metadata: {name: rack}
spec:
  pools:
    - {name: control, role: control, provider: ssh, ssh: {inventory: hosts.ini, group: managers, network: lab}}
    - {name: workers, role: worker, provider: ssh, ssh: {inventory: hosts.ini, group: workers, network: lab},
       labels: {tier: metal}}
""")
    return inventory, spec


def test_ansible_inventory_to_swarm_and_back(rack: Lab, tmp_path: Path) -> None:
    cli = Dcx(tmp_path / "home")
    cli.env["DCX_NO_SSH_CONFIG"] = "1"
    inventory, spec = write_files(rack, tmp_path)

    # `inventory check` sees every host, the sudo-with-password one included.
    check = subprocess.run(cli.argv("inventory", "check", str(inventory), "-K", "-o", "json"), input=SUDO_PASSWORD,
                           capture_output=True, text=True, env=cli.env, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    rows = {r["name"]: r for r in json.loads(check.stdout)}
    assert sorted(rows) == ["10.214.20.21", "10.214.20.22", "mgr", "wpw"]
    assert all(r["reachable"] and r["sudo"] and r["docker"] for r in rows.values())
    assert abs(rows["mgr"]["clock_offset_s"]) < 5

    def create(ask: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cli.argv("cluster", "create", "-f", str(spec), *(["-K"] if ask else [])),
                              input=SUDO_PASSWORD + "\n" if ask else "", capture_output=True, text=True, env=cli.env,
                              timeout=600)

    try:
        r = create()
        assert r.returncode == 0, r.stdout + r.stderr
        assert SUDO_PASSWORD not in r.stdout + r.stderr
        logs = list((tmp_path / "home" / "clusters" / "rack" / "logs").glob("*.log"))
        assert logs and not any(SUDO_PASSWORD in p.read_text() for p in logs)
        status = cli.json("cluster", "status", "rack")
        assert status["healthy"] is True, json.dumps(status)
        assert {n["name"]: n["role"] for n in status["nodes"]} == {
            "mgr": "control", "wpw": "worker", "10.214.20.21": "worker", "10.214.20.22": "worker"}
        labels = cli.run("node", "ssh", "rack", "mgr", "--",
                         "sudo docker node inspect wpw --format '{{json .Spec.Labels}}'").stdout
        assert json.loads(labels)["tier"] == "metal"

        # A re-run changes nothing.
        again = create()
        assert again.returncode == 0, again.stderr
        assert "==> Join workers (3 hosts)\n    0 changed, 3 unchanged" in again.stdout

        # Without -K, the host whose sudo needs a password fails, and the message says what to do.
        no_password = create(ask=False)
        assert no_password.returncode == 1
        assert "hint: sudo on wpw needs a password: pass -K/--ask-become-pass" in no_password.stderr, no_password.stderr

        # From here the inventory holds the sudo password (as Ansible inventories may): no -K needed,
        # and it is kept nowhere.
        inventory.write_text(inventory.read_text().replace(
            "ansible_become=yes", f"ansible_become=yes ansible_become_password={SUDO_PASSWORD}"))

        # The machine behind 10.214.20.21 is rebuilt with a new host key: dcx refuses, then is told.
        rack.rekey("dark1")
        refused = create(ask=False)
        assert refused.returncode == 1
        assert "host key of 10.214.20.21 (root@10.214.20.21:22) changed" in refused.stderr
        assert "dcx node forget-key CLUSTER 10.214.20.21" in refused.stderr
        cli.run("node", "forget-key", "rack", "10.214.20.21", check=True)
        r = create(ask=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert SUDO_PASSWORD not in r.stdout + r.stderr
        assert not any(SUDO_PASSWORD in p.read_text(errors="replace")
                       for p in (tmp_path / "home").rglob("*") if p.is_file())
    finally:
        destroy = subprocess.run(cli.argv("cluster", "destroy", "rack", "--yes", "-K"), input=SUDO_PASSWORD + "\n",
                                 capture_output=True, text=True, env=cli.env, timeout=300)
    assert destroy.returncode == 0, destroy.stdout + destroy.stderr

    # The machines stay reachable, out of the swarm, without dcx's files; docker stays (no --purge).
    for name in ("mgr", "wpw", "dark1", "dark2"):
        swarm = rack.inside(name, "docker info --format '{{.Swarm.LocalNodeState}}'; test -e /etc/dcx && echo left")
        assert swarm.stdout.split() == ["inactive"], (name, swarm.stdout, swarm.stderr)
    again = subprocess.run(cli.argv("inventory", "check", str(inventory), "-K", "-o", "json"), input=SUDO_PASSWORD,
                           capture_output=True, text=True, env=cli.env, timeout=120)
    rows = {r["name"]: r for r in json.loads(again.stdout)}
    # The rebuilt machine's new key was accepted for the cluster, not for `inventory check`'s own record.
    assert "changed" in rows.pop("10.214.20.21")["error"]
    assert all(r["reachable"] for r in rows.values()), again.stdout


@pytest.fixture
def behind_bastion(tmp_path: Path) -> Iterator[tuple[Lab, dict[str, Path]]]:
    """A bastion on the operator's network and one host behind it that accepts only two keys: one
    encrypted with a passphrase, one that will live only in an ssh-agent."""
    skip_without_namespace_nodes()
    keys = {}
    for name, passphrase in (("encrypted", KEY_PASSPHRASE), ("agent", "")):
        keys[name] = tmp_path / f"id_{name}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", name, "-f", str(keys[name])],
                       check=True)
    lab = Lab("oc")
    try:
        lab.network("lan", "10.214.30.0/24", operator_ip="10.214.30.1")
        lab.network("dark", "10.214.31.0/24")
        lab.host("bastion", "lan", "10.214.30.10", extra=[("dark", "10.214.31.1")], forward=True)
        lab.host("deep", "dark", "10.214.31.21", gateway="10.214.31.1",
                 keys=[(keys[k].with_suffix(".pub")).read_text().strip() for k in keys])
        yield lab, keys
    finally:
        lab.close()


KEY_PASSPHRASE = "tr0ub4dor&3 with spaces"


def test_openssh_config_agent_and_encrypted_keys(behind_bastion: tuple[Lab, dict[str, Path]], tmp_path: Path) -> None:
    """Hosts named only by ~/.ssh/config aliases (HostName, User, IdentityFile, a ProxyJump through a
    bastion matched by a Host pattern), one logging in with an encrypted key, one through ssh-agent."""
    lab, keys = behind_bastion
    config = tmp_path / "ssh_config"
    config.write_text(f"""\
Host bastion
  HostName 10.214.30.10
  User root
  IdentityFile {lab.key}
Host deep-*
  User root
  ProxyJump bastion
Host deep-enc
  HostName 10.214.31.21
  IdentityFile {keys["encrypted"]}
Host deep-agent
  HostName 10.214.31.21
""")
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[rack]\ndeep-enc\ndeep-agent\n")
    cli = Dcx(tmp_path / "home")
    cli.env.update(DCX_NO_SSH_CONFIG="1", DCX_SSH_CONFIG=str(config), HOME=str(tmp_path))  # no default keys
    cli.env.pop("SSH_AUTH_SOCK", None)
    cli.env.pop("DCX_SSH_KEY_PASSPHRASE", None)

    shown = {r["name"]: r for r in cli.json("inventory", "show", str(inventory))}
    assert shown["deep-enc"]["address"] == "10.214.31.21" and shown["deep-enc"]["user"] == "root"
    assert shown["deep-enc"]["jumps"] == ["root@10.214.30.10:22"]

    # Without the passphrase or the agent, neither logs in, and each says why.
    rows = {r["name"]: r for r in cli.json("inventory", "check", str(inventory))}
    assert "encrypted" in rows["deep-enc"]["error"], rows
    assert not rows["deep-agent"]["reachable"] and "no key to offer" in rows["deep-agent"]["error"], rows

    agent = subprocess.run(["ssh-agent", "-s"], capture_output=True, text=True, check=True).stdout
    env = dict(line.split(";")[0].split("=", 1) for line in agent.splitlines() if line.startswith("SSH_"))
    try:
        subprocess.run(["ssh-add", "-q", str(keys["agent"])], env={**cli.env, **env}, check=True,
                       capture_output=True)
        keys["agent"].unlink()  # from now on only the agent holds it
        cli.env.update(env, DCX_SSH_KEY_PASSPHRASE=KEY_PASSPHRASE)
        check = cli.run("inventory", "check", str(inventory), "-o", "json")
        assert check.returncode == 0, check.stdout + check.stderr
        rows = {r["name"]: r for r in json.loads(check.stdout)}
        assert rows["deep-enc"]["reachable"] and rows["deep-agent"]["reachable"], rows
        assert KEY_PASSPHRASE not in check.stdout + check.stderr
    finally:
        subprocess.run(["kill", env["SSH_AGENT_PID"]], capture_output=True)
