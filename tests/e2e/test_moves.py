"""Availability while a cluster moves: every node of a local cluster (1 manager, 2 workers) moves from one
subnet to another by changing the pools' `local.subnet` and re-running `create`, then `cluster roll`
replaces every node again, while a client on this machine (outside every moving node) keeps requesting
a replicated service. The manager moving is the quorum case: a second manager joins, then the old one is
demoted and removed, and the swarm keeps its id.

The two subnets are two sites: the local provider gives them no route to each other, so this test plays
the network between them (this machine forwards between the two bridges, as the internet would, and each
node gets a route to the other site as it appears), and the cluster spans them over dcx's WireGuard mesh.

New nodes get the service's image from the cluster's recorded images (`dcx image import` once, before
the move) before they join. The client behaves as a load balancer with health checks does: each request
goes to the cluster's nodes (the addresses `create` recorded) in turn until one answers; it fails only
when none does.
"""

from __future__ import annotations

import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.test_day2 import TaskSampler, docker
from tests.testbed.local import Dcx, cluster_yaml, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

SITE_A, GW_A = "10.213.231.0/24", "10.213.231.1"
SITE_B, GW_B = "10.213.232.0/24", "10.213.232.1"
MESH = "  network: {mesh: wireguard}\n"
PORT = 8080
REPLICAS = 3


class SiteRouter:
    """This machine forwards between the two sites; each node of the cluster gets a route to the other site
    through its own bridge's address as soon as its namespace exists (the mesh's UDP needs a path)."""

    def __init__(self, cluster_id: str) -> None:
        self.prefix = f"dcx-{cluster_id}-"
        self.done: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._forward = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()

    def _run(self) -> None:
        while not self._stop.is_set():
            names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
            for ns in [n for n in names if n.startswith(self.prefix) and n not in self.done]:
                a = subprocess.run(["ip", "-n", ns, "route", "replace", SITE_B, "via", GW_A], capture_output=True)
                b = subprocess.run(["ip", "-n", ns, "route", "replace", SITE_A, "via", GW_B], capture_output=True)
                if a.returncode == 0 or b.returncode == 0:  # its address is up: one of the two gateways is on-link
                    self.done.add(ns)
            self._stop.wait(0.2)

    def __enter__(self) -> SiteRouter:
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        Path("/proc/sys/net/ipv4/ip_forward").write_text(self._forward + "\n")


