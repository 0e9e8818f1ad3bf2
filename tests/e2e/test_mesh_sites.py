"""Hybrid fabric end to end: two sites that cannot reach each other's private addresses, each behind
a NAT router, joined into one swarm over dcx's WireGuard mesh.

    operator 10.214.100.1 ── "internet" 10.214.100.0/24 ──┬── ra 10.214.100.11 (NAT; forwards UDP 51820/1
                                                          │     and TCP 2201/2 to a1/a2) ── site A 10.214.1.0/24
                                                          └── rb 10.214.100.12 (NAT only; SSH bastion)
                                                                ── site B 10.214.2.0/24: b1, b2
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.testbed.lab import Lab
from tests.testbed.local import Dcx, skip_without_namespace_nodes, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.fixture
def sites() -> Iterator[Lab]:
    skip_without_namespace_nodes()
    lab = Lab("mesh")
    try:
        lab.network("inet", "10.214.100.0/24", operator_ip="10.214.100.1")
        lab.network("a", "10.214.1.0/24")
        lab.network("b", "10.214.2.0/24")
        lab.router("ra", ("inet", "10.214.100.11"), ("a", "10.214.1.1"), forwards=[
            ("udp", 51820, "10.214.1.11", 51820), ("udp", 51821, "10.214.1.12", 51820),
            ("tcp", 2201, "10.214.1.11", 22), ("tcp", 2202, "10.214.1.12", 22)])
        lab.router("rb", ("inet", "10.214.100.12"), ("b", "10.214.2.1"))
        lab.host("a1", "a", "10.214.1.11", gateway="10.214.1.1")
        lab.host("a2", "a", "10.214.1.12", gateway="10.214.1.1")
        lab.host("b1", "b", "10.214.2.21", gateway="10.214.2.1")
        lab.host("b2", "b", "10.214.2.22", gateway="10.214.2.1")
        yield lab
    finally:
        lab.close()


def spec_text(lab: Lab, name: str, mesh: str, site_b: list[str]) -> str:
    b_hosts = ", ".join(f"{{name: {h}, address: 10.214.2.{20 + int(h[1])}, proxyJump: root@10.214.100.12}}"
                        for h in site_b)
    return f"""\
apiVersion: dcx/v1
kind: Cluster
metadata: {{name: {name}}}
spec:
  ssh: {{user: root, privateKey: {lab.key}}}
  network: {{mesh: {mesh}}}
  pools:
    - name: control
      role: control
      provider: ssh
      ssh:
        network: site-a
        hosts: [{{name: a1, address: 10.214.100.11, port: 2201, meshEndpoint: "10.214.100.11:51820"}}]
    - name: workers-a
      role: worker
      provider: ssh
      ssh:
        network: site-a
        hosts: [{{name: a2, address: 10.214.100.11, port: 2202, meshEndpoint: "10.214.100.11:51821"}}]
    - name: workers-b
      role: worker
      provider: ssh
      ssh:
        network: site-b
        hosts: [{b_hosts}]
