"""End to end on local namespace nodes: real sshd, real dockerd, a real Docker Swarm."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from dcx import netns
from tests.testbed.local import Dcx, cluster_yaml, leftovers, registry_entries, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def docker(cluster: str, *args: str, check: bool = True) -> str:
    r = subprocess.run(["docker", "--context", f"dcx-{cluster}", *args], capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {r.stderr}")
    return r.stdout


def dockerd_pids(cli: Dcx, cluster: str) -> dict[str, list[int]]:
    out = {}
    for info in registry_entries(cluster):
        out[info["node"]] = sorted(netns.program_pids(info["netns"], "dockerd"))
    return out


def test_create_serve_rerun_and_destroy(dcx_cli: tuple[Dcx, list[str]], tmp_path: Path) -> None:
    cli, clusters = dcx_cli
    name = "e2e-main"
    clusters.append(name)
    spec = tmp_path / "cluster.yaml"
    spec.write_text(cluster_yaml(name, "10.213.201.0/24"))

    cli.run("cluster", "create", "-f", str(spec), check=True)
    status = cli.json("cluster", "status", name)
    assert status["healthy"] is True and status["engine"] == "swarm"
    assert sorted(n["name"] for n in status["nodes"]) == [f"{name}-control-1", f"{name}-workers-1", f"{name}-workers-2"]
    assert all(n["ready"] for n in status["nodes"])
    assert {n["name"]: n["role"] for n in status["nodes"]}[f"{name}-control-1"] == "control"
    state_file = cli.home / "clusters" / name / "state.json"
    assert oct(state_file.stat().st_mode & 0o777) == "0o600"

    # The operator's docker reaches the cluster through the context dcx made.
    nodes = docker(name, "node", "ls", "--format", "{{.Hostname}} {{.Status}}").split("\n")
    assert sorted(filter(None, nodes)) == [f"{name}-control-1 Ready", f"{name}-workers-1 Ready",
                                           f"{name}-workers-2 Ready"]
    labels = json.loads(docker(name, "node", "inspect", f"{name}-workers-1", "--format", "{{json .Spec.Labels}}"))
    assert labels["dcx.pool"] == "workers" and labels["dcx.node"] == f"{name}-workers-1"

    # A 3-replica service, one task per node, talking across nodes over an overlay network.
    cli.run("image", "import", name, "--busybox", "--tag", "dcx-e2e/busybox:1", check=True)
    docker(name, "network", "create", "--driver", "overlay", "--attachable", "e2e-net")
    # dnsrr: this kernel has no IPVS, which swarm's virtual IPs need.
    docker(name, "service", "create", "--detach", "--name", "web", "--replicas", "3", "--replicas-max-per-node", "1",
           "--endpoint-mode", "dnsrr", "--network", "e2e-net", "dcx-e2e/busybox:1", "sh", "-c",
           'echo "hello from $(hostname)" > /var/www/index.html && exec httpd -f -p 80 -h /var/www')

    def running_nodes() -> list[str]:
        out = docker(name, "service", "ps", "web", "--filter", "desired-state=running", "--format",
                     "{{.Node}} {{.CurrentState}}")
        rows = [line.split()[0] for line in out.splitlines() if " Running" in line]
        return rows if len(rows) == 3 else []

    placed = wait_for(running_nodes, 90, "3 running tasks")
    assert sorted(placed) == sorted(n["name"] for n in status["nodes"])

    def replies_from_every_task() -> str:
        # A task's DNS record may trail its Running state by a moment: ask again until all three answer.
        out = docker(name, "run", "--rm", "--network", "e2e-net", "dcx-e2e/busybox:1", "sh", "-c",
                     "for ip in $(nslookup tasks.web 2>/dev/null | awk '/^Address: /{print $2}'); do "
                     "wget -q -O - http://$ip/; done")
        return out if len({line for line in out.splitlines() if line.startswith("hello from")}) == 3 else ""

    wait_for(replies_from_every_task, 60, "an answer from each of the 3 tasks over the overlay")

    # A second create changes nothing: same daemons, same swarm membership, nothing joined again.
    before_pids = dockerd_pids(cli, name)
    before_ids = docker(name, "node", "ls", "-q")
    again = cli.run("cluster", "create", "-f", str(spec), check=True)
    assert "==> Join workers (2 hosts)\n    0 changed, 2 unchanged" in again.stdout
    assert "==> Initialise swarm" not in again.stdout
    assert "creating" not in again.stdout
    assert dockerd_pids(cli, name) == before_pids
    assert docker(name, "node", "ls", "-q") == before_ids
    assert cli.json("cluster", "plan", "-f", str(spec))["empty"] is True

    cluster_id = cli.state(name)["id"]
    r = cli.run("cluster", "destroy", name, "--yes")
    assert r.returncode == 0, r.stderr
    assert leftovers(cluster_id, name) == []
    assert not (cli.home / "clusters" / name).exists()
    assert not [b for b in Path("/sys/class/net").iterdir()
                if b.name == netns.bridge_name(f"{cluster_id}/10.213.201.0/24")]
    assert subprocess.run(["docker", "context", "inspect", f"dcx-{name}"], capture_output=True).returncode != 0


class ProcessSampler:
    """Reads every process's command line (/proc/PID/cmdline, what `ps -eo args` shows to any local user)
    and environment (/proc/PID/environ) over and over, in a thread, keeping each distinct one. The
    local nodes share this machine's PID namespace, so this sees every process of every node."""

    def __init__(self) -> None:
        self.cmdlines: set[bytes] = set()
        self.environs: set[bytes] = set()
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    for name, seen in (("cmdline", self.cmdlines), ("environ", self.environs)):
                        with contextlib.suppress(OSError):
                            seen.add(Path(f"/proc/{pid}/{name}").read_bytes())
            if self.rounds % 5 == 0:  # and what ps itself prints, as another user would run it
                ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, check=False).stdout
                self.cmdlines.update(ps.splitlines())
            self.rounds += 1
            self._stop.wait(0.02)  # a join lasts a second or more; leave the 2 cores to the create

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_ha_control_plane_joins_keep_tokens_off_every_command_line(dcx_cli: tuple[Dcx, list[str]],
                                                                     tmp_path: Path) -> None:
    cli, clusters = dcx_cli
    name = "e2e-ha"
    clusters.append(name)
    spec = tmp_path / "cluster.yaml"
    spec.write_text(cluster_yaml(name, "10.213.202.0/24", control=3, workers=2))
    with ProcessSampler() as sampler:
        cli.run("cluster", "create", "-f", str(spec), check=True)
    status = cli.json("cluster", "status", name)
    assert status["healthy"] is True
    controls = [n for n in status["nodes"] if n["role"] == "control"]
    assert len(controls) == 3 and all(n["ready"] for n in controls)
    assert sum(n["leader"] for n in status["nodes"]) == 1
    managers = docker(name, "node", "ls", "--filter", "role=manager", "-q").split()
    assert len(managers) == 3
    assert len(docker(name, "node", "ls", "--filter", "role=worker", "-q").split()) == 2

    # Joins went through the Engine API over dial-stdio (the sampler saw them) and no token (manager
    # or worker) was ever on a command line or in an environment.
    tokens = [docker(name, "swarm", "join-token", "-q", role).strip().encode() for role in ("manager", "worker")]
    assert all(t.startswith(b"SWMTKN-1-") for t in tokens)
    assert any(b"dial-stdio" in c for c in sampler.cmdlines), f"no join seen in {sampler.rounds} samples"
    leaks = [c for c in sampler.cmdlines | sampler.environs if any(t in c for t in tokens) or b"SWMTKN" in c]
    assert leaks == [], f"join tokens visible to local users: {len(leaks)} process entries"


