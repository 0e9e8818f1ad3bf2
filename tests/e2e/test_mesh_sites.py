"""Hybrid fabric end to end: four sites that cannot reach each other's private addresses joined into
one swarm over dcx's WireGuard mesh; the two sites with no inbound path reach each other through a relay.

    operator 10.214.100.1 ── "internet" 10.214.100.0/24 ─┬── c1 10.214.100.21 (a cloud node, public)
                                                         ├── ra 10.214.100.11 (NAT; forwards UDP 51820/1
                                                         │     and TCP 2201/2 to a1/a2) ── site A 10.214.1.0/24
                                                         ├── rb 10.214.100.12 (NAT only; SSH bastion)
                                                         │     ── site B 10.214.2.0/24: b1
                                                         └── rd 10.214.100.13 (NAT only) ── 10.214.3.0/24 ──
                                                               rd2 10.214.3.2 (NAT only) ── site D 10.214.4.0/24: d1

b1 and d1 have no inbound path (D is behind two NATs, reached over SSH through two jump hosts): they
never handshake with each other, and dcx routes that pair through a node both reach (README, Relays).
"""

from __future__ import annotations

import re
import subprocess
import time
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
        lab.network("dmid", "10.214.3.0/24")
        lab.network("d", "10.214.4.0/24")
        lab.router("ra", ("inet", "10.214.100.11"), ("a", "10.214.1.1"), forwards=[
            ("udp", 51820, "10.214.1.11", 51820), ("udp", 51821, "10.214.1.12", 51820),
            ("tcp", 2201, "10.214.1.11", 22), ("tcp", 2202, "10.214.1.12", 22)])
        lab.router("rb", ("inet", "10.214.100.12"), ("b", "10.214.2.1"))
        lab.router("rd", ("inet", "10.214.100.13"), ("dmid", "10.214.3.1"))
        lab.router("rd2", ("dmid", "10.214.3.2"), ("d", "10.214.4.1"), gateway="10.214.3.1")
        lab.host("c1", "inet", "10.214.100.21")
        lab.host("a1", "a", "10.214.1.11", gateway="10.214.1.1")
        lab.host("a2", "a", "10.214.1.12", gateway="10.214.1.1")
        lab.host("b1", "b", "10.214.2.21", gateway="10.214.2.1")
        lab.host("d1", "d", "10.214.4.41", gateway="10.214.4.1")
        yield lab
    finally:
        lab.close()


# node -> (pool, network, how dcx reaches it)
HOSTS = {
    "a1": ("control", "site-a", "address: 10.214.100.11, port: 2201, meshEndpoint: '10.214.100.11:51820'"),
    "a2": ("workers-a", "site-a", "address: 10.214.100.11, port: 2202, meshEndpoint: '10.214.100.11:51821'"),
    "c1": ("cloud", "cloud", "address: 10.214.100.21"),
    "b1": ("edge-b", "site-b", "address: 10.214.2.21, proxyJump: root@10.214.100.12"),
    "d1": ("edge-d", "site-d", "address: 10.214.4.41, proxyJump: 'root@10.214.100.13,root@10.214.3.2'"),
}


def spec_text(lab: Lab, name: str, nodes: list[str], mesh: str = "auto") -> str:
    pools = ""
    for pool in dict.fromkeys(HOSTS[n][0] for n in nodes):
        mine = [n for n in nodes if HOSTS[n][0] == pool]
        hosts = ", ".join(f"{{name: {n}, {HOSTS[n][2]}}}" for n in mine)
        pools += (f"    - name: {pool}\n      role: {'control' if pool == 'control' else 'worker'}\n"
                  f"      provider: ssh\n      ssh:\n        network: {HOSTS[mine[0]][1]}\n        hosts: [{hosts}]\n")
    return f"""\
apiVersion: dcx/v1
kind: Cluster
metadata: {{name: {name}}}
spec:
  ssh: {{user: root, privateKey: {lab.key}}}
  network: {{mesh: {mesh}}}
  pools:
{pools}"""