class Client:
    """Requests the service over and over from this machine; counts requests that no node answered."""

    def __init__(self, cli: Dcx, cluster: str) -> None:
        self.cli, self.cluster = cli, cluster
        self.ok = self.failed = self.retries = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _backends(self) -> list[str]:
        try:
            return sorted(n["ssh_address"] for n in self.cli.state(self.cluster)["nodes"].values())
        except (OSError, ValueError, KeyError):
            return []

    def _run(self) -> None:
        turn = 0
        while not self._stop.is_set():
            backends = self._backends()
            turn += 1
            errors = []
            for i in range(len(backends)):
                address = backends[(turn + i) % len(backends)]
                try:
                    with urllib.request.urlopen(f"http://{address}:{PORT}/", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError as exc:
                    errors.append(f"{address}: {exc}")
                    self.retries += 1
            else:
                self.failed += 1
                self.failures.append("; ".join(errors) or "no backends")
            if len(errors) < len(backends):
                self.ok += 1
            self._stop.wait(0.05)

    def __enter__(self) -> Client:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def total(self) -> int:
        return self.ok + self.failed


def swarm_id(cli: Dcx, name: str) -> str:
    return docker(cli, name, "info", "--format", "{{.Swarm.Cluster.ID}}").strip()


def on(cli: Dcx, cluster: str, node: str, command: str) -> str:
    return cli.run("node", "ssh", cluster, node, "--", command, timeout=120, check=True).stdout


def assert_mesh_is_the_nodes(cli: Dcx, name: str) -> None:
    """Every node's dcx0 has exactly the cluster's other nodes as peers (none that left)."""
    nodes = sorted(cli.state(name)["nodes"])
    keys = {n: on(cli, name, n, "wg show dcx0 public-key").strip() for n in nodes}
    for n in nodes:
        peers = sorted(on(cli, name, n, "wg show dcx0 peers").split())
        assert peers == sorted(keys[m] for m in nodes if m != n), (n, peers, keys)


def killed_then_finished(cli: Dcx, spec: Path, first: tuple[str, ...], kill_at: str) -> float:
    """Run `first` (a create or a roll) until the kill point `kill_at` (dcx kills itself there, as `kill -9`
    would), then `create` goes on from the journal. Returns the seconds both runs took."""
    started = time.monotonic()
    cli.env["DCX_TEST_KILL_AT"] = kill_at
    try:
        r = cli.run(*first, timeout=600)
    finally:
        del cli.env["DCX_TEST_KILL_AT"]
    assert r.returncode == -9, f"expected the kill point {kill_at} to stop the run\n{r.stdout}\n{r.stderr}"
    cli.run("cluster", "create", "-f", str(spec), check=True, timeout=600)
    return time.monotonic() - started


def test_a_cluster_moves_between_sites_and_rolls_with_its_service_answering(
        dcx_cli: tuple[Dcx, list[str]], tmp_path: Path) -> None:
    cli, clusters = dcx_cli
    name = "e2e-move"
    clusters.append(name)
    spec = tmp_path / "cluster.yaml"
    spec.write_text(cluster_yaml(name, SITE_A, control=1, workers=2, extra=MESH))
    t0 = time.monotonic()
    cli.run("cluster", "create", "-f", str(spec), check=True)
    created = time.monotonic() - t0
    cli.run("image", "import", name, "--busybox", "--tag", "dcx-e2e/busybox:1", check=True)
    docker(cli, name, "service", "create", "--detach", "--name", "web", "--replicas", str(REPLICAS),
           "--replicas-max-per-node", "1", "--network", "host", "--endpoint-mode", "dnsrr",
           "--stop-grace-period", "1s", "dcx-e2e/busybox:1", "sh", "-c",
           f"mkdir -p /www && hostname > /www/index.html && exec httpd -f -p {PORT} -h /www")
    old = sorted(cli.state(name)["nodes"])
    identity = swarm_id(cli, name)

    def running() -> int:
        out = docker(cli, name, "service", "ps", "web", "--filter", "desired-state=running", "--format",
                     "{{.CurrentState}}")
        return sum(1 for line in out.splitlines() if line.startswith("Running"))

    wait_for(lambda: running() == REPLICAS, 90, "every replica running")

    # The plan names each node to replace, and why.
    spec.write_text(cluster_yaml(name, SITE_B, control=1, workers=2, extra=MESH))
    planned = cli.json("cluster", "plan", "-f", str(spec))
    assert sorted(r["name"] for r in planned["replace"]) == old, planned
    assert all(f"subnet {SITE_A} -> {SITE_B}" in r["reason"] for r in planned["replace"]), planned
    assert not set(old) & {r["name"] for r in planned["create"]}, planned  # new names never collide

    with SiteRouter(cli.state(name)["id"]), Client(cli, name) as client, TaskSampler(cli, name, "web") as sampler:
        # Killed when the first old worker has left the swarm but its machine is still there.
        moved = killed_then_finished(cli, spec, ("cluster", "create", "-f", str(spec)), "replace:after-leave")
        after_move = (client.ok, client.failed, len(sampler.samples))
        moved_to = sorted(cli.state(name)["nodes"])
        # Killed when the new machines are made but have not joined (the roll's marks stay in the state).
        rolled = killed_then_finished(cli, spec, ("--yes", "cluster", "roll", name), "phase:Join control nodes")
        time.sleep(2)  # a last request and sample with only the final nodes
    nodes = cli.state(name)["nodes"]
    print(f"\ncreate {created:.1f}s; move 3 nodes {SITE_A} -> {SITE_B}: {moved:.1f}s, "
          f"{after_move[1]} failed of {after_move[0] + after_move[1]} requests; roll 3 nodes: {rolled:.1f}s; "
          f"in all {client.failed} failed of {client.total} ({client.retries} attempts went to a node that did "
          f"not answer, then to the next); fewest running {min(len(r) for r, _ in sampler.samples)}/{REPLICAS} "
          f"in {len(sampler.samples)} samples")
    assert client.failed == 0, client.failures[:5]
    assert client.total >= 500, client.total
    assert min(len(r) for r, _ in sampler.samples) >= REPLICAS - 1, sampler.samples
    assert swarm_id(cli, name) == identity
    assert not set(moved_to) & set(old) and len(moved_to) == 3, moved_to
    assert not set(nodes) & set(moved_to) and len(nodes) == 3, sorted(nodes)
    assert all(n["ssh_address"].startswith("10.213.232.") for n in nodes.values()), nodes
    status = cli.json("cluster", "status", name)
    assert status["healthy"], status
    assert running() == REPLICAS
    assert cli.json("cluster", "plan", "-f", str(spec))["empty"]
    assert not [k for k in cli.state(name)["resources"] if k.startswith(("move/", "replace/"))]
    assert_mesh_is_the_nodes(cli, name)

    # One node removed for good: drained, out of the swarm, its machine gone, and the recorded count lowered.
    # (The service first fits on the two nodes that stay: one task per node, or the drain waits it out.)
    docker(cli, name, "service", "update", "--detach", "--replicas", str(REPLICAS - 1), "web")
    leaving = sorted(n for n in nodes if "-workers-" in n)[-1]
    t1 = time.monotonic()
    removed = cli.json("--yes", "node", "remove", name, leaving)
    took = time.monotonic() - t1
    assert removed["removed"] == leaving and "now has count 1" in removed["note"], removed
    assert sorted(cli.state(name)["nodes"]) == sorted(set(nodes) - {leaving})
    assert leaving not in docker(cli, name, "node", "ls", "--format", "{{.Hostname}}").split()
    wait_for(lambda: running() == REPLICAS - 1, 60, "a replica on each of the two nodes left")
    assert [(r["pool"]) for r in cli.json("cluster", "plan", "-f", str(spec))["create"]] == ["workers"]
    assert_mesh_is_the_nodes(cli, name)
    assert not [k for k in cli.state(name)["resources"] if k.startswith("mesh/") and leaving in k]
    # With the file saying the same count, a plain re-run finds nothing to change in the mesh.
    spec.write_text(cluster_yaml(name, SITE_B, control=1, workers=1, extra=MESH))
    t2 = time.monotonic()
    again = cli.run("cluster", "create", "-f", str(spec), check=True)
    rerun = time.monotonic() - t2
    for phase in ("Configure the WireGuard mesh", "Route pairs without a direct path through relays"):
        assert f"==> {phase} (2 hosts)\n    0 changed, 2 unchanged" in again.stdout, again.stdout
    print(f"node remove: {took:.1f}s; re-run {rerun:.1f}s; test body {time.monotonic() - t0:.1f}s")