def test_unreachable_node_fails_naming_it_and_rerun_converges(dcx_cli: tuple[Dcx, list[str]], tmp_path: Path) -> None:
    cli, clusters = dcx_cli
    name = "e2e-fail"
    clusters.append(name)
    spec = tmp_path / "cluster.yaml"
    spec.write_text(cluster_yaml(name, "10.213.203.0/24", control=1, workers=2))
    cli.run("cluster", "create", "-f", str(spec), "--provision-only", check=True)
    assert cli.state(name)["status"] == "provisioned"
    victim = f"{name}-workers-2"
    ns = next(e["netns"] for e in registry_entries(name) if e["node"] == victim)
    sshd = netns.sshd_pid(ns)
    assert sshd
    os.kill(sshd, signal.SIGSTOP)  # sshd stops answering: connections hang, like a machine gone away
    try:
        r = cli.run("cluster", "create", "-f", str(spec), "--ssh-timeout", "3")
        assert r.returncode == 1
        assert "phase 'Connect over SSH' failed on 1/3 hosts:" in r.stderr
        assert f"{victim}: cannot reach {victim} over SSH" in r.stderr
        assert "Traceback" not in r.stderr
        assert cli.state(name)["status"] == "failed"
    finally:
        os.kill(sshd, signal.SIGCONT)
    cli.run("cluster", "create", "-f", str(spec), check=True)
    assert cli.json("cluster", "status", name)["healthy"] is True