def timed_create(cli: Dcx, spec: Path) -> float:
    started = time.monotonic()
    r = cli.run("cluster", "create", "-f", str(spec), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return time.monotonic() - started


def on(cli: Dcx, cluster: str, node: str, command: str) -> subprocess.CompletedProcess[str]:
    return cli.run("node", "ssh", cluster, node, "--", command, timeout=120)


def test_sites_behind_nat_form_one_swarm_over_the_mesh(sites: Lab, tmp_path: Path) -> None:
    cli = Dcx(tmp_path / "home")
    cli.env["DCX_NO_SSH_CONFIG"] = "1"
    spec = tmp_path / "cluster.yaml"

    # For comparison: four nodes in three sites where every pair has a direct path (no relay needed).
    spec.write_text(spec_text(sites, "direct", ["a1", "a2", "c1", "b1"]))
    try:
        without_relays = timed_create(cli, spec)
        status = cli.json("cluster", "status", "direct")
        assert status["healthy"] is True, status
        assert all(n["mesh"]["relayed"] == {} for n in status["nodes"]), status
    finally:
        cli.run("cluster", "destroy", "direct", "--yes", timeout=300)

    name = "hybrid"
    spec.write_text(spec_text(sites, name, ["a1", "c1", "b1", "d1"]))
    try:
        with_relays = timed_create(cli, spec)
        print(f"\ncreate, 4 nodes: {without_relays:.1f}s with every pair direct, {with_relays:.1f}s with one pair "
              f"relayed: ratio {with_relays / without_relays:.2f}")
        status = cli.json("cluster", "status", name)
        assert status["healthy"] is True, status
        assert status["mesh"] is True
        rows = {n["name"]: n["mesh"] for n in status["nodes"]}
        assert {n: (m["peers_up"], m["peers_expected"]) for n, m in rows.items()} == {
            "a1": (3, 3), "b1": (3, 3), "c1": (3, 3), "d1": (3, 3)}
        # b1 and d1 reach each other through a1: the control node with a (forwarded) endpoint.
        assert {n: m["relayed"] for n, m in rows.items()} == {"a1": {}, "c1": {}, "b1": {"d1": "a1"},
                                                              "d1": {"b1": "a1"}}
        assert rows["b1"]["direct"] == ["a1", "c1"] and rows["a1"]["direct"] == ["b1", "c1", "d1"]
        text = cli.run("cluster", "status", name).stdout
        assert re.search(r"^b1 .* 3/3 peers, relayed: d1 via a1$", text, re.M), text
        assert re.search(r"^a1 .* 3/3 peers$", text, re.M), text

        # Swarm carries its traffic on the mesh addresses.
        addrs = on(cli, name, "a1", "docker node inspect self --format '{{.Status.Addr}}'").stdout.strip()
        assert addrs.startswith("100.96."), addrs

        # A global service: one task on every node; a client in each site with no inbound path gets an
        # answer from every task (the other edge site's through the relay).
        # MTU 1370: VXLAN's 50 bytes inside WireGuard's 1420.
        on(cli, name, "a1", "docker network create -d overlay --attachable --opt "
                            "com.docker.network.driver.mtu=1370 hy-net").check_returncode()
        cli.run("image", "import", name, "--busybox", "--tag", "dcx-hy/busybox:1", check=True)
        r = on(cli, name, "a1", "docker service create --detach --name web --mode global "
                                "--hostname '{{.Node.Hostname}}' --endpoint-mode dnsrr --network hy-net "
                                "dcx-hy/busybox:1 sh -c "
                                "'echo \"hello from $(hostname)\" > /var/www/index.html && "
                                "exec httpd -f -p 80 -h /var/www'")
        assert r.returncode == 0, r.stderr
        every_task_answers(cli, name, ["b1", "d1"], {"a1", "b1", "c1", "d1"})

        # Private keys live only on their own node, 0600; dcx's state holds public keys at most.
        for node in ("a1", "d1"):
            assert on(cli, name, node, "stat -c %a /etc/dcx/wireguard/private.key").stdout.strip() == "600"
        key_d1 = on(cli, name, "d1", "cat /etc/dcx/wireguard/private.key").stdout.strip()
        assert key_d1 and not any(key_d1 in p.read_text(errors="replace")
                                  for p in (tmp_path / "home").rglob("*") if p.is_file())

        # A re-run changes nothing: the same routes, no config applied, no forwarding touched.
        def mesh_resources() -> dict[str, str]:
            return {k: v for k, v in cli.state(name)["resources"].items() if k.startswith("mesh/")}

        before = mesh_resources()
        assert before["mesh/relay/b1,d1"] == "a1", before
        again = cli.run("cluster", "create", "-f", str(spec), timeout=300)
        assert again.returncode == 0, again.stderr
        assert "==> Configure the WireGuard mesh (4 hosts)\n    0 changed, 4 unchanged" in again.stdout
        assert "==> Route pairs without a direct path through relays (4 hosts)\n    0 changed, 4 unchanged" \
            in again.stdout, again.stdout
        assert mesh_resources() == before

        # The relay is lost to the edge sites (its site's router drops their packets to a1's mesh port;
        # SSH still reaches a1): a re-run routes b1-d1 through c1, and a1's own pairs with them too. The
        # ends change their peers without restarting their tunnels; a1 stops forwarding, c1 starts.
        ifindex = "ip -o link show dev dcx0 | cut -d: -f1"
        index_b1 = on(cli, name, "b1", ifindex).stdout
        assert index_b1.strip().isdigit(), index_b1
        for edge in ("10.214.100.12", "10.214.100.13"):
            sites.exec("ra", "iptables", "-t", "raw", "-A", "PREROUTING", "-i", "eth0", "-s", edge, "-p", "udp",
                       "--dport", "51820", "-j", "DROP")
        r = cli.run("cluster", "create", "-f", str(spec), timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "b1 and d1 do not reach each other directly; relayed through c1" in r.stdout, r.stdout
        rows = {n["name"]: n["mesh"] for n in cli.json("cluster", "status", name)["nodes"]}
        assert {n: m["relayed"] for n, m in rows.items()} == {
            "a1": {"b1": "c1", "d1": "c1"}, "c1": {}, "b1": {"a1": "c1", "d1": "c1"}, "d1": {"a1": "c1", "b1": "c1"}}
        assert all(m["peers_down"] == [] for m in rows.values()), rows
        # On b1, c1's WireGuard entry now carries d1's and a1's addresses; d1's entry carries none.
        key_c1 = on(cli, name, "c1", "wg show dcx0 public-key").stdout.strip()
        key_d1_pub = on(cli, name, "d1", "wg show dcx0 public-key").stdout.strip()
        allowed = dict(line.split("\t") for line in on(cli, name, "b1", "wg show dcx0 allowed-ips").stdout.splitlines())
        assert sorted(allowed[key_c1].split()) == sorted(f"{rows[n]['address']}/32" for n in ("a1", "c1", "d1"))
        assert allowed[key_d1_pub] == "(none)"
        assert on(cli, name, "b1", ifindex).stdout == index_b1
        assert "dcx relay hybrid" in sites.exec("c1", "iptables", "-S", "FORWARD")
        assert "dcx relay hybrid" not in sites.exec("a1", "iptables", "-S", "FORWARD")
        # Traffic between the two edge sites flows again: the overlay answers from every task.
        every_task_answers(cli, name, ["b1", "d1"], {"a1", "b1", "c1", "d1"})

        # b1's tunnel goes down: status says so (and exits 1), naming the peers that do not answer and
        # the relayed ones; a re-run brings it back.
        on(cli, name, "b1", "wg-quick down dcx0").check_returncode()
        down = cli.run("cluster", "status", name)
        assert down.returncode == 1
        assert re.search(r"^b1 .* 0/3 peers, dcx0 missing, relayed: a1 d1 via c1, down: a1 c1 d1$", down.stdout,
                         re.M), down.stdout
        assert re.search(r"^a1 .* 2/3 peers, relayed: b1 d1 via c1, down: b1$", down.stdout, re.M), down.stdout
        r = cli.run("cluster", "create", "-f", str(spec), timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "==> Configure the WireGuard mesh (4 hosts)\n    1 changed, 3 unchanged" in r.stdout
        assert cli.json("cluster", "status", name)["healthy"] is True

        # Site B cut off (its router loses its uplink): the status asked right after shows b1 down from
        # every other node (d1 reaches it through c1) and b1 unreachable; back, the cluster is healthy
        # again without a dcx run.
        sites.exec("rb", "ip", "link", "set", "eth0", "down")
        try:
            cut = cli.json("cluster", "status", name)
            assert cut["healthy"] is False
            rows = {n["name"]: n for n in cut["nodes"]}
            assert all(rows[n]["mesh"]["peers_down"] == ["b1"] for n in ("a1", "c1", "d1")), rows
            assert rows["b1"]["state"] == "unreachable", rows["b1"]
        finally:
            sites.exec("rb", "ip", "link", "set", "eth0", "up")
        back = time.monotonic()
        wait_for(lambda: cli.json("cluster", "status", name)["healthy"], 120, "healthy again after site B is back")
        print(f"site B back: healthy again after {time.monotonic() - back:.1f}s, without a dcx run")

        # a1's mesh port is open to the edge sites again. Their own entries for a1 kept trying the
        # direct path: once those have handshaken, a re-run takes a1's pairs off the relay (b1-d1 stays
        # on c1, which still reaches both).
        for edge in ("10.214.100.12", "10.214.100.13"):
            sites.exec("ra", "iptables", "-t", "raw", "-D", "PREROUTING", "-i", "eth0", "-s", edge, "-p", "udp",
                       "--dport", "51820", "-j", "DROP")
        key_a1 = on(cli, name, "a1", "wg show dcx0 public-key").stdout.strip()
        wait_for(lambda: all(handshake_age(cli, name, edge, key_a1) < 60 for edge in ("b1", "d1")), 120,
                 "b1 and d1 handshaking directly with a1 again")
        r = cli.run("cluster", "create", "-f", str(spec), timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        for edge in ("b1", "d1"):
            assert f"mesh: a1 and {edge} reach each other directly again; no longer relayed" in r.stdout, r.stdout
        rows = {n["name"]: n["mesh"] for n in cli.json("cluster", "status", name)["nodes"]}
        assert {n: m["relayed"] for n, m in rows.items()} == {"a1": {}, "c1": {}, "b1": {"d1": "c1"},
                                                              "d1": {"b1": "c1"}}

        # The relay machine stops for good (c1: every process gone, its link down). The spec without it:
        # the re-run takes c1 out of the swarm and routes b1-d1 through a1; c1 cannot be reset, which
        # fails the run with what to do, and with --skip-unreachable it is named and left as it is.
        sites.power_off("c1")
        spec.write_text(spec_text(sites, name, ["a1", "b1", "d1"]))
        r = cli.run("cluster", "create", "-f", str(spec), "--ssh-timeout", "10", timeout=300)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "c1" in r.stderr and "--skip-unreachable" in r.stderr, r.stderr
        started = time.monotonic()
        r = cli.run("cluster", "create", "-f", str(spec), "--ssh-timeout", "10", "--skip-unreachable", timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        print(f"relay c1 gone: the re-run that removes it and routes b1-d1 through a1 took "
              f"{time.monotonic() - started:.1f}s")
        assert "not reset (unreachable, left as it is): c1" in r.stdout + r.stderr, r.stdout + r.stderr
        status = cli.json("cluster", "status", name)
        assert status["healthy"] is True, status
        rows = {n["name"]: n["mesh"] for n in status["nodes"]}
        assert {n: m["relayed"] for n, m in rows.items()} == {"a1": {}, "b1": {"d1": "a1"}, "d1": {"b1": "a1"}}
        # Traffic between the two edge sites flows again, through a1.
        every_task_answers(cli, name, ["b1", "d1"], {"a1", "b1", "d1"})
    finally:
        cli.run("cluster", "destroy", name, "--yes", "--skip-unreachable", timeout=300)
    for node in ("a1", "b1", "d1"):
        ns = sites.hosts[node]
        leftovers = subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "show", "dcx0"], capture_output=True)
        assert leftovers.returncode != 0, f"{node} still has dcx0"
    assert "dcx relay" not in sites.exec("a1", "iptables", "-S", "FORWARD")


def handshake_age(cli: Dcx, name: str, node: str, key: str) -> float:
    """Seconds since `node`'s entry for the peer `key` last handshook (inf: never)."""
    text = on(cli, name, node, "echo now $(date +%s); wg show dcx0 latest-handshakes").stdout
    fields = dict(line.split()[:2] for line in text.splitlines() if len(line.split()) == 2)
    made = int(fields.get(key, "0"))
    return int(fields["now"]) - made if made else float("inf")


def every_task_answers(cli: Dcx, name: str, clients: list[str], nodes: set[str]) -> None:
    """Each client node, from a container on the overlay, gets an answer from the task on every node."""
    probe = ("docker run --rm --network hy-net dcx-hy/busybox:1 sh -c "
             "'for ip in $(nslookup tasks.web 2>/dev/null | awk \"/^Address: /{print \\$2}\"); do "
             "timeout 5 wget -q -O - http://$ip/; done'")
    wanted = {f"hello from {n}" for n in nodes}
    for client in clients:
        # A task's DNS record may trail its Running state, and the overlay's gossip reaches a relayed peer
        # a hop later: ask again until all answer. What answered last is in the failure.
        heard: set[str] = set()

        def all_answer(c: str = client, heard: set[str] = heard) -> bool:
            heard.clear()
            heard.update(on(cli, name, c, probe).stdout.splitlines())
            return wanted <= heard

        try:
            wait_for(all_answer, 180, f"an answer from each of the tasks on {sorted(nodes)}, asked from {client}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last answers: {sorted(heard)}; {overlay_view(cli, name, client)}") from None


def overlay_view(cli: Dcx, name: str, node: str) -> str:
    """What the overlay's control plane on `node` knows (for a failure message): the task addresses its DNS
    gives, the network's peers as gossip sees them, the mesh's handshakes and dockerd's last complaints."""
    probe = ("docker run --rm --network hy-net dcx-hy/busybox:1 nslookup tasks.web 2>&1 | tr '\\n' ' '; echo; "
             "docker network inspect --verbose hy-net --format '{{json .Peers}}'; "
             "echo now $(date +%s); wg show dcx0 latest-handshakes; "
             "grep -iE 'level=(error|warn)' /var/log/dcx-dockerd.log "
             "| grep -iE 'memberlist|networkdb|gossip|peer|vxlan' | tail -n 15")
    r = on(cli, name, node, probe)
    return f"on {node}: {r.stdout.strip()} {r.stderr.strip()[-500:]}"


def test_without_the_mesh_the_sites_cannot_form_a_cluster(sites: Lab, tmp_path: Path) -> None:
    cli = Dcx(tmp_path / "home")
    cli.env["DCX_NO_SSH_CONFIG"] = "1"
    name = "nomesh"
    spec = tmp_path / "cluster.yaml"
    spec.write_text(spec_text(sites, name, ["a1", "a2", "b1"], mesh="none"))
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
