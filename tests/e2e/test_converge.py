"""Converging from broken states, on local namespace nodes with the WireGuard mesh forced on: dcx killed
with SIGKILL at every phase boundary and inside the mesh phase (create and scale-up), and faults on a
node after create (dockerd killed, sshd killed, dcx0 taken down): `status` names the node at once and
a re-run repairs it in place.

Kills use DCX_TEST_KILL_AT (dcx.bootstrap.phases.kill_point): dcx sends itself SIGKILL at that point."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from dcx import netns
from tests.testbed.local import Dcx, cluster_yaml, registry_entries, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

MESH = "  network: {mesh: wireguard}\n"

# Every phase of a swarm create with the mesh, in order (a point never reached fails the test below).
PHASES = ["Connect over SSH", "Set hostnames", "Gather host facts", "Preflight checks", "Install container runtime",
          "Start container runtime", "Install WireGuard", "Make WireGuard keys on each node",
          "Configure the WireGuard mesh", "Verify the mesh (every peer answers)", "Read swarm membership",
          "Settle swarm membership",
          "Initialise swarm on the first control node", "Join control nodes", "Join workers",
          "Apply node roles and labels", "Verify every node is Ready"]
# Inside the mesh phase: before any node applies its config, and once one has (others may be mid-way).
KILL_POINTS = ([f"phase:{t}" for t in PHASES[:9]] + ["mesh:before-apply", "mesh:after-apply"]
               + [f"phase:{t}" for t in PHASES[9:]])


def killed_runs(cli: Dcx, spec: Path, points: list[str]) -> None:
    """One create per point, each killed there: every run starts from what the one before left."""
    for point in points:
        env = {**cli.env, "DCX_TEST_KILL_AT": point}
        r = subprocess.run(cli.argv("cluster", "create", "-f", str(spec)), capture_output=True, text=True, env=env,
                           timeout=300, stdin=subprocess.DEVNULL)
        assert r.returncode == -signal.SIGKILL, f"not killed at {point} (exit {r.returncode}):\n{r.stdout}{r.stderr}"


def one_dockerd_per_node(cluster: str) -> dict[str, int]:
    """Each node's dockerd, asserting there is one (dockerd's short-lived re-exec children do not count)."""
    out = {}
    for info in registry_entries(cluster):
        running = {p for p in netns.program_pids(info["netns"], "dockerd") if netns._alive(p)}
        parents = netns._parents()
        pids = [p for p in running if parents.get(p) not in running]
        assert len(pids) == 1, (info["node"], pids)
        out[info["node"]] = pids[0]
    return out


def test_sigkill_at_every_phase_boundary_and_in_the_mesh_phase_then_rerun_converges(
        dcx_cli: tuple[Dcx, list[str]], tmp_path: Path) -> None:
    cli, clusters = dcx_cli
    name = "e2e-conv"
    clusters.append(name)
    spec = tmp_path / "cluster.yaml"
    spec.write_text(cluster_yaml(name, "10.213.207.0/24", control=1, workers=1, extra=MESH))

    cli.run("cluster", "create", "-f", str(spec), "--provision-only", check=True)
    killed_runs(cli, spec, KILL_POINTS)
    cli.run("cluster", "create", "-f", str(spec), check=True)
    status = cli.json("cluster", "status", name)
    assert status["healthy"] is True, status
    assert [n["mesh"]["peers_up"] for n in status["nodes"]] == [1, 1]
    one_dockerd_per_node(name)

    # Scale up, killed at the same points: the existing nodes' peers change while the new node is made.
    spec.write_text(cluster_yaml(name, "10.213.207.0/24", control=1, workers=2, extra=MESH))
    killed_runs(cli, spec, KILL_POINTS)
    again = cli.run("cluster", "create", "-f", str(spec), check=True)
    assert "==> Initialise swarm" not in again.stdout
    status = cli.json("cluster", "status", name)
    assert status["healthy"] is True, status
    assert [n["mesh"]["peers_up"] for n in status["nodes"]] == [2, 2, 2]
    one_dockerd_per_node(name)
    assert cli.json("cluster", "plan", "-f", str(spec))["empty"] is True


def inside(ns: str, command: str) -> subprocess.CompletedProcess[str]:
    """A command in a node's own world (mount, UTS and network namespaces of its sshd), not over SSH."""
    pid = netns.sshd_pid(ns)
    assert pid, f"{ns} has no sshd"
    return subprocess.run(["nsenter", "-t", str(pid), "-m", "-u", "-n", "sh", "-c", command], capture_output=True,
                          text=True, timeout=60)