def test_sigkill_mid_create_then_rerun_and_destroy(dcx_cli: tuple[Dcx, list[str]], tmp_path: Path) -> None:
    cli, clusters = dcx_cli
    name = "e2e-kill"
    clusters.append(name)
    spec = tmp_path / "cluster.yaml"
    spec.write_text(cluster_yaml(name, "10.213.204.0/24", control=1, workers=3))
    proc = subprocess.Popen(cli.argv("cluster", "create", "-f", str(spec)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=cli.env, stdin=subprocess.DEVNULL)
    seen = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("creating 3 node(s) in pool workers"):
                break
        # Kill it while it is making the workers' namespace hosts.
        wait_for(lambda: len(registry_entries(name)) >= 2 or proc.poll() is not None, 30, "a worker being made")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stdout is not None
    assert proc.returncode == -signal.SIGKILL, "".join(seen) + proc.stdout.read()
    assert cli.state(name)["status"] != "ready"

    r = cli.run("cluster", "create", "-f", str(spec))
    assert r.returncode == 0, r.stdout + r.stderr
    status = cli.json("cluster", "status", name)
    assert status["healthy"] is True and len(status["nodes"]) == 4

    cluster_id = cli.state(name)["id"]
    assert cli.run("cluster", "destroy", name, "--yes").returncode == 0
    assert leftovers(cluster_id, name) == []


def test_destroy_without_state_sweeps_by_name(dcx_cli: tuple[Dcx, list[str]], tmp_path: Path) -> None:
    cli, clusters = dcx_cli
    name = "e2e-nostate"
    clusters.append(name)
    spec = tmp_path / "cluster.yaml"
    spec.write_text(cluster_yaml(name, "10.213.205.0/24", control=1, workers=1))
    cli.run("cluster", "create", "-f", str(spec), "--provision-only", check=True)
    cluster_id = cli.state(name)["id"]
    entries = registry_entries(name)
    assert len(entries) == 2
    bridges = {e["bridge"] for e in entries}
    shutil.rmtree(cli.home / "clusters" / name)  # the operator lost the state directory
    r = cli.run("cluster", "destroy", "-f", str(spec), "--yes")
    assert r.returncode == 0, r.stderr
    assert leftovers(cluster_id, name) == []
    assert not [b for b in bridges if netns.link_exists(b)]


def test_pool_subnet_taken_by_another_interface_is_refused(dcx_cli: tuple[Dcx, list[str]], tmp_path: Path) -> None:
    """A leftover interface in the pool's subnet would take the nodes' traffic: one line names it."""
    cli, clusters = dcx_cli
    name = "e2e-overlap"
    clusters.append(name)
    squatter = "dcxtest-squat"
    subprocess.run(["ip", "link", "add", squatter, "type", "bridge"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", "10.213.206.1/24", "dev", squatter], check=True)
        spec = tmp_path / "cluster.yaml"
        spec.write_text(cluster_yaml(name, "10.213.206.0/24", control=1, workers=0))
        r = cli.run("cluster", "create", "-f", str(spec))
        assert r.returncode == 1, r.stdout + r.stderr
        assert ("error: subnet 10.213.206.0/24 of pool control overlaps 10.213.206.1/24 on interface "
                f"{squatter} of this machine") in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert registry_entries(name) == []  # refused before any node was made
    finally:
        subprocess.run(["ip", "link", "del", squatter], check=False)


def test_create_after_losing_dcx_home_names_the_old_cluster(dcx_cli: tuple[Dcx, list[str]], tmp_path: Path) -> None:
    """The operator lost DCX_HOME and runs create again: the old nodes hold the pool's subnet. The refusal
    names that cluster (never `ip link del` of a bridge with live nodes), destroy -f of the new attempt
    says the old cluster remains and how to remove it, and that command removes it."""
    cli, clusters = dcx_cli
    name = "e2e-lost"
    clusters.append(name)
    spec = tmp_path / "cluster.yaml"
    spec.write_text(cluster_yaml(name, "10.213.207.0/24", control=1, workers=0))
    cli.run("cluster", "create", "-f", str(spec), "--provision-only", check=True)
    old_id = cli.state(name)["id"]
    shutil.rmtree(cli.home)  # the whole DCX_HOME is gone
    again = cli.run("cluster", "create", "-f", str(spec))
    assert again.returncode == 1, again.stdout + again.stderr
    assert f"{name} (id {old_id})" in again.stderr and "ip link del" not in again.stderr, again.stderr
    gone = cli.run("cluster", "destroy", "-f", str(spec), "--yes")
    assert gone.returncode == 0, gone.stderr
    assert f"another cluster named '{name}' remains (id {old_id}" in gone.stderr, gone.stderr
    assert f"--cluster-id {old_id}" in gone.stderr
    assert registry_entries(name), "the old cluster's nodes must still be there"
    r = cli.run("cluster", "destroy", "-f", str(spec), "--cluster-id", old_id, "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert leftovers(old_id, name) == [] and registry_entries(name) == []


def test_destroy_goes_on_past_a_dead_bare_metal_host(dcx_cli: tuple[Dcx, list[str]], tmp_path: Path) -> None:
    """One provider that cannot finish (a given machine that is gone) must not leave the others' machines:
    destroy removes what it can, keeps the state and says what is left; --skip-unreachable ends it."""
    cli, clusters = dcx_cli
    name = "e2e-deadhost"
    clusters.append(name)
    spec = tmp_path / "cluster.yaml"
    # The ssh pool first: its provider is destroyed first, fails, and the local one must still go.
    local = cluster_yaml(name, "10.213.211.0/24", control=1, workers=0).splitlines()
    dead = ("    - {name: metal, role: worker, provider: ssh,"
            " ssh: {hosts: [{name: gone-1, address: 127.0.0.1, port: 1}]}}")
    spec.write_text("\n".join(local[:-1] + [dead, local[-1]]) + "\n")
    cli.run("cluster", "create", "-f", str(spec), "--provision-only", check=True)
    cluster_id = cli.state(name)["id"]
    assert len(registry_entries(name)) == 1

    r = cli.run("cluster", "destroy", name, "--yes", "--ssh-timeout", "2")
    assert r.returncode == 1, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: destroy of {name} did not finish (ssh: "), r.stderr
    assert "--skip-unreachable" in r.stderr and "Traceback" not in r.stderr
    assert "gone-1" in r.stdout + r.stderr
    said = r.stdout + r.stderr
    assert -1 < said.index("destroying ssh resources") < said.index("destroying local resources"), said
    assert leftovers(cluster_id, name) == []  # the local node went although the ssh host failed first
    assert cli.state(name)["status"] == "destroy-failed"

    r = cli.run("cluster", "destroy", name, "--yes", "--ssh-timeout", "2", "--skip-unreachable")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "not reset (unreachable, left as it is): gone-1" in r.stdout + r.stderr
    assert not (cli.home / "clusters" / name).exists()
