"""Helpers for end-to-end tests on local namespace nodes: prerequisites (skip with a reason),
running the real `dcx` command, and a teardown that removes everything a test made, even after a
failure or a killed dcx."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dcx import netns

REGISTRY = Path("/run/dcx/local")


@functools.cache  # the probe makes and removes a namespace: once per test session is enough
def missing_for_namespace_nodes() -> str | None:
    """Why namespace-node tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, bridges)"
    for tool, package in (("ip", "iproute2"), ("nsenter", "util-linux"), ("dockerd", "docker.io"),
                          ("ssh-keygen", "openssh-client"), ("docker", "docker.io")):
        if not shutil.which(tool):
            return f"'{tool}' missing (apt-get install {package}; scripts/setup does it)"
    if not Path("/usr/sbin/sshd").exists():
        return "sshd missing (apt-get install openssh-server; scripts/setup does it)"
    probe = subprocess.run(["ip", "netns", "add", "dcx-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create network namespaces here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "dcx-probe"], capture_output=True)
    return None


def skip_without_namespace_nodes() -> None:
    """Skip the calling test or fixture, with the reason printed, where namespace nodes cannot run.
    Otherwise the first call of a test session takes this machine's namespace-test lock (held until the
    session ends) and removes what an interrupted earlier run left."""
    why = missing_for_namespace_nodes()
    if why:
        pytest.skip(f"namespace nodes unavailable: {why}")
    _exclusive_namespace_session()


SESSION_LOCK = Path("/run/dcx-tests.lock")


@functools.cache
def _exclusive_namespace_session() -> None:
    """Two test sessions on one machine (two developers, a developer and CI) must not sweep each other's
    hosts: the one that comes second waits here, then sweeps what is truly left over."""
    import fcntl

    handle = open(SESSION_LOCK, "a+")  # noqa: SIM115 - held open (and locked) for the process's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"\nwaiting for another test session's namespace hosts ({SESSION_LOCK})", file=sys.__stderr__,
              flush=True)
        fcntl.flock(handle, fcntl.LOCK_EX)
    _SESSION_LOCK_HANDLES.append(handle)
    removed = sweep_interrupted_runs()
    if removed:
        print("\nremoved what an interrupted earlier run left: " + ", ".join(removed), file=sys.__stderr__,
              flush=True)


_SESSION_LOCK_HANDLES: list[Any] = []


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll until `predicate` returns something truthy (returned), or fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def cloud_cluster_yaml(name: str, pools: list[str], ssh_cidr: str, extra: str = "", user: str = "root") -> str:
    """A swarm spec with the given pool lines (flow mappings) and network.sshCIDR, as cloud pools need."""
    lines = ["apiVersion: dcx/v1", "kind: Cluster", f"metadata: {{name: {name}}}", "spec:",
             "  engine: {type: swarm}", f"  ssh: {{user: {user}}}", f"  network: {{sshCIDR: '{ssh_cidr}'}}",
             "  pools:"]
    lines += [f"    - {p}" for p in pools]
    return "\n".join(lines) + "\n" + extra


def cluster_yaml(name: str, subnet: str, control: int = 1, workers: int = 2, extra: str = "") -> str:
    lines = ["apiVersion: dcx/v1", "kind: Cluster", f"metadata: {{name: {name}}}", "spec:",
             "  engine: {type: swarm}", "  pools:",
             f"    - {{name: control, role: control, count: {control}, provider: local, local: {{subnet: {subnet}}}}}"]
    if workers:
        lines.append(f"    - {{name: workers, role: worker, count: {workers}, provider: local, "
                     f"local: {{subnet: {subnet}}}}}")
    return "\n".join(lines) + "\n" + extra


class Dcx:
    """Runs the real CLI in a subprocess with its own DCX_HOME."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "DCX_HOME": str(home), "NO_COLOR": "1"}

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "dcx", *args]

    def run(self, *args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(self.argv(*args), capture_output=True, text=True, env=self.env, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise AssertionError(f"dcx {' '.join(args)} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def json(self, *args: str) -> Any:
        r = self.run(*args, "-o", "json")
        try:
            return json.loads(r.stdout)
        except ValueError:
            detail = f"{r.stdout}\n{r.stderr}"
            raise AssertionError(f"dcx {' '.join(args)}: no JSON (exit {r.returncode})\n{detail}") from None

    def state(self, cluster: str) -> dict[str, Any]:
        return json.loads((self.home / "clusters" / cluster / "state.json").read_text())


def registry_entries(cluster: str) -> list[dict[str, Any]]:
    return [info for info in _all_registry_entries() if info.get("cluster") == cluster]


def leftovers(cluster_id: str, cluster: str) -> list[str]:
    """Everything of a cluster still on this machine: namespaces, processes, bridges, registry files."""
    found = [f"netns {ns}" for ns in netns.list_netns() if ns.startswith(f"dcx-{cluster_id}-")]
    found += [f"registry {e['netns']}" for e in registry_entries(cluster)]
    for ns in netns.list_netns():
        if ns.startswith(f"dcx-{cluster_id}-"):
            found += [f"pid {p}" for p in netns.host_processes(ns)]
    return found


@contextlib.contextmanager
def clusters_destroyed_after(cli: Dcx) -> Iterator[list[str]]:
    """The list a test appends its cluster names to. Afterwards, whatever the test left (it failed, dcx
    was killed): each cluster that still has state is destroyed, then `force_cleanup` sweeps."""
    clusters: list[str] = []
    try:
        yield clusters
    finally:
        for name in clusters:
            if (cli.home / "clusters" / name).exists():
                cli.run("cluster", "destroy", name, "--yes", timeout=300)
        force_cleanup(cli.home, clusters)


def destroy_without_state_picks_by_id(cli: Dcx, spec: Path, name: str, mine: str, theirs: str) -> None:
    """Two clusters named `name` in one account, `cli`'s state of it lost: `destroy -f` exits 2 listing
    both ids with a hint to pass --cluster-id; with `--cluster-id mine` it destroys (that one only: the
    caller checks what is left)."""
    shutil.rmtree(cli.home / "clusters" / name)
    r = cli.run("cluster", "destroy", "-f", str(spec), "--yes")
    assert r.returncode == 2 and "--cluster-id" in r.stderr, r.stdout + r.stderr
    assert mine in r.stdout + r.stderr and theirs in r.stdout + r.stderr
    r = cli.run("cluster", "destroy", "-f", str(spec), "--yes", "--cluster-id", mine)
    assert r.returncode == 0, r.stdout + r.stderr


def write(tmp_path: Path, text: str, name: str = "cluster.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def force_cleanup(home: Path, clusters: list[str]) -> None:
    """The safety net behind every e2e test: remove what `dcx destroy` should have, by name and id."""
    ids = set()
    for name in clusters:
        state = home / "clusters" / name / "state.json"
        if state.exists():
            ids.add(json.loads(state.read_text()).get("id", ""))
        for info in registry_entries(name):
            ids.add(info.get("cluster_id", ""))
            netns.stop_host(info["netns"], Path(info["home"]) if info.get("home") else None)
            (REGISTRY / f"{info['netns']}.json").unlink(missing_ok=True)
    ids.discard("")
    for ns in netns.list_netns():
        if any(ns.startswith(f"dcx-{i}-") for i in ids):
            netns.stop_host(ns, None)
    for link in Path("/sys/class/net").iterdir():
        if link.name.startswith("dcxb") and not netns.bridge_ports(link.name):
            # Only bridges of this test's clusters: their names derive from the cluster id.
            if any(_bridge_of(link.name, i, home) for i in ids):
                netns.delete_bridge(link.name)
    for name in clusters if shutil.which("docker") else []:
        subprocess.run(["docker", "context", "rm", "-f", f"dcx-{name}"], capture_output=True)


TEST_ONLY_NETNS = ("dcxlab-", "dcxtest-")  # tests/testbed's labs and boot simulators; dcx never makes these


def sweep_interrupted_runs() -> list[str]:
    """What an earlier test run left when it was killed before its teardowns (a lost machine, a restarted
    sandbox): test-only namespace hosts, local nodes whose home is a pytest directory, and dcx bridges
    with no ports that no remaining local node uses (a bridge left behind takes the traffic of any later
    bridge on its subnet). Run under the namespace-test lock (see _exclusive_namespace_session).
    Returns what it removed."""
    removed = []
    pytest_dirs = str(Path(tempfile.gettempdir()) / "pytest-of-")
    for path in sorted(REGISTRY.glob("*.json")) if REGISTRY.is_dir() else []:
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if str(info.get("home", "")).startswith(pytest_dirs):
            netns.stop_host(info["netns"], Path(info["home"]))
            path.unlink(missing_ok=True)
            removed.append(f"node {info['netns']} ({info.get('cluster')})")
    for ns in netns.list_netns():
        if ns.startswith(TEST_ONLY_NETNS):
            netns.stop_host(ns, None)
            removed.append(f"namespace {ns}")
    in_use = {e.get("bridge") for e in _all_registry_entries()}
    for link in sorted(Path("/sys/class/net").iterdir()):
        if link.name.startswith("dcxb") and link.name not in in_use and not netns.bridge_ports(link.name):
            netns.delete_bridge(link.name)
            removed.append(f"bridge {link.name}")
    return removed


def _all_registry_entries() -> list[dict[str, Any]]:
    out = []
    for path in REGISTRY.glob("*.json") if REGISTRY.is_dir() else []:
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return out


def _bridge_of(bridge: str, cluster_id: str, home: Path) -> bool:
    for state in home.glob("clusters/*/state.json"):
        data = json.loads(state.read_text())
        if data.get("id") != cluster_id:
            continue
        if f"local/bridge/{bridge}" in data.get("resources", {}):
            return True
    return False
