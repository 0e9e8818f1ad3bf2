"""Day 2 on namespace nodes: a pool scaled down drains its node first (its tasks run elsewhere before it
leaves, and the service never has fewer than replicas - 1 running), and swarm membership converges
from what a failed create, a removed entry and a stray pending join leave behind."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.testbed.lab import Lab
from tests.testbed.local import Dcx, cluster_yaml, skip_without_namespace_nodes, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def docker(cli: Dcx, cluster: str, *args: str) -> str:
    import subprocess

    r = subprocess.run(["docker", "--context", f"dcx-{cluster}", *args], capture_output=True, text=True, timeout=60,
                       env=cli.env)
    if r.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {r.stderr}")
    return r.stdout


class TaskSampler:
    """Samples, over and over in a thread, where the service's tasks run and how the nodes are."""

    def __init__(self, cli: Dcx, cluster: str, service: str) -> None:
        self.cli, self.cluster, self.service = cli, cluster, service
        self.samples: list[tuple[list[str], dict[str, str]]] = []  # (nodes of Running tasks, node -> status)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                tasks = docker(self.cli, self.cluster, "service", "ps", self.service, "--filter",
                               "desired-state=running", "--format", "{{.Node}} {{.CurrentState}}")
                nodes = docker(self.cli, self.cluster, "node", "ls", "--format",
                               "{{.Hostname}} {{.Status}} {{.Availability}}")
            except AssertionError:
                continue  # a manager busy with a membership change may not answer one call
            running = [line.split()[0] for line in tasks.splitlines() if " Running" in line]
            status = {p[0]: " ".join(p[1:]) for p in (line.split() for line in nodes.splitlines()) if p}
            self.samples.append((running, status))

    def __enter__(self) -> TaskSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_scale_down_drains_the_node_before_it_leaves(dcx_cli: tuple[Dcx, list[str]], tmp_path: Path) -> None:
    from tests.e2e.test_moves import PORT, Client  # here: test_moves imports this module's sampler

    cli, clusters = dcx_cli
    name = "e2e-drain"
    clusters.append(name)
    spec = tmp_path / "cluster.yaml"
    spec.write_text(cluster_yaml(name, "10.213.221.0/24", workers=3))
    cli.run("cluster", "create", "-f", str(spec), check=True)
    cli.run("image", "import", name, "--busybox", "--tag", "dcx-e2e/busybox:1", check=True)
    replicas = 4  # one per node (swarm spreads them): the node that leaves has one
    # A web server on each node's own address (host network), asked over and over from this machine. The
    # drained node's task must be able to run beside another one: the second on a node takes the next port.
    docker(cli, name, "service", "create", "--detach", "--name", "web", "--replicas", str(replicas),
           "--network", "host", "--endpoint-mode", "dnsrr", "--stop-grace-period", "1s", "dcx-e2e/busybox:1",
           "sh", "-c", f"mkdir -p /www && hostname > /www/index.html && "
           f"{{ httpd -f -p {PORT} -h /www || exec httpd -f -p {PORT + 1} -h /www; }}")

    def placed() -> list[str]:
        out = docker(cli, name, "service", "ps", "web", "--filter", "desired-state=running", "--format",
                     "{{.Node}} {{.CurrentState}}")
        nodes = sorted(line.split()[0] for line in out.splitlines() if " Running" in line)
        return nodes if len(set(nodes)) == replicas else []

    leaving = f"{name}-workers-3"
    assert leaving in wait_for(placed, 90, "one running task per node")

    spec.write_text(cluster_yaml(name, "10.213.221.0/24", workers=2))
    with Client(cli, name) as client, TaskSampler(cli, name, "web") as sampler:
        started = time.monotonic()
        r = cli.run("cluster", "create", "-f", str(spec), timeout=600)
        took = time.monotonic() - started
        time.sleep(2)  # a last sample or two after the node is gone
    assert r.returncode == 0, r.stdout + r.stderr
    assert client.failed == 0 and client.total >= 50, (client.total, client.failures[:5])
    samples = sampler.samples
    assert len(samples) > 5, samples

    # The service never ran fewer than replicas - 1 tasks.
    assert min(len(running) for running, _ in samples) >= replicas - 1, samples
    # Before the node left (down or gone from the node list), all replicas ran on the other nodes.
    left_at = next(i for i, (_, status) in enumerate(samples) if not status.get(leaving, "").startswith("Ready"))
    assert any(len(running) == replicas and leaving not in running and status.get(leaving) == "Ready Drain"
               for running, status in samples[:left_at]), samples[:left_at + 1]
    # Task history: the task that ran there was shut down, and its replacement runs elsewhere.
    history = docker(cli, name, "service", "ps", "web", "--format", "{{.Node}} {{.DesiredState}} {{.CurrentState}}")
    rows = [line.split() for line in history.splitlines()]
    running_now = [row[0] for row in rows if row[1:3] == ["Running", "Running"]]
    assert len(running_now) == replicas and leaving not in running_now, history
    assert [row[1] for row in rows].count("Shutdown") == 1, history  # the drained task; nothing else restarted
    assert sorted(n["name"] for n in cli.json("cluster", "status", name)["nodes"]) == [
        f"{name}-control-1", f"{name}-workers-1", f"{name}-workers-2"]

    log = "\n".join(p.read_text() for p in (cli.home / "clusters" / name / "logs").glob("*.log"))
    drained = re.search(rf"{leaving} drained in ([0-9.]+)s", log)
    assert drained, "no drain recorded in the run log"
    print(f"\nscale-down 3 -> 2 workers: {took:.1f}s in all; drain of {leaving}: {drained.group(1)}s; "
          f"{client.failed} failed of {client.total} requests; "
          f"{len(samples)} samples, fewest running {min(len(x) for x, _ in samples)}/{replicas}")