def row(status: dict, node: str) -> dict:
    return next(n for n in status["nodes"] if n["name"] == node)


def test_a_broken_node_shows_in_status_at_once_and_a_rerun_repairs_it_in_place(
        dcx_cli: tuple[Dcx, list[str]], tmp_path: Path) -> None:
    cli, clusters = dcx_cli
    name = "e2e-fault"
    clusters.append(name)
    spec = tmp_path / "cluster.yaml"
    spec.write_text(cluster_yaml(name, "10.213.208.0/24", control=1, workers=1, extra=MESH))
    cli.run("cluster", "create", "-f", str(spec), check=True)
    worker, control = f"{name}-workers-1", f"{name}-control-1"
    ns = next(e["netns"] for e in registry_entries(name) if e["node"] == worker)

    # dockerd killed: status (asked right after, no waiting) names the node; a re-run starts it again.
    os.kill(one_dockerd_per_node(name)[worker], signal.SIGKILL)
    wait_for(lambda: not netns.program_pids(ns, "dockerd"), 30, "dockerd gone")
    r = cli.run("cluster", "status", name)
    assert r.returncode == 1 and re.search(rf"^{worker} .* no +runtime down: docker does not answer", r.stdout, re.M), \
        r.stdout
    cli.run("cluster", "create", "-f", str(spec), check=True)
    assert cli.json("cluster", "status", name)["healthy"] is True

    # sshd killed after dockerd started (a login session outlives it, as on a machine): unhealthy, plan not
    # empty; the re-run starts sshd inside the node's own namespaces: the same dockerd keeps running, alone,
    # on the same /var/lib/docker.
    dockerd = one_dockerd_per_node(name)[worker]
    mounts = inside(ns, "stat -L -c %d:%i /var/lib/docker").stdout
    session = subprocess.Popen(cli.argv("node", "ssh", name, worker, "--", "sleep 120"), env=cli.env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(netns.program_pids(ns, "sshd")) > 1, 30, "a login session on the worker")
        sshd = netns.sshd_pid(ns)
        assert sshd
        os.kill(sshd, signal.SIGKILL)
        wait_for(lambda: netns.sshd_pid(ns) is None, 30, "sshd gone")
        assert session.poll() is None  # the session's own sshd lives on
        check_sshd_repair(cli, name, spec, worker, control, ns, dockerd, mounts)
    finally:
        session.kill()
        session.wait()

    # dcx0 taken down: both rows say so (its own link, and the peer that does not answer); a re-run
    # brings it up again (and only there).
    inside(ns, "ip link set dcx0 down").check_returncode()
    status = cli.json("cluster", "status", name)
    assert status["healthy"] is False
    assert (row(status, worker)["mesh"]["link"], row(status, worker)["mesh"]["peers_down"]) == ("down", [control])
    assert row(status, control)["mesh"]["peers_down"] == [worker]
    r = cli.run("cluster", "create", "-f", str(spec), check=True)
    assert "==> Configure the WireGuard mesh (2 hosts)\n    1 changed, 1 unchanged" in r.stdout, r.stdout
    assert cli.json("cluster", "status", name)["healthy"] is True


def check_sshd_repair(cli: Dcx, name: str, spec: Path, worker: str, control: str, ns: str, dockerd: int,
                      mounts: str) -> None:
    status = cli.json("cluster", "status", name)
    assert status["healthy"] is False
    assert (row(status, worker)["ready"], row(status, worker)["state"]) == (False, "unreachable"), row(status, worker)
    assert row(status, control)["ready"] is True
    assert cli.json("cluster", "plan", "-f", str(spec))["empty"] is False
    cli.run("cluster", "create", "-f", str(spec), check=True)
    assert one_dockerd_per_node(name)[worker] == dockerd
    new_sshd = netns.sshd_pid(ns)
    assert new_sshd and os.stat(f"/proc/{new_sshd}/ns/mnt").st_ino == os.stat(f"/proc/{dockerd}/ns/mnt").st_ino
    assert inside(ns, "stat -L -c %d:%i /var/lib/docker").stdout == mounts
    assert cli.json("cluster", "status", name)["healthy"] is True
