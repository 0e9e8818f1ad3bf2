"""Contract tests for the k3s engine: what reaches each node (config.yaml per role, the exact commands
and environment per init system), where the token may go (stdin only), and the kubeconfig merge.

No k3s runs here (it cannot be downloaded). The phase-level tests drive the real phases over
`FakeRemote`, a stand-in for the SSH connection that keeps a little state per host (config written,
installed, running) so that ordering and idempotence can be checked; it does not pretend to be k3s.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shlex
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from dcx.bootstrap import k3s, kubeconfig
from dcx.bootstrap.phases import Host, PhaseFailed, RunContext, run_phases
from dcx.bootstrap.runtime import Facts
from dcx.bootstrap.ssh import Result, Target
from dcx.errors import OperationFailed, SpecError
from dcx.log import redact, start_run_log, stop_run_log
from dcx.providers.base import Node
from dcx.spec import ClusterSpec
from dcx.state import ClusterDir

# --- building contexts ------------------------------------------------------------------------------


def make_spec(controls: int = 1, workers: int = 1, *, mesh: str = "none", labels: dict[str, str] | None = None,
              taints: list[str] | None = None, engine: dict[str, Any] | None = None, file: str = "") -> ClusterSpec:
    pools = [{"name": "control", "role": "control", "count": controls, "provider": "local"}]
    if workers:
        pools.append({"name": "workers", "role": "worker", "count": workers, "provider": "local",
                      "labels": labels or {}, "taints": taints or []})
    spec = ClusterSpec.model_validate({
        "apiVersion": "dcx/v1", "kind": "Cluster", "metadata": {"name": "demo"},
        "spec": {"engine": {"type": "k3s", **(engine or {})}, "network": {"mesh": mesh}, "pools": pools}})
    spec._file = file
    return spec


def make_ctx(spec: ClusterSpec, init: str = "systemd", cdir: ClusterDir | None = None,
             remote: type[FakeRemote] | None = None) -> RunContext:
    hosts = []
    cluster = Cluster()
    n = 0
    for pool in spec.spec.pools:
        for i in range(1, (pool.count or 0) + 1):
            n += 1
            node = Node(name=f"demo-{pool.name}-{i}", pool=pool.name, provider="local", role=pool.role,
                        ssh_address=f"203.0.113.{n}", private_address=f"10.0.0.{n}",
                        public_address=f"198.51.100.{n}", labels=dict(pool.labels))
            conn = (remote or FakeRemote)(node.name, init, cluster)
            host = Host(node=node, target=Target(name=node.name, host=node.ssh_address), conn=conn)  # type: ignore[arg-type]
            host.facts = Facts(init=init, os_id="debian")
            if spec.spec.network.mesh == "wireguard":
                host.data["mesh_address"] = f"100.96.0.{n}"
            hosts.append(host)
    return RunContext(cluster_name=spec.name, spec=spec, hosts=hosts, sessions=None,  # type: ignore[arg-type]
                      secrets_dir=cdir)


def load_yaml(text: str) -> dict[str, Any]:
    return YAML(typ="safe").load(text)


# --- a stand-in for the SSH connection --------------------------------------------------------------

K3S_YAML = """apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: {ca}
    server: https://127.0.0.1:6443
  name: default
contexts:
- context:
    cluster: default
    user: default
  name: default