# --- membership -----------------------------------------------------------------------------------

NET = "10.214.230"


@pytest.fixture
def rack() -> Iterator[Lab]:
    skip_without_namespace_nodes()
    lab = Lab("d2")
    try:
        lab.network("lan", f"{NET}.0/24", operator_ip=f"{NET}.1")
        for i, host in enumerate(["m1", "w1", "w2"], start=11):
            lab.host(host, "lan", f"{NET}.{i}")
        yield lab
    finally:
        lab.close()


def swarm_state(lab: Lab, host: str) -> str:
    return lab.inside(host, "docker info --format '{{.Swarm.LocalNodeState}}'").stdout.strip()


def test_membership_converges_after_a_failed_join_a_removed_entry_and_a_stray_join(rack: Lab, tmp_path: Path) -> None:
    cli = Dcx(tmp_path / "home")
    cli.env["DCX_NO_SSH_CONFIG"] = "1"
    spec = tmp_path / "cluster.yaml"
    spec.write_text(f"""\
apiVersion: dcx/v1
kind: Cluster
metadata: {{name: d2}}
spec:
  ssh: {{user: root, privateKey: {rack.key}}}
  pools:
    - {{name: control, role: control, provider: ssh, ssh: {{network: lab, hosts: [{{name: m1, address: {NET}.11}}]}}}}
    - {{name: workers, role: worker, provider: ssh,
       ssh: {{network: lab, hosts: [{{name: w1, address: {NET}.12}}, {{name: w2, address: {NET}.13}}]}}}}
""")
    rule = ["OUTPUT", "-p", "tcp", "--dport", "2377", "-j", "DROP"]
    try:
        # w1 cannot reach the manager's swarm port: its join times out (and goes on in the background).
        rack.exec("w1", "iptables", "-A", *rule)
        failed = cli.run("cluster", "create", "-f", str(spec), timeout=600)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert "w1" in failed.stderr, failed.stderr
        assert swarm_state(rack, "w1") == "pending"
        # It never got its certificate: no NodeID (what tells a failed join from a member reconnecting).
        assert rack.inside("w1", "docker info --format '{{.Swarm.NodeID}}'").stdout.strip() == ""

        # destroy leaves nothing: not the manager's swarm, not w1's pending join.
        token = rack.inside("m1", "docker swarm join-token -q worker").stdout.strip()
        gone = cli.run("cluster", "destroy", "d2", "--yes", timeout=300)
        assert gone.returncode == 0, gone.stdout + gone.stderr
        assert {h: swarm_state(rack, h) for h in ("m1", "w1", "w2")} == {h: "inactive" for h in ("m1", "w1", "w2")}
        rack.exec("w1", "iptables", "-D", *rule)

        # w2 is left in a pending join of a swarm that does not answer (a stray, well-formed token).
        rack.inside("w2", f"timeout 3 docker swarm join --token {token} {NET}.99:2377 >/dev/null 2>&1; true")
        assert swarm_state(rack, "w2") == "pending"
        assert rack.inside("w2", "docker info --format '{{.Swarm.NodeID}}'").stdout.strip() == ""

        r = cli.run("cluster", "create", "-f", str(spec), timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "already part of a swarm" not in r.stdout + r.stderr
        assert "==> Settle swarm membership (3 hosts)\n    1 changed, 2 unchanged" in r.stdout, r.stdout
        assert cli.json("cluster", "status", "d2")["healthy"] is True

        # The manager forgets w2 (its entry removed) while w2 still thinks it is a member: stale.
        w2_id = rack.inside("w2", "docker info --format '{{.Swarm.NodeID}}'").stdout.strip()
        rack.inside("m1", f"docker node rm --force {w2_id}")
        again = cli.run("cluster", "create", "-f", str(spec), timeout=600)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "==> Settle swarm membership (3 hosts)\n    1 changed, 2 unchanged" in again.stdout, again.stdout
        status = cli.json("cluster", "status", "d2")
        assert status["healthy"] is True, status
    finally:
        cli.run("cluster", "destroy", "d2", "--yes", timeout=300)
