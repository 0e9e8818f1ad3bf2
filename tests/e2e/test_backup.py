"""Backup and restore on namespace nodes, and images that follow the cluster: a swarm with autolock on, a
service using a secret, a config and an overlay network, and an image put there with `dcx image import`, is
backed up, destroyed, and built again on new machines with `create --restore`; everything comes back, the
image is on the new nodes before they join, and no join token or unlock key appears in any output or log."""

from __future__ import annotations

import json
import re
import stat
import time
from pathlib import Path

import pytest

from tests.e2e.test_day2 import docker
from tests.testbed.local import Dcx, cluster_yaml, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

IMAGE = "dcx-e2e/busybox:1"


def run_logs(cli: Dcx, cluster: str) -> str:
    return "\n".join(p.read_text() for p in sorted((cli.home / "clusters" / cluster / "logs").glob("*.log")))


def test_backup_destroy_restore_brings_the_cluster_back(dcx_cli: tuple[Dcx, list[str]], tmp_path: Path) -> None:
    cli, clusters = dcx_cli
    old, new = "e2e-bk-old", "e2e-bk-new"
    clusters += [old, new]
    started = time.monotonic()
    spec = tmp_path / "old.yaml"
    spec.write_text(cluster_yaml(old, "10.213.225.0/24", workers=1))
    cli.run("cluster", "create", "-f", str(spec), check=True)
    cli.run("image", "import", old, "--busybox", "--tag", IMAGE, check=True)
    assert cli.state(old)["images"], "the imported image is not recorded"

    key = docker(cli, old, "swarm", "update", "--autolock=true")
    unlock_key = re.search(r"SWMKEY-\S+", key).group(0)  # type: ignore[union-attr]
    tokens = [docker(cli, old, "swarm", "join-token", "-q", role).strip() for role in ("worker", "manager")]
    swarm_id = docker(cli, old, "info", "--format", "{{.Swarm.Cluster.ID}}").strip()
    docker(cli, old, "network", "create", "--driver", "overlay", "bk-net")
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t-value\n")
    docker(cli, old, "secret", "create", "bk-secret", str(secret))
    docker(cli, old, "config", "create", "bk-config", str(secret))
    # The task reads its secret and config at start: it runs only where both are mounted.
    docker(cli, old, "service", "create", "--detach", "--name", "web", "--replicas", "2", "--endpoint-mode", "dnsrr",
           "--network", "bk-net", "--secret", "bk-secret", "--config", "source=bk-config,target=/etc/bk.conf",
           "--stop-grace-period", "1s", IMAGE, "sh", "-c",
           "grep -q s3cr3t-value /run/secrets/bk-secret && grep -q s3cr3t /etc/bk.conf && exec sleep 1000000")
    wait_for(lambda: docker(cli, old, "service", "ls", "--format", "{{.Replicas}}").strip() == "2/2", 60,
             "web to run 2/2 before the backup")
    made = time.monotonic() - started

    archive = tmp_path / "backup.tar.gz"
    t0 = time.monotonic()
    backup = cli.run("cluster", "backup", old, "-o", str(archive), check=True)
    backup_s = time.monotonic() - t0
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    assert "control plane pauses" in backup.stdout + backup.stderr  # one manager: said out loud
    # The manager came back (unlocked by dcx) and the service runs again.
    wait_for(lambda: docker(cli, old, "service", "ls", "--format", "{{.Replicas}}").strip() == "2/2", 60,
             "web to run 2/2 after the backup")
    old_logs = run_logs(cli, old)

    cli.run("cluster", "destroy", old, "--yes", check=True)

    # A cluster of the same name as one that has state is refused (one line, exit 2): here the new one,
    # made now, restored into twice.
    spec2 = tmp_path / "new.yaml"
    spec2.write_text(cluster_yaml(new, "10.213.226.0/24", workers=1))
    t0 = time.monotonic()
    restored = cli.run("cluster", "create", "-f", str(spec2), "--restore", str(archive), timeout=600)
    restore_s = time.monotonic() - t0
    assert restored.returncode == 0, restored.stdout + restored.stderr + run_logs(cli, new)[-6000:]

    assert docker(cli, new, "info", "--format", "{{.Swarm.Cluster.ID}}").strip() == swarm_id
    assert docker(cli, new, "secret", "ls", "--format", "{{.Name}}").split() == ["bk-secret"]
    assert docker(cli, new, "config", "ls", "--format", "{{.Name}}").split() == ["bk-config"]
    assert "bk-net" in docker(cli, new, "network", "ls", "--format", "{{.Name}}").split()
    wait_for(lambda: docker(cli, new, "service", "ls", "--format", "{{.Name}} {{.Replicas}}").strip() == "web 2/2",
             90, "web to run 2/2 on the restored cluster")
    running = docker(cli, new, "service", "ps", "web", "--filter", "desired-state=running", "--format", "{{.Node}}")
    assert set(running.split()) <= {f"{new}-control-1", f"{new}-workers-1"}, running
    # The old machines' entries are gone: only the new nodes are in the swarm.
    assert sorted(docker(cli, new, "node", "ls", "--format", "{{.Hostname}}").split()) == [
        f"{new}-control-1", f"{new}-workers-1"]
    # The image followed: recorded again, on both new nodes, loaded before they joined.
    assert cli.state(new)["images"]
    inspect = cli.run("-o", "json", "node", "run", new, "--", f"docker image inspect --format ok {IMAGE}")
    on_nodes = json.loads(inspect.stdout)
    assert [n["exit_code"] for n in on_nodes["nodes"]] == [0, 0], inspect.stdout + inspect.stderr
    new_logs = run_logs(cli, new)
    order = [m.group(1) for m in re.finditer(r"==> (.+?) \(\d+ hosts\)", new_logs)]
    assert order.index("Load the cluster's images") < order.index("Join workers"), order
    assert order.index("Load the cluster's images") < order.index(
        "Restore the swarm from the backup on the first control node"), order

    # A scale-up: the worker that joins now gets the image before it joins too.
    spec2.write_text(cluster_yaml(new, "10.213.226.0/24", workers=2))
    logs_before = set((cli.home / "clusters" / new / "logs").glob("*.log"))
    t0 = time.monotonic()
    cli.run("cluster", "create", "-f", str(spec2), check=True, timeout=600)
    scale_s = time.monotonic() - t0
    grown = f"{new}-workers-2"
    inspect = cli.run("-o", "json", "node", "run", new, "--node", grown, "--",
                      f"docker image inspect --format ok {IMAGE}")
    assert json.loads(inspect.stdout)["nodes"][0]["exit_code"] == 0, inspect.stdout + inspect.stderr
    [scale_log] = [p for p in (cli.home / "clusters" / new / "logs").glob("*-create.log") if p not in logs_before]
    text = scale_log.read_text()
    assert re.search(rf"Load the cluster's images: {grown}: changed", text), "the new worker did not get the image"
    order = [m.group(1) for m in re.finditer(r"==> (.+?) \(\d+ hosts\)", text)]
    assert order.index("Load the cluster's images") < order.index("Join workers"), order
    new_logs = run_logs(cli, new)

    # A second restore into the cluster that now has state: one line, exit 2.
    again = cli.run("cluster", "create", "-f", str(spec2), "--restore", str(archive))
    assert again.returncode == 2 and "already has state" in again.stderr, again.stdout + again.stderr
    assert len(again.stderr.strip().splitlines()) <= 2, again.stderr  # the line and its hint

    # Secrets: never in any output or log.
    seen = "\n".join([backup.stdout, backup.stderr, restored.stdout, restored.stderr, old_logs, new_logs])
    for value in [unlock_key, *tokens]:
        assert value not in seen
    print(f"\nbackup/restore: cluster + service {made:.1f}s, backup {backup_s:.1f}s "
          f"({archive.stat().st_size} bytes), restore create {restore_s:.1f}s, scale-up +1 worker {scale_s:.1f}s, "
          f"total {time.monotonic() - started:.1f}s")