"""


def on(cli: Dcx, cluster: str, node: str, command: str) -> subprocess.CompletedProcess[str]:
    return cli.run("node", "ssh", cluster, node, "--", command, timeout=120)


def test_sites_behind_nat_form_one_swarm_over_the_mesh(sites: Lab, tmp_path: Path) -> None:
    cli = Dcx(tmp_path / "home")
    cli.env["DCX_NO_SSH_CONFIG"] = "1"
    name = "hybrid"
    spec = tmp_path / "cluster.yaml"
    spec.write_text(spec_text(sites, name, "auto", ["b1", "b2"]))
    try:
        r = cli.run("cluster", "create", "-f", str(spec), timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        status = cli.json("cluster", "status", name)
        assert status["healthy"] is True, status
        assert sorted(n["name"] for n in status["nodes"]) == ["a1", "a2", "b1", "b2"]
        assert status["mesh"] is True
        assert {n["name"]: (n["mesh"]["peers_up"], n["mesh"]["peers_expected"]) for n in status["nodes"]} == {
            "a1": (3, 3), "a2": (3, 3), "b1": (3, 3), "b2": (3, 3)}

        # Swarm carries its traffic on the mesh addresses.
        addrs = on(cli, name, "a1", "docker node inspect self --format '{{.Status.Addr}}'").stdout.strip()
        assert addrs.startswith("100.96."), addrs

        # A replicated service spans both sites; a task on site B reaches every task, site A's included.
        # MTU 1370: VXLAN's 50 bytes inside WireGuard's 1420.
        on(cli, name, "a1", "docker network create -d overlay --attachable --opt "
                            "com.docker.network.driver.mtu=1370 hy-net").check_returncode()
        cli.run("image", "import", name, "--busybox", "--tag", "dcx-hy/busybox:1", check=True)
        r = on(cli, name, "a1", "docker service create --detach --name web --replicas 4 --replicas-max-per-node 1 "
                                "--endpoint-mode dnsrr --network hy-net dcx-hy/busybox:1 sh -c "
                                "'echo \"hello from $(hostname)\" > /var/www/index.html && "
                                "exec httpd -f -p 80 -h /var/www'")
        assert r.returncode == 0, r.stderr
        wait = ("for i in $(seq 90); do n=$(docker service ps web --filter desired-state=running "
                "--format '{{.CurrentState}}' | grep -c ^Running); [ \"$n\" -ge 4 ] && exit 0; sleep 1; done; exit 1")
        assert on(cli, name, "a1", wait).returncode == 0
        placed = on(cli, name, "a1", "docker service ps web --format '{{.Node}}'").stdout.split()
        assert sorted(placed) == ["a1", "a2", "b1", "b2"]
        probe = ("docker run --rm --network hy-net dcx-hy/busybox:1 sh -c "
                 "'for ip in $(nslookup tasks.web 2>/dev/null | awk \"/^Address: /{print \\$2}\"); do "
                 "wget -q -O - http://$ip/; done'")

        def every_task_answers() -> set[str]:
            # A task's DNS record may trail its Running state by a moment: ask again until all four answer.
            out = on(cli, name, "b1", probe).stdout.splitlines()
            replies = {line for line in out if line.startswith("hello from")}
            return replies if len(replies) == 4 else set()

        wait_for(every_task_answers, 60, "an answer from each of the 4 tasks, asked from site B")

        # Private keys live only on their own node, 0600; dcx's state holds public keys at most.
        for node in ("a1", "b1"):
            assert on(cli, name, node, "stat -c %a /etc/dcx/wireguard/private.key").stdout.strip() == "600"
        key_b1 = on(cli, name, "b1", "cat /etc/dcx/wireguard/private.key").stdout.strip()
        assert key_b1 and not any(key_b1 in p.read_text(errors="replace")
                                  for p in (tmp_path / "home").rglob("*") if p.is_file())

        # A re-run changes nothing.
        again = cli.run("cluster", "create", "-f", str(spec), timeout=300)
        assert again.returncode == 0, again.stderr
        assert "==> Configure the WireGuard mesh (4 hosts)\n    0 changed, 4 unchanged" in again.stdout

        # Removing a node updates every other node's peers without restarting the tunnel.
        # (The interface's index from its own namespace: a session there sees this machine's /sys.)
        ifindex = "ip -o link show dev dcx0 | cut -d: -f1"
        before = on(cli, name, "a1", ifindex).stdout
        assert before.strip().isdigit(), before
        spec.write_text(spec_text(sites, name, "auto", ["b1"]))
        r = cli.run("cluster", "create", "-f", str(spec), timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        for node in ("a1", "a2", "b1"):
            peers = on(cli, name, node, "wg show dcx0 peers").stdout.split()
            assert len(peers) == 2, (node, peers)
        assert on(cli, name, "a1", ifindex).stdout == before
        assert cli.json("cluster", "status", name)["healthy"] is True

        # b1's tunnel goes down: status says so (and exits 1), naming the peers that do not answer; a
        # re-run brings it back.
        on(cli, name, "b1", "wg-quick down dcx0").check_returncode()
        down = cli.run("cluster", "status", name)
        assert down.returncode == 1
        assert re.search(r"^b1 .* 0/2 peers, dcx0 missing, down: a1 a2$", down.stdout, re.M), down.stdout
        assert re.search(r"^a1 .* 1/2 peers, down: b1$", down.stdout, re.M), down.stdout
        r = cli.run("cluster", "create", "-f", str(spec), timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "==> Configure the WireGuard mesh (3 hosts)\n    1 changed, 2 unchanged" in r.stdout
        assert cli.json("cluster", "status", name)["healthy"] is True

        # Site B cut off (its router loses its uplink): the status asked right after shows b1 down from
        # site A and b1 unreachable; back, the cluster is healthy again without a dcx run.
        sites.exec("rb", "ip", "link", "set", "eth0", "down")
        try:
            cut = cli.json("cluster", "status", name)
            assert cut["healthy"] is False
            rows = {n["name"]: n for n in cut["nodes"]}
            assert rows["a1"]["mesh"]["peers_down"] == ["b1"] and rows["a2"]["mesh"]["peers_down"] == ["b1"], rows
            assert rows["b1"]["state"] == "unreachable", rows["b1"]
        finally:
            sites.exec("rb", "ip", "link", "set", "eth0", "up")
        wait_for(lambda: cli.json("cluster", "status", name)["healthy"], 120, "healthy again after site B is back")
    finally:
        cli.run("cluster", "destroy", name, "--yes", timeout=300)
    for node in ("a1", "b1", "b2"):
        ns = sites.hosts[node]
        leftovers = subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "show", "dcx0"], capture_output=True)
        assert leftovers.returncode != 0, f"{node} still has dcx0"


def test_without_the_mesh_the_sites_cannot_form_a_cluster(sites: Lab, tmp_path: Path) -> None:
    cli = Dcx(tmp_path / "home")
    cli.env["DCX_NO_SSH_CONFIG"] = "1"
    name = "nomesh"
    spec = tmp_path / "cluster.yaml"
    spec.write_text(spec_text(sites, name, "none", ["b1"]))
    try:
        r = cli.run("cluster", "create", "-f", str(spec), timeout=600)
        assert r.returncode == 1
        assert "phase 'Join workers' failed on 1/2 hosts:" in r.stderr, r.stderr
        assert "  b1: docker swarm join failed on b1" in r.stderr
        assert "hint: b1 (ssh:site-b) and the manager a1 (ssh:site-a) sit in different networks and the mesh is off" \
            in r.stderr
        assert "set spec.network.mesh to auto or wireguard" in r.stderr
    finally:
        cli.run("cluster", "destroy", name, "--yes", timeout=300)