current-context: default
kind: Config
preferences: {{}}
users:
- name: default
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
"""
CLIENT_KEY = base64.b64encode(b"-----BEGIN EC PRIVATE KEY-----\nnot-a-real-key-but-secret\n").decode()


def sample_k3s_yaml() -> str:
    return K3S_YAML.format(ca=base64.b64encode(b"ca").decode(), cert=base64.b64encode(b"cert").decode(),
                           key=CLIENT_KEY)


class Cluster:
    """What the fake servers' API reports: every node whose k3s runs, Ready."""

    def __init__(self) -> None:
        self.remotes: list[FakeRemote] = []
        self.node_meta: dict[str, dict[str, Any]] = {}
        self.stale: set[str] = set()  # registrations of machines that are gone (listed until deleted)

    def nodes_json(self) -> str:
        items = []
        for r in self.remotes:
            if r.running:
                meta = self.meta(r)
                items.append({"metadata": meta, "spec": {},
                              "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
            elif r.name in self.stale:
                items.append({"metadata": {"name": r.name}, "status": {"conditions": [
                    {"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown"}]}})
        return json.dumps({"items": items})

    def meta(self, r: FakeRemote) -> dict[str, Any]:
        # k3s labels its servers node-role.kubernetes.io/etcd=true when they run embedded etcd.
        labels = {"node-role.kubernetes.io/etcd": "true"} if r.etcd else {}
        return self.node_meta.setdefault(r.name, {"name": r.name, "labels": labels, "annotations": {}})

    def annotate(self, node: str, key: str, value: str) -> None:
        r = next(r for r in self.remotes if r.name == node)
        self.meta(r)["annotations"][key] = value
        if key == k3s.ETCD_REMOVE and value == "true" and r.etcd:
            # k3s's etcd member controller removes the member, then records it on the node
            # (k3s pkg/etcd/member_controller.go).
            r.etcd = False
            self.meta(r)["annotations"][k3s.ETCD_REMOVED] = node


class FakeRemote:
    def __init__(self, name: str, init: str, cluster: Cluster) -> None:
        self.name = name
        self.init = init
        self.cluster = cluster
        cluster.remotes.append(self)
        self.calls: list[tuple[str, str]] = []  # (command, stdin)
        self.uploads: list[tuple[str, int, bytes]] = []
        self.files: dict[str, bytes] = {}
        self.config = ""
        self.installed = False
        self.linked = False
        self.running = False
        self.etcd = False
        self.role = "server" if "control" in name else "agent"
        self.fail_on: str | None = None

    # what Connection offers ------------------------------------------------------------------------

    def upload(self, data: bytes, dest: str, mode: int = 0o644) -> None:
        self.uploads.append((dest, mode, data))
        self.files[dest] = data

    def run(self, command: str, *, stdin: bytes | str | None = None, check: bool = False, **_: Any) -> Result:
        stdin_text = stdin.decode() if isinstance(stdin, bytes) else (stdin or "")
        self.calls.append((command, stdin_text))
        result = self.answer(command, stdin_text)
        if check and not result.ok:
            from dcx.bootstrap.ssh import CommandFailed

            raise CommandFailed(self.name, "fake", result)
        return result

    # the host's side ---------------------------------------------------------------------------

    def sha(self, path: str) -> str:
        return hashlib.sha256(self.files[path]).hexdigest() if path in self.files else ""

    def answer(self, command: str, stdin: str) -> Result:
        ok = Result(0, "", "")
        if self.fail_on and self.fail_on in command:
            token_line = next((x for x in self.config.splitlines() if x.startswith("token:")), "")
            return Result(1, "", f"boom\n{token_line}")  # output that holds the token: must be redacted
        if command.startswith("if [ -x /usr/local/bin/k3s ]"):
            return Result(0, self.state_text(), "")
        if command == k3s.write_config_command():
            self.config = stdin
            return ok
        if command.startswith("env ") and command.endswith(f"sh {k3s.INSTALL_SCRIPT}"):
            self.installed = True
            self.files.setdefault(k3s.BIN, b"k3s-from-the-internet")
            if self.init in ("systemd", "openrc"):
                self.start()
            return ok
        if command in (k3s.start_command(self.init, self.role), k3s.restart_command(self.init, self.role)):
            self.start()
            return ok
        if command == k3s.READYZ:
            return ok if self.running else Result(1, "", "connection refused")
        if command == k3s.running_check(self.init, self.role):
            return ok if self.running else Result(1, "", "")
        if command == k3s.NODES_JSON:
            return Result(0, self.cluster.nodes_json(), "")
        if command == f"cat {k3s.REMOTE_KUBECONFIG}":
            return Result(0, sample_k3s_yaml(), "")
        if command.startswith("sha256sum "):
            return Result(0, self.sha(shlex.split(command)[1]) + "\n", "")
        if command.startswith(f"{k3s.BIN} kubectl delete node "):
            self.cluster.stale.discard(shlex.split(command)[4])
            return ok
        if command.startswith(f"{k3s.BIN} kubectl annotate node "):
            _, _, _, _, node, *args = shlex.split(command)
            for pair in [a for a in args if "=" in a and not a.startswith("-")]:
                self.cluster.annotate(node, *pair.split("=", 1))
            return ok
        if command.startswith(f"{k3s.BIN} kubectl get node ") and command.endswith(" -o json"):
            node = shlex.split(command)[4]
            r = next((r for r in self.cluster.remotes if r.name == node), None)
            if r is None:  # kubectl: Error from server (NotFound), exit 1
                return Result(1, "", f'Error from server (NotFound): nodes "{node}" not found')
            return Result(0, json.dumps({"metadata": self.cluster.meta(r)}), "")
        if command.startswith(f"{k3s.BIN} kubectl "):
            return ok
        if command == k3s.links_command():
            self.linked = True
            return ok
        if command.startswith(("mkdir -p", "sed -n", k3s.fetch_script_command())):
            return ok
        raise AssertionError(f"unexpected command on {self.name}: {command}")

    def start(self) -> None:
        self.running = True
        if self.role == "server":
            self.etcd = True

    def state_text(self) -> str:
        lines = []
        if k3s.BIN in self.files:
            lines += [f"binary_sha256={self.sha(k3s.BIN)}", "version=k3s version v1.30.4+k3s1 (98262b5d)"]
        if self.config:
            lines.append(f"config_sha256={hashlib.sha256(self.config.encode()).hexdigest()}")
            if "cluster-init: true" in self.config:
                lines.append("cluster_init=1")
            server = [line for line in self.config.splitlines() if line.startswith("server: ")]
            lines.append(f"server_url={server[0][len('server: '):] if server else ''}")
        if self.etcd:
            lines.append("etcd_data=1")
        if self.installed:
            lines.append(f"{self.role}_installed=1")
        if self.init == "systemd":
            lines.append("has_systemctl=1")
        if self.running:
            lines.append("running=1")
        if self.installed or self.linked:
            lines.append("has_kubectl=1")
        if k3s.INSTALL_SCRIPT in self.files:
            lines.append(f"script_sha256={self.sha(k3s.INSTALL_SCRIPT)}")
        for path in self.files:
            if path.startswith(k3s.IMAGES_DIR):
                lines.append(f"images_sha256={self.sha(path)}")
        return "\n".join(lines) + "\n"


def commands(ctx: RunContext) -> list[tuple[str, str, str]]:
    """(host, command, stdin) of every command the run sent."""
    return [(h.name, c, s) for h in ctx.hosts for c, s in h.conn.calls]  # type: ignore[attr-defined]


def token_of(ctx: RunContext) -> str:
    configs = [load_yaml(h.conn.config) for h in ctx.hosts]  # type: ignore[attr-defined]
    tokens = {c["token"] for c in configs}
    assert len(tokens) == 1
    return tokens.pop()


# --- config.yaml per role ---------------------------------------------------------------------------


def config_for(ctx: RunContext, name: str) -> dict[str, Any]:
    run = k3s.K3sRun(ctx)
    return load_yaml(k3s.render_config(run.config(ctx, ctx.host(name))))


def test_first_control_node_starts_the_embedded_etcd(tmp_path: Path) -> None:
    ctx = make_ctx(make_spec(controls=1, workers=1), cdir=ClusterDir(tmp_path, "demo"))
    c = config_for(ctx, "demo-control-1")
    token = (tmp_path / "clusters" / "demo" / "secrets" / "k3s-token").read_text().strip()
    assert c == {
        "token": token, "node-name": "demo-control-1", "cluster-init": True,
        "node-label": ["dcx.cluster=demo", "dcx.pool=control", "dcx.provider=local"], "node-taint": [],
        "node-ip": "10.0.0.1", "node-external-ip": "198.51.100.1",
        "tls-san": ["203.0.113.1", "10.0.0.1", "198.51.100.1"], "write-kubeconfig-mode": "0600",
    }
    assert len(token) == 64 and int(token, 16) >= 0  # secrets.token_hex(32)
    assert stat.S_IMODE((tmp_path / "clusters" / "demo" / "secrets" / "k3s-token").stat().st_mode) == 0o600


def test_ha_servers_join_the_first_and_agents_join_with_the_same_token(tmp_path: Path) -> None:
    spec = make_spec(controls=3, workers=2, engine={"loadBalancer": "api.example.com:6443",
                                                    "tlsSAN": ["k8s.internal"]})
    ctx = make_ctx(spec, cdir=ClusterDir(tmp_path, "demo"))
    first, second, third = (config_for(ctx, f"demo-control-{i}") for i in (1, 2, 3))
    agent = config_for(ctx, "demo-workers-1")
    assert first["cluster-init"] is True and "server" not in first
    for joining in (second, third):
        assert joining["server"] == "https://10.0.0.1:6443" and "cluster-init" not in joining
    # One certificate serves every server: each names every control node's addresses, the LB and extras.
    sans = ["203.0.113.1", "10.0.0.1", "198.51.100.1", "203.0.113.2", "10.0.0.2", "198.51.100.2",
            "203.0.113.3", "10.0.0.3", "198.51.100.3", "api.example.com", "k8s.internal"]
    assert first["tls-san"] == second["tls-san"] == third["tls-san"] == sans
    assert agent["server"] == "https://10.0.0.1:6443"
    assert "tls-san" not in agent and "write-kubeconfig-mode" not in agent and "cluster-init" not in agent
    assert len({c["token"] for c in (first, second, third, agent)}) == 1
    assert agent["node-label"] == ["dcx.cluster=demo", "dcx.pool=workers", "dcx.provider=local"]


def test_mesh_on_uses_the_mesh_address_and_interface() -> None:
    ctx = make_ctx(make_spec(controls=1, workers=1, mesh="wireguard"))
    server, agent = config_for(ctx, "demo-control-1"), config_for(ctx, "demo-workers-1")
    assert server["node-ip"] == "100.96.0.1" and server["flannel-iface"] == "dcx0"
    assert agent["node-ip"] == "100.96.0.2" and agent["flannel-iface"] == "dcx0"
    assert agent["server"] == "https://100.96.0.1:6443"
    assert "100.96.0.1" in server["tls-san"]


def test_mesh_off_sets_no_flannel_interface() -> None:
    ctx = make_ctx(make_spec(controls=1, workers=1, mesh="none"))
    agent = config_for(ctx, "demo-workers-1")
    assert "flannel-iface" not in agent and agent["node-ip"] == "10.0.0.2"


def test_pool_taints_and_awkward_labels_survive_yaml() -> None:
    labels = {"team": "a b", "quote": "it's \"x\"", "cost": "$HOME", "hash": "#1: two"}
    ctx = make_ctx(make_spec(controls=1, workers=1, labels=labels, taints=["gpu=true:NoSchedule", "spot:NoExecute"]))
    agent = config_for(ctx, "demo-workers-1")
    assert agent["node-taint"] == ["gpu=true:NoSchedule", "spot:NoExecute"]
    for k, v in labels.items():
        assert f"{k}={v}" in agent["node-label"]


def test_render_refuses_a_node_that_both_starts_and_joins() -> None:
    with pytest.raises(ValueError):
        k3s.render_config(k3s.NodeConfig("c", "n", "server", "t" * 10, join_url="https://x:6443", cluster_init=True))
    with pytest.raises(ValueError):
        k3s.render_config(k3s.NodeConfig("c", "n", "agent", "t" * 10, cluster_init=True))


def test_config_is_written_0600_from_stdin(tmp_path: Path) -> None:
    target = tmp_path / "etc" / "config.yaml"
    command = k3s.write_config_command(str(target))
    subprocess.run(["sh", "-c", command], input="token: \"s3cret-token\"\n", text=True, check=True)
    assert target.read_text() == "token: \"s3cret-token\"\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert "s3cret" not in command


# --- commands per init system -------------------------------------------------------------------------


@pytest.mark.parametrize(("init", "role", "airgap", "expected"), [
    ("systemd", "server", False,
     "env INSTALL_K3S_EXEC=server INSTALL_K3S_FORCE_RESTART=true INSTALL_K3S_VERSION=v1.30.4+k3s1 "
     "sh /etc/dcx/k3s/install.sh"),
    ("openrc", "agent", False,
     "env INSTALL_K3S_EXEC=agent INSTALL_K3S_FORCE_RESTART=true INSTALL_K3S_VERSION=v1.30.4+k3s1 "
     "sh /etc/dcx/k3s/install.sh"),
    ("none", "server", False,
     "env INSTALL_K3S_EXEC=server INSTALL_K3S_SKIP_ENABLE=true INSTALL_K3S_SKIP_START=true "
     "INSTALL_K3S_VERSION=v1.30.4+k3s1 sh /etc/dcx/k3s/install.sh"),
    ("systemd", "agent", True,
     "env INSTALL_K3S_EXEC=agent INSTALL_K3S_FORCE_RESTART=true INSTALL_K3S_SKIP_DOWNLOAD=true "
     "sh /etc/dcx/k3s/install.sh"),
    ("none", "agent", True,
     "env INSTALL_K3S_EXEC=agent INSTALL_K3S_SKIP_DOWNLOAD=true INSTALL_K3S_SKIP_ENABLE=true "
     "INSTALL_K3S_SKIP_START=true sh /etc/dcx/k3s/install.sh"),
])
def test_install_command_and_environment(init: str, role: str, airgap: bool, expected: str) -> None:
    env = k3s.install_env(init, role, version="v1.30.4+k3s1", airgap=airgap)
    assert k3s.install_command(env) == expected
    assert not any(k in ("K3S_TOKEN", "K3S_URL") for k in env)


@pytest.mark.parametrize(("init", "role", "start", "restart"), [
    ("systemd", "server", "systemctl enable --now k3s", "systemctl restart k3s"),
    ("systemd", "agent", "systemctl enable --now k3s-agent", "systemctl restart k3s-agent"),
    ("openrc", "server", "rc-update add k3s default >/dev/null 2>&1; rc-service k3s start", "rc-service k3s restart"),
    ("openrc", "agent", "rc-update add k3s-agent default >/dev/null 2>&1; rc-service k3s-agent start",
     "rc-service k3s-agent restart"),
])
def test_service_commands_with_an_init_system(init: str, role: str, start: str, restart: str) -> None:
    assert k3s.start_command(init, role) == start
    assert k3s.restart_command(init, role) == restart


def test_without_an_init_system_k3s_runs_detached_with_a_pidfile() -> None:
    start = k3s.start_command("none", "agent")
    assert ("setsid /usr/local/bin/k3s agent >>/var/log/dcx-k3s.log 2>&1 </dev/null & echo $! > /run/dcx/k3s.pid"
            in start)
    assert start.index('if running "$(cat /run/dcx/k3s.pid 2>/dev/null)" k3s') < start.index("setsid")  # not twice
    restart = k3s.restart_command("none", "server")
    assert restart.index("kill \"$pid\"") < restart.index("setsid /usr/local/bin/k3s server")
    assert k3s.log_tail_command("none", "server").endswith("/var/log/dcx-k3s.log 2>/dev/null")
    assert k3s.log_tail_command("systemd", "agent").startswith("journalctl -u k3s-agent")
    assert k3s.log_tail_command("openrc", "server") == "tail -n 15 /var/log/k3s.log 2>/dev/null"


def test_every_generated_script_is_valid_sh() -> None:
    scripts = [k3s.reset_script(), k3s.fetch_script_command(), k3s.links_command(), k3s.write_config_command()]
    for init in ("systemd", "openrc", "none"):
        for role in ("server", "agent"):
            scripts += [k3s.state_script(init, role, "k3s-airgap-images-amd64.tar.zst"), k3s.start_command(init, role),
                        k3s.restart_command(init, role), k3s.log_tail_command(init, role)]
    for script in scripts:
        r = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
        assert r.returncode == 0, f"{script}\n{r.stderr}"


def test_state_script_runs_and_parses_on_a_host_without_k3s() -> None:
    out = subprocess.run(["sh", "-c", k3s.state_script("none", "server")], capture_output=True, text=True).stdout
    st = k3s.parse_state(out)
    assert st.binary_sha256 == "" and st.config_sha256 == "" and not st.running and not st.etcd_data


def test_parse_state() -> None:
    st = k3s.parse_state("binary_sha256=ab\nversion=k3s version v1.30.4+k3s1 (x)\ncluster_init=1\n"
                         'server_url="https://10.0.0.1:6443"\netcd_data=1\nrunning=1\nnoise\n')
    assert st.binary_sha256 == "ab" and st.cluster_init and st.etcd_data and st.running
    assert st.server_url == "https://10.0.0.1:6443"
    assert k3s.version_matches("v1.30.4+k3s1", st.version) and not k3s.version_matches("v1.29.0+k3s1", st.version)


NEW = k3s.K3sState()
RUNNING = k3s.K3sState(binary_sha256="b", config_sha256="c", server_installed=True, agent_installed=True,
                       running=True, has_kubectl=True, version="k3s version v1.30.4+k3s1 (x)")


@pytest.mark.parametrize(("st", "init", "kw", "expected"), [
    (NEW, "systemd", {}, ["write-config", "install"]),  # the install script starts the service
    (NEW, "openrc", {}, ["write-config", "install"]),
    (NEW, "none", {}, ["write-config", "link", "start"]),  # no systemctl: the script cannot run; dcx links
    (k3s.K3sState(has_systemctl=True), "none", {"script": False}, ["write-config", "link", "start"]),
    (NEW, "systemd", {"script": False}, ["write-config", "link", "start"]),  # refused when run: see below
    (k3s.K3sState(has_systemctl=True), "none", {}, ["write-config", "install", "start"]),
    (RUNNING, "systemd", {"config_sha256": "c"}, []),  # converged: nothing
    (RUNNING, "none", {"config_sha256": "c"}, []),
    (RUNNING, "systemd", {"config_sha256": "new"}, ["write-config", "restart"]),
    (RUNNING, "none", {"config_sha256": "new"}, ["write-config", "restart"]),
    (RUNNING, "openrc", {"config_sha256": "c", "binary_changed": True}, ["restart"]),
    (RUNNING, "systemd", {"config_sha256": "c", "version": "v1.31.0+k3s1"}, ["install"]),
    (k3s.K3sState(binary_sha256="b", config_sha256="c", server_installed=True), "systemd", {"config_sha256": "c"},
     ["start"]),
    (k3s.K3sState(binary_sha256="b", config_sha256="c", has_kubectl=True), "none", {"config_sha256": "c"}, ["start"]),
    (k3s.K3sState(binary_sha256="b", config_sha256="c"), "none", {"config_sha256": "c"}, ["link", "start"]),
])
def test_node_actions(st: k3s.K3sState, init: str, kw: dict[str, Any], expected: list[str]) -> None:
    kw = {"config_sha256": "want", **kw}
    assert k3s.node_actions(st, init=init, role="server", **kw) == expected


def test_an_existing_cluster_is_never_initialised_again() -> None:
    assert k3s.choose_topology([("a", False, False), ("b", False, False)]) == ("a", "a")
    assert k3s.choose_topology([("a", False, False), ("b", True, False), ("c", True, True)]) == (None, "c")
    assert k3s.choose_topology([("a", True, False)]) == (None, "a")


# --- whole runs over FakeRemote ------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["systemd", "openrc", "none"])
def test_a_run_keeps_the_token_off_command_lines_and_logs(tmp_path: Path, init: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dcx")
    log_file = tmp_path / "run.log"
    handler = start_run_log(log_file)
    remote = FakeRemote
    if init == "none":
        class NoInitRemote(FakeRemote):  # a namespace host: systemctl exists, systemd does not run
            def state_text(self) -> str:
                return super().state_text() + "has_systemctl=1\n"
        remote = NoInitRemote
    try:
        ctx = make_ctx(make_spec(controls=3, workers=2), init=init, cdir=ClusterDir(tmp_path, "demo"), remote=remote)
        run_phases(ctx, k3s.K3sEngine().phases(ctx))
    finally:
        stop_run_log(handler)
    token = token_of(ctx)
    sent = commands(ctx)
    assert all(token not in c for _, c, _ in sent)
    assert all(token not in s for _, c, s in sent if c != k3s.write_config_command())
    assert sum(1 for _, c, s in sent if token in s) == 5  # each node's config, on stdin, once
    assert all(token not in r.getMessage() for r in caplog.records)
    assert token not in log_file.read_text()
    assert CLIENT_KEY not in log_file.read_text() and all(CLIENT_KEY not in r.getMessage() for r in caplog.records)
    # the exact sequence on the first server and on an agent
    first = [c for h, c, _ in sent if h == "demo-control-1"]
    agent = [c for h, c, _ in sent if h == "demo-workers-1"]
    install = [c for c in first if c.startswith("env ")]
    assert install == [k3s.install_command(k3s.install_env(init, "server"))]
    assert k3s.fetch_script_command() in first  # online: get.k3s.io, fetched on the node
    assert first.index(k3s.write_config_command()) < first.index(install[0])
    if init == "none":
        assert k3s.start_command("none", "server") in first and k3s.start_command("none", "agent") in agent
    else:  # the install script starts the service
        assert not any("setsid" in c or "systemctl" in c or "rc-service" in c for c in first if c != k3s.READYZ
                       and not c.startswith("if [ -x"))
    # the kubeconfig landed in the cluster directory, private, renamed
    kc = tmp_path / "clusters" / "demo" / "secrets" / "kubeconfig"
    assert stat.S_IMODE(kc.stat().st_mode) == 0o600
    assert load_yaml(kc.read_text())["current-context"] == "dcx-demo"


def test_servers_join_one_at_a_time_after_the_first(tmp_path: Path) -> None:
    ctx = make_ctx(make_spec(controls=3, workers=1), cdir=ClusterDir(tmp_path, "demo"))
    order: list[str] = []
    for h in ctx.hosts:
        original = h.conn.answer  # type: ignore[attr-defined]

        def spy(command: str, stdin: str, name: str = h.name, original: Any = original) -> Result:
            if command.startswith("env "):
                order.append(name)
            return original(command, stdin)
        h.conn.answer = spy  # type: ignore[attr-defined]
    run_phases(ctx, k3s.K3sEngine().phases(ctx))
    assert order[:3] == ["demo-control-1", "demo-control-2", "demo-control-3"] and order[3] == "demo-workers-1"
    assert load_yaml(ctx.host("demo-control-1").conn.config)["cluster-init"] is True  # type: ignore[attr-defined]


def test_a_second_run_changes_nothing_and_keeps_the_token(tmp_path: Path) -> None:
    ctx = make_ctx(make_spec(controls=3, workers=2), cdir=ClusterDir(tmp_path, "demo"))
    run_phases(ctx, k3s.K3sEngine().phases(ctx))
    token = token_of(ctx)
    for h in ctx.hosts:
        h.conn.calls.clear()  # type: ignore[attr-defined]
        h.data.clear()
    ctx.shared.clear()
    run_phases(ctx, k3s.K3sEngine().phases(ctx))
    changing = [c for _, c, _ in commands(ctx) if c.startswith(("env ", "umask", "systemctl", "setsid"))]
    assert changing == []
    assert token_of(ctx) == token


def test_a_replaced_machine_has_its_old_registration_deleted_before_it_joins(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(k3s.VerifyK3s, "timeout", 3.0)
    ctx = make_ctx(make_spec(controls=3, workers=1), cdir=ClusterDir(tmp_path, "demo"))
    run_phases(ctx, k3s.K3sEngine().phases(ctx))
    # demo-workers-1 and demo-control-3 are new machines under the old names (nothing of k3s on them)
    for name in ("demo-workers-1", "demo-control-3"):
        remote = ctx.host(name).conn
        remote.config, remote.installed, remote.running, remote.etcd = "", False, False, False  # type: ignore[attr-defined]
        remote.files.clear()  # type: ignore[attr-defined]
    for h in ctx.hosts:
        h.conn.calls.clear()  # type: ignore[attr-defined]
        h.data.clear()
    ctx.shared.clear()
    ctx.host("demo-control-1").conn.cluster.stale = {"demo-workers-1", "demo-control-3"}  # type: ignore[attr-defined]
    run_phases(ctx, k3s.K3sEngine().phases(ctx))
    api = [c for c, _ in ctx.host("demo-control-1").conn.calls]  # type: ignore[attr-defined]
    for name in ("demo-control-3", "demo-workers-1"):
        assert f"/usr/local/bin/k3s kubectl delete node {name} --ignore-not-found" in api
        assert (f"/usr/local/bin/k3s kubectl -n kube-system delete secret {name}.node-password.k3s "
                "--ignore-not-found") in api
    # nodes that kept their k3s are left alone, and nothing is initialised again
    assert "/usr/local/bin/k3s kubectl delete node demo-control-2 --ignore-not-found" not in api
    assert "cluster-init" not in ctx.host("demo-control-3").conn.config  # type: ignore[attr-defined]


def test_a_lost_token_file_is_recovered_from_a_server(tmp_path: Path) -> None:
    ctx = make_ctx(make_spec(controls=1, workers=1), cdir=ClusterDir(tmp_path, "demo"))
    run_phases(ctx, k3s.K3sEngine().phases(ctx))
    token = token_of(ctx)
    (tmp_path / "clusters" / "demo" / "secrets" / "k3s-token").unlink()
    for h in ctx.hosts:
        h.data.clear()

    class Recover(FakeRemote):
        pass

    server = ctx.host("demo-control-1").conn
    original = server.answer  # type: ignore[attr-defined]

    def answer(command: str, stdin: str) -> Result:
        if command.startswith("sed -n 's/^token:"):
            line = [x for x in server.config.splitlines() if x.startswith("token: ")][0]  # type: ignore[attr-defined]
            return Result(0, line[len("token: "):] + "\n", "")
        return original(command, stdin)
    server.answer = answer  # type: ignore[attr-defined]
    run_phases(ctx, k3s.K3sEngine().phases(ctx))
    assert token_of(ctx) == token
    assert (tmp_path / "clusters" / "demo" / "secrets" / "k3s-token").read_text().strip() == token


def test_a_failing_command_does_not_leak_the_token(tmp_path: Path) -> None:
    ctx = make_ctx(make_spec(controls=1, workers=1), cdir=ClusterDir(tmp_path, "demo"))
    ctx.host("demo-workers-1").conn.fail_on = "INSTALL_K3S_EXEC=agent"  # type: ignore[attr-defined]
    with pytest.raises(PhaseFailed) as info:
        run_phases(ctx, k3s.K3sEngine().phases(ctx))
    token = token_of(ctx)
    assert "boom" in info.value.message and token not in info.value.message
    assert 'token: "***"' in info.value.message
    assert redact(f"x {token} y") == "x *** y"


# --- air gap ---------------------------------------------------------------------------------------


def airgap_dir(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "k3s").write_bytes(b"\x7fELF pretend k3s binary")
    (tmp_path / "install.sh").write_text("#!/bin/sh\necho install\n")
    (tmp_path / "k3s-airgap-images-amd64.tar.zst").write_bytes(b"images")
    return {"binary": "k3s", "installScript": "install.sh", "images": "k3s-airgap-images-amd64.tar.zst",
            "binarySha256": hashlib.sha256(b"\x7fELF pretend k3s binary").hexdigest(),
            "imagesSha256": hashlib.sha256(b"images").hexdigest()}


def test_airgap_uploads_the_given_files_and_installs_without_download(tmp_path: Path) -> None:
    spec = make_spec(controls=1, workers=1, engine={"airgap": airgap_dir(tmp_path)},
                     file=str(tmp_path / "cluster.yaml"))
    ctx = make_ctx(spec, cdir=ClusterDir(tmp_path / "home", "demo"))
    run_phases(ctx, k3s.K3sEngine().phases(ctx))
    for h in ctx.hosts:
        remote = h.conn
        uploads = {dest: (mode, data) for dest, mode, data in remote.uploads}  # type: ignore[attr-defined]
        assert uploads == {
            "/usr/local/bin/k3s": (0o755, b"\x7fELF pretend k3s binary"),
            "/etc/dcx/k3s/install.sh": (0o755, b"#!/bin/sh\necho install\n"),
            "/var/lib/rancher/k3s/agent/images/k3s-airgap-images-amd64.tar.zst": (0o644, b"images"),
        }
        sent = [c for c, _ in remote.calls]  # type: ignore[attr-defined]
        assert k3s.fetch_script_command() not in sent
        role = k3s.k3s_role(h.node.role)
        assert k3s.install_command(k3s.install_env("systemd", role, airgap=True)) in sent
    # a re-run uploads nothing
    for h in ctx.hosts:
        h.conn.uploads.clear()  # type: ignore[attr-defined]
        h.data.clear()
    run_phases(ctx, k3s.K3sEngine().phases(ctx))
    assert all(not h.conn.uploads for h in ctx.hosts)  # type: ignore[attr-defined]


def test_airgap_checks_the_digest_the_user_gives(tmp_path: Path) -> None:
    airgap = airgap_dir(tmp_path)
    airgap["binarySha256"] = "0" * 64
    spec = make_spec(engine={"airgap": airgap}, file=str(tmp_path / "cluster.yaml"))
    with pytest.raises(SpecError, match=r"spec.engine.airgap.binary: .*k3s has SHA-256 [0-9a-f]{64}, the spec says 0+"):
        k3s.airgap_files(spec)
    airgap["binarySha256"] = ""
    airgap["images"] = "missing.tar"
    spec = make_spec(engine={"airgap": airgap}, file=str(tmp_path / "cluster.yaml"))
    with pytest.raises(SpecError, match=r"spec.engine.airgap.images: .*missing.tar does not exist"):
        k3s.airgap_files(spec)


def test_airgap_without_an_install_script(tmp_path: Path) -> None:
    """No init system and no script: dcx links the tools itself and starts k3s detached; with systemd the
    script is required (it writes the service) and the error says so."""
    airgap = airgap_dir(tmp_path)
    del airgap["installScript"]
    spec = make_spec(controls=1, workers=0, engine={"airgap": airgap}, file=str(tmp_path / "cluster.yaml"))
    ctx = make_ctx(spec, init="none", cdir=ClusterDir(tmp_path / "home", "demo"))
    run_phases(ctx, k3s.K3sEngine().phases(ctx))
    sent = [c for c, _ in ctx.hosts[0].conn.calls]  # type: ignore[attr-defined]
    assert k3s.links_command() in sent and k3s.start_command("none", "server") in sent
    assert not any(c.startswith("env ") for c in sent)
    ctx = make_ctx(spec, init="systemd", cdir=ClusterDir(tmp_path / "home2", "demo"))
    with pytest.raises(PhaseFailed, match="runs systemd: k3s's install script must write its service") as info:
        run_phases(ctx, k3s.K3sEngine().phases(ctx))
    assert "engine.airgap.installScript" in (info.value.hint or "")


def test_airgap_spec_fields() -> None:
    spec = make_spec(engine={"airgap": {"binary": "k3s", "binarySha256": "A" * 64, "installScript": "i.sh"}})
    assert spec.spec.engine.airgap.binarySha256 == "a" * 64
    with pytest.raises(Exception, match="SHA-256"):
        make_spec(engine={"airgap": {"binary": "k3s", "binarySha256": "xyz"}})


def test_a_bad_taint_is_a_located_spec_error() -> None:
    spec = make_spec(taints=["gpu=true:Sometimes"])
    with pytest.raises(SpecError, match=r"spec.pools.1.taints.0: 'gpu=true:Sometimes' is not a taint"):
        k3s.validate_taints(spec)


# --- labels, taints, health --------------------------------------------------------------------------


def test_label_and_taint_commands_quote_values_and_converge() -> None:
    labels = {"team": "a b", "quote": "it's \"x\"", "cost": "$HOME; rm -rf /", "dcx.pool": "workers"}
    node = {"metadata": {"name": "n1", "labels": {"dcx.pool": "workers", "old": "1"},
                         "annotations": {k3s.MANAGED_LABELS: json.dumps(["dcx.pool", "old"]),
                                         k3s.MANAGED_TAINTS: json.dumps(["gone:NoSchedule"])}},
            "spec": {"taints": [{"key": "gone", "effect": "NoSchedule"},
                                {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"}]}}
    out = k3s.label_commands(node, labels, ["gpu=true:NoSchedule"])
    argv = [shlex.split(c) for c in out]
    assert argv[0] == ["/usr/local/bin/k3s", "kubectl", "label", "node", "n1", "--overwrite", "team=a b",
                       "quote=it's \"x\"", "cost=$HOME; rm -rf /", "old-"]
    assert argv[1] == ["/usr/local/bin/k3s", "kubectl", "taint", "node", "n1", "gpu=true:NoSchedule", "--overwrite"]
    assert argv[2] == ["/usr/local/bin/k3s", "kubectl", "taint", "node", "n1", "gone:NoSchedule-"]
    assert argv[3][:6] == ["/usr/local/bin/k3s", "kubectl", "annotate", "node", "n1", "--overwrite"]
    # converged: nothing to do (k3s's own taint is left alone)
    done = {"metadata": {"name": "n1", "labels": dict(labels),
                         "annotations": {k3s.MANAGED_LABELS: json.dumps(sorted(labels)),
                                         k3s.MANAGED_TAINTS: json.dumps(["gpu=true:NoSchedule"])}},
            "spec": {"taints": [{"key": "gpu", "value": "true", "effect": "NoSchedule"},
                                {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"}]}}
    assert k3s.label_commands(done, labels, ["gpu=true:NoSchedule"]) == []


def test_health_reports_each_node_with_its_reason() -> None:
    doc = {"items": [
        {"metadata": {"name": "a", "labels": {"node-role.kubernetes.io/control-plane": "true",
                                              "node-role.kubernetes.io/etcd": "true"}},
         "status": {"conditions": [{"type": "Ready", "status": "True"}],
                    "nodeInfo": {"kubeletVersion": "v1.30.4+k3s1"},
                    "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}},
        {"metadata": {"name": "b", "labels": {}}, "spec": {"unschedulable": True},
         "status": {"conditions": [
             {"type": "Ready", "status": "False", "reason": "KubeletNotReady",
              "message": "container runtime network not ready: cni plugin not initialized"},
             {"type": "DiskPressure", "status": "True", "message": "disk almost full"}]}},
    ]}
    health = k3s.nodes_health(doc, ["a", "b", "c"])
    assert health["a"].ready and health["a"].role == "control" and health["a"].state == "Ready"
    assert health["a"].extra["version"] == "v1.30.4+k3s1" and health["a"].extra["etcd"] is True
    assert not health["b"].ready and health["b"].role == "worker" and health["b"].state == "NotReady,SchedulingDisabled"
    assert health["b"].detail == ("KubeletNotReady: container runtime network not ready: cni plugin not initialized; "
                                  "DiskPressure: disk almost full")
    assert not health["c"].ready and health["c"].state == "absent"


K = k3s.BIN + " kubectl "


def removal_commands(node: str, server: bool) -> list[str]:
    """What the API server is sent to take one node out, in order (the contract)."""
    return ([K + f"cordon {node}",
             K + f"drain {node} --ignore-daemonsets --delete-emptydir-data --force --timeout=120s"]
            + ([K + f"annotate node {node} etcd.k3s.cattle.io/remove=true --overwrite",
                K + f"get node {node} -o json"] if server else [])
            + [K + f"delete node {node} --ignore-not-found", K + f"delete node {node} --ignore-not-found"])


@pytest.mark.parametrize(("controls", "workers", "leaving", "expected"), [
    # an agent: cordon, drain, delete; no etcd change
    (3, 2, ["demo-workers-2"], removal_commands("demo-workers-2", server=False)),
    # a server: its etcd member goes (k3s's member controller) after its pods, before the node is deleted
    (3, 1, ["demo-control-3"], removal_commands("demo-control-3", server=True)),
    # a worker and a server: workers first, then the control plane shrinks
    (5, 1, ["demo-control-5", "demo-workers-1"],
     removal_commands("demo-workers-1", server=False) + removal_commands("demo-control-5", server=True)),
])
def test_removal_commands_per_case(tmp_path: Path, controls: int, workers: int, leaving: list[str],
                                   expected: list[str]) -> None:
    ctx = make_ctx(make_spec(controls=controls, workers=workers), cdir=ClusterDir(tmp_path, "demo"))
    run_phases(ctx, k3s.K3sEngine().phases(ctx))
    api = ctx.host("demo-control-1").conn
    hosts = [ctx.host(n) for n in leaving]
    for h in hosts:
        original = h.conn.answer  # type: ignore[attr-defined]
        h.conn.answer = (lambda o: lambda c, s: Result(0, "", "") if c == k3s.reset_script()  # type: ignore[attr-defined]
                         else o(c, s))(original)
    api.calls.clear()  # type: ignore[attr-defined]
    k3s.K3sEngine().remove_nodes(ctx, hosts)
    sent = [c for c, _ in api.calls if c not in (k3s.READYZ, k3s.NODES_JSON)]  # type: ignore[attr-defined]
    assert sent == expected
    for h in hosts:  # the machine itself loses k3s after its node is deleted
        assert [c for c, _ in h.conn.calls][-1] == k3s.reset_script()  # type: ignore[attr-defined]
    assert k3s.etcd_members(json.loads(ctx.host("demo-control-1").conn.cluster.nodes_json())) == {  # type: ignore[attr-defined]
        f"demo-control-{i}" for i in range(1, controls + 1)} - set(leaving)


@pytest.mark.parametrize(("controls", "leaving", "message"), [
    (3, ["demo-control-2", "demo-control-3"], "removing 2 of 3 etcd members leaves 1, quorum needs 2"),
    (5, ["demo-control-3", "demo-control-4", "demo-control-5"],
     "removing 3 of 5 etcd members leaves 2, quorum needs 3"),
    (1, ["demo-control-1"], "cannot remove every control node"),
])
def test_a_removal_that_loses_quorum_is_refused_before_any_change(tmp_path: Path, controls: int, leaving: list[str],
                                                                  message: str) -> None:
    ctx = make_ctx(make_spec(controls=controls, workers=1), cdir=ClusterDir(tmp_path, "demo"))
    run_phases(ctx, k3s.K3sEngine().phases(ctx))
    for h in ctx.hosts:
        h.conn.calls.clear()  # type: ignore[attr-defined]
    with pytest.raises(OperationFailed, match=message):
        k3s.K3sEngine().remove_nodes(ctx, [ctx.host(n) for n in leaving])
    sent = [c for h in ctx.hosts for c, _ in h.conn.calls]  # type: ignore[attr-defined]
    assert not [c for c in sent if c not in (k3s.READYZ, k3s.NODES_JSON)]  # nothing was changed


# --- kubeconfig ---------------------------------------------------------------------------------------

OTHER = """apiVersion: v1
kind: Config
# the user's own comment
clusters:
- name: prod
  cluster: {server: "https://prod.example.com:6443"}
- name: dev
  cluster: {server: "https://dev.example.com:6443"}
users:
- name: prod
  user: {token: prod-token-123456}
- name: dev
  user: {token: dev-token-123456}
contexts:
- name: prod
  context: {cluster: prod, user: prod}
- name: dev
  context: {cluster: dev, user: dev, namespace: web}
current-context: prod
"""


def test_kubeconfig_rename_and_merge_keeps_other_contexts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubernetes import config as kconfig

    path = tmp_path / "kube" / "config"
    path.parent.mkdir()
    path.write_text(OTHER)
    monkeypatch.setenv("KUBECONFIG", f"{path}{os.pathsep}{tmp_path / 'second'}")
    assert kubeconfig.user_kubeconfig_path() == path
    new = kubeconfig.rename(sample_k3s_yaml(), "dcx-demo", kubeconfig.server_url("203.0.113.1"))
    assert redact(CLIENT_KEY) == "***"  # registered with the redactor when read
    kubeconfig.merge_into_file(path, new)
    contexts, active = kconfig.list_kube_config_contexts(config_file=str(path))
    assert sorted(c["name"] for c in contexts) == ["dcx-demo", "dev", "prod"]
    assert active["name"] == "prod"  # the user's current context stays
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    backup = kubeconfig.backup_path(path)
    assert backup.read_text() == OTHER and stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert "# the user's own comment" in path.read_text()
    client = kconfig.new_client_from_config(config_file=str(path), context="dcx-demo")
    assert client.configuration.host == "https://203.0.113.1:6443"
    # merging again replaces, never duplicates
    kubeconfig.merge_into_file(path, kubeconfig.rename(sample_k3s_yaml(), "dcx-demo",
                                                       kubeconfig.server_url("203.0.113.9")))
    data = load_yaml(path.read_text())
    assert [c["name"] for c in data["clusters"]].count("dcx-demo") == 1
    assert [c for c in data["clusters"] if c["name"] == "dcx-demo"][0]["cluster"]["server"] == "https://203.0.113.9:6443"
    # destroy takes it out again, leaving the rest
    assert kubeconfig.remove_from_file(path, "dcx-demo") is True
    contexts, active = kconfig.list_kube_config_contexts(config_file=str(path))
    assert sorted(c["name"] for c in contexts) == ["dev", "prod"] and active["name"] == "prod"
    assert kubeconfig.remove_from_file(path, "dcx-demo") is False


def test_kubeconfig_into_an_empty_home_becomes_current(tmp_path: Path) -> None:
    path = tmp_path / ".kube" / "config"
    kubeconfig.merge_into_file(path, kubeconfig.rename(sample_k3s_yaml(), "dcx-demo", "https://[fd00::1]:6443"))
    data = load_yaml(path.read_text())
    assert data["current-context"] == "dcx-demo" and data["contexts"][0]["context"]["user"] == "dcx-demo"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and not kubeconfig.backup_path(path).exists()


@pytest.mark.parametrize(("address", "url"), [
    ("10.0.0.1", "https://10.0.0.1:6443"), ("lb.example.com:443", "https://lb.example.com:443"),
    ("fd00::1", "https://[fd00::1]:6443"), ("[fd00::1]:7443", "https://[fd00::1]:7443"),
    ("https://api.example.com", "https://api.example.com"),
])
def test_server_url(address: str, url: str) -> None:
    assert kubeconfig.server_url(address) == url


def test_cli_prints_the_kubeconfig(tmp_path: Path) -> None:
    from dcx.state import ClusterState, StateStore, atomic_write

    store = StateStore(tmp_path)
    cdir = store.cluster("demo")
    cdir.save(ClusterState(name="demo", id="abcd", engine="k3s"))
    env = {**os.environ, "DCX_HOME": str(tmp_path)}
    import sys

    r = subprocess.run([sys.executable, "-m", "dcx", "cluster", "kubeconfig", "demo"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 1 and "has no kubeconfig" in r.stderr
    text = kubeconfig.dumps(kubeconfig.rename(sample_k3s_yaml(), "dcx-demo", "https://10.0.0.1:6443"))
    atomic_write(cdir.secret_file("kubeconfig"), text, 0o600)
    r = subprocess.run([sys.executable, "-m", "dcx", "cluster", "kubeconfig", "demo"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0 and r.stdout == text
    r = subprocess.run([sys.executable, "-m", "dcx", "cluster", "kubeconfig", "demo", "-o", "json"],
                       capture_output=True, text=True, env=env)
    doc = json.loads(r.stdout)
    assert doc["context"] == "dcx-demo" and doc["kubeconfig"] == text