def test_a_swarm_of_three_managers_is_backed_up_from_a_follower_and_restored(dcx_cli: tuple[Dcx, list[str]],
                                                                             tmp_path: Path) -> None:
    """Three managers: with autolock on the backup is refused before anything stops (a restored manager could
    not be unlocked without its old quorum), saying what to do; with autolock off it is copied from a
    non-leader while the other two keep the quorum, and restored on three new machines: the same swarm
    with its secret, all three managers ready."""
    cli, clusters = dcx_cli
    old, new = "e2e-bk3-old", "e2e-bk3-new"
    clusters += [old, new]
    spec = tmp_path / "old.yaml"
    spec.write_text(cluster_yaml(old, "10.213.227.0/24", control=3, workers=0))
    cli.run("cluster", "create", "-f", str(spec), check=True)
    docker(cli, old, "swarm", "update", "--autolock=true")
    swarm_id = docker(cli, old, "info", "--format", "{{.Swarm.Cluster.ID}}").strip()
    secret = tmp_path / "secret.txt"
    secret.write_text("three-managers\n")
    docker(cli, old, "secret", "create", "bk3-secret", str(secret))
    managers = docker(cli, old, "node", "ls", "--format", "{{.Hostname}} {{.ManagerStatus}}")
    [leader] = [line.split()[0] for line in managers.splitlines() if line.endswith("Leader")]

    archive = tmp_path / "backup.tar.gz"
    refused = cli.run("cluster", "backup", old, "-o", str(archive))
    assert refused.returncode == 1 and not archive.exists(), refused.stdout + refused.stderr
    assert "autolock on and 3 managers" in refused.stderr and "--autolock=false" in refused.stderr, refused.stderr
    assert "copying the raft directory" not in refused.stdout + refused.stderr  # refused before any dockerd stopped

    docker(cli, old, "swarm", "update", "--autolock=false")
    backup = cli.run("cluster", "backup", old, "-o", str(archive), check=True)
    said = backup.stdout + backup.stderr
    copied = re.search(r"copying the raft directory of (\S+), a non-leader manager: the other 2 keep the quorum", said)
    assert copied and copied.group(1) != leader, said
    cli.run("cluster", "destroy", old, "--yes", check=True)

    spec2 = tmp_path / "new.yaml"
    spec2.write_text(cluster_yaml(new, "10.213.228.0/24", control=3, workers=0))
    restored = cli.run("cluster", "create", "-f", str(spec2), "--restore", str(archive), timeout=600)
    assert restored.returncode == 0, restored.stdout + restored.stderr + run_logs(cli, new)[-6000:]
    assert docker(cli, new, "info", "--format", "{{.Swarm.Cluster.ID}}").strip() == swarm_id
    assert docker(cli, new, "secret", "ls", "--format", "{{.Name}}").split() == ["bk3-secret"]
    rows = docker(cli, new, "node", "ls", "--format", "{{.Hostname}} {{.Status}} {{.ManagerStatus}}").splitlines()
    assert sorted(line.split()[0] for line in rows) == [f"{new}-control-{i}" for i in (1, 2, 3)], rows
    assert all(line.split()[1:] in (["Ready", "Leader"], ["Ready", "Reachable"]) for line in rows), rows
    # Every manager's raft address is its own (the restored one moved off the old machine's address), and the
    # redirects the joins needed meanwhile are gone.
    ids = docker(cli, new, "node", "ls", "-q").split()
    addrs = docker(cli, new, "node", "inspect", *ids, "--format", "{{.Description.Hostname}} {{.ManagerStatus.Addr}}")
    assert all(line.split()[1].startswith("10.213.228.") for line in addrs.splitlines()), addrs
    assert "Move the restored manager to its own raft address" in restored.stdout, restored.stdout
    rules = cli.run("-o", "json", "node", "run", new, "--", "iptables -t nat -S OUTPUT; ip route show proto 186")
    assert rules.returncode == 0 and "dcx raft redirect" not in rules.stdout and "10.213.227." not in rules.stdout, \
        rules.stdout

    # A control node demoted by hand (or left a worker by a run stopped between the demote and the promote
    # above) is a manager again after a re-run.
    docker(cli, new, "node", "demote", f"{new}-control-3")

    def is_worker_now() -> bool:
        r = cli.run("node", "run", new, "--node", f"{new}-control-3", "--",
                    "docker info --format '{{.Swarm.ControlAvailable}}'")
        return r.returncode == 0 and "false" in r.stdout

    wait_for(is_worker_now, 60, f"{new}-control-3 to be a worker")
    again = cli.run("cluster", "create", "-f", str(spec2), timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "==> Join control nodes (3 hosts)\n    1 changed, 2 unchanged" in again.stdout, again.stdout
    rows = docker(cli, new, "node", "ls", "--format", "{{.Hostname}} {{.ManagerStatus}}").splitlines()
    assert all(line.split()[1:] in (["Leader"], ["Reachable"]) for line in rows), rows
