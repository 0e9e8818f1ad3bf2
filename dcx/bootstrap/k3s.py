"""k3s engine: the first control node starts the embedded etcd (`cluster-init`), the other control
nodes join it one at a time, agents join in parallel; labels and taints are converged through the
Kubernetes API, every node must be Ready, and the kubeconfig is fetched for the operator.

Install is k3s's own install script (https://get.k3s.io) with its INSTALL_K3S_* variables: online it
downloads k3s itself; air-gapped (`engine.airgap`) dcx uploads the binary, the images tarball and the
install script it was given (after checking their SHA-256) and runs the script with
INSTALL_K3S_SKIP_DOWNLOAD=true. Where no init system runs (containers, namespace hosts) the script
only installs (INSTALL_K3S_SKIP_ENABLE/SKIP_START) and dcx starts `k3s server|agent` detached, with a
pidfile.

Configuration goes in /etc/rancher/k3s/config.yaml (mode 0600), composed here and sent on stdin: the
cluster token is never on a command line, in a log line or in output. dcx makes the token
(secrets.token_hex), keeps it 0600 in the cluster directory and registers it with the redactor.

Every remote command is produced by a pure function of facts and settings (tests check them per init
system without SSH); the phases only decide which to run and run them.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcx.bootstrap.engines import ClusterEngine, EngineBackup, NodeHealth, engine_address
from dcx.bootstrap.mesh import IFACE as MESH_IFACE
from dcx.bootstrap.mesh import private_address
from dcx.bootstrap.phases import Host, Phase, RunContext, run_phases
from dcx.bootstrap.runtime import PROXY_ENV_SOURCE, RUNNING_FUNCTION
from dcx.errors import OperationFailed
from dcx.log import log, register_secret
from dcx.shell import cmd, q
from dcx.templates import render

API_PORT = 6443
BIN_DIR = "/usr/local/bin"
BIN = f"{BIN_DIR}/k3s"
KILLALL = f"{BIN_DIR}/k3s-killall.sh"
CONFIG_DIR = "/etc/rancher/k3s"
CONFIG = f"{CONFIG_DIR}/config.yaml"
REMOTE_KUBECONFIG = f"{CONFIG_DIR}/k3s.yaml"
IMAGES_DIR = "/var/lib/rancher/k3s/agent/images"
ETCD_DIR = "/var/lib/rancher/k3s/server/db/etcd"
DCX_DIR = "/etc/dcx/k3s"
INSTALL_SCRIPT = f"{DCX_DIR}/install.sh"
INSTALL_URL = "https://get.k3s.io"
PIDFILE = "/run/dcx/k3s.pid"
LOG = "/var/log/dcx-k3s.log"
TOKEN_SECRET = "k3s-token"
KUBECONFIG_SECRET = "kubeconfig"
MANAGED_LABELS = "dcx.io/managed-labels"  # annotation: the label keys dcx set, so removed ones can go
MANAGED_TAINTS = "dcx.io/managed-taints"
TAINT_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?)(=([^:]*))?"
                      r":(NoSchedule|PreferNoSchedule|NoExecute)$")


def k3s_role(node_role: str) -> str:
    return "server" if node_role == "control" else "agent"


def service_name(role: str) -> str:
    """The service the install script makes: `k3s` for servers, `k3s-agent` for agents."""
    return "k3s" if role == "server" else "k3s-agent"


def uninstall_script(role: str) -> str:
    return f"{BIN_DIR}/{service_name(role)}-uninstall.sh"


# --- config.yaml --------------------------------------------------------------------------------


def yaml_scalar(value: object) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML): spaces, quotes, `$`, `#` and `:` survive."""
    return json.dumps(str(value))


def yaml_list(values: list[str]) -> str:
    """A YAML flow sequence of quoted strings."""
    return json.dumps([str(v) for v in values])


@dataclass
class NodeConfig:
    """What one node's /etc/rancher/k3s/config.yaml says."""

    cluster: str
    node_name: str
    role: str  # server | agent
    token: str = field(repr=False)
    join_url: str = ""  # https://SERVER:6443; empty on the node that starts the cluster
    cluster_init: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[str] = field(default_factory=list)
    node_ip: str = ""
    external_ip: str = ""
    flannel_iface: str = ""
    tls_san: list[str] = field(default_factory=list)


def render_config(c: NodeConfig) -> str:
    if c.cluster_init == bool(c.join_url):
        raise ValueError("a node either starts the cluster (cluster-init) or joins it (server URL)")
    if c.cluster_init and c.role != "server":
        raise ValueError("only a server can start the cluster")
    join = "cluster-init: true" if c.cluster_init else f"server: {yaml_scalar(c.join_url)}"
    addresses = "\n".join(f"{key}: {yaml_scalar(value)}" for key, value in (
        ("node-ip", c.node_ip), ("node-external-ip", c.external_ip), ("flannel-iface", c.flannel_iface)) if value)
    server_options = ""
    if c.role == "server":
        server_options = f"tls-san: {yaml_list(c.tls_san)}\nwrite-kubeconfig-mode: \"0600\""
    return render("k3s-config.yaml", cluster=c.cluster, role=c.role, node_name=yaml_scalar(c.node_name),
                  token=yaml_scalar(c.token), join=join,
                  node_labels=yaml_list([f"{k}={v}" for k, v in c.labels.items()]),
                  node_taints=yaml_list(c.taints), addresses=addresses, server_options=server_options)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def desired_labels(ctx: RunContext, host: Host) -> dict[str, str]:
    labels = {"dcx.cluster": ctx.cluster_name, "dcx.pool": host.node.pool, "dcx.provider": host.node.provider}
    labels.update(host.node.labels)
    return labels


def desired_taints(ctx: RunContext, host: Host) -> list[str]:
    try:
        return list(ctx.spec.pool(host.node.pool).taints)
    except KeyError:  # a node of a pool the spec no longer has (it is leaving)
        return []


def parse_taint(text: str) -> tuple[str, str, str]:
    """`key=value:Effect` or `key:Effect` -> (key, value, effect)."""
    m = TAINT_RE.match(text)
    if not m:
        raise ValueError(text)
    return m.group(1), m.group(4) or "", m.group(5)


def validate_taints(spec: Any) -> None:
    for i, pool in enumerate(spec.spec.pools):
        for j, taint in enumerate(pool.taints):
            if not TAINT_RE.match(taint):
                raise spec.error(("spec", "pools", i, "taints", j), f"'{taint}' is not a taint",
                                 hint="write KEY=VALUE:EFFECT or KEY:EFFECT, EFFECT one of NoSchedule, "
                                      "PreferNoSchedule, NoExecute")


def host_part(address: str) -> str:
    """`name:port` -> `name` (and `[v6]:port` -> `v6`)."""
    if address.startswith("https://"):
        address = address[len("https://"):].split("/", 1)[0]
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    if address.count(":") == 1:
        return address.split(":", 1)[0]
    return address


def tls_sans(ctx: RunContext) -> list[str]:
    """Every address a client may use for the API: each control node's SSH, private, public and mesh
    address, the load balancer and the spec's own extra names. One certificate serves all servers."""
    engine = ctx.spec.spec.engine
    out: list[str] = []
    for h in ctx.control_hosts:
        out += [h.node.ssh_address, h.node.private_address, h.node.public_address, h.data.get("mesh_address", ""),
                private_address(h)]
    if engine.loadBalancer:
        out.append(host_part(engine.loadBalancer))
    out += engine.tlsSAN
    return list(dict.fromkeys(a for a in out if a))


def node_addresses(host: Host) -> tuple[str, str, str]:
    """(node-ip, node-external-ip, flannel-iface): the mesh address and interface where the mesh is up,
    else the private address; the public address as external when it differs."""
    mesh = host.data.get("mesh_address", "")
    node_ip = mesh or private_address(host)
    external = host.node.public_address if host.node.public_address and host.node.public_address != node_ip else ""
    return node_ip, external, MESH_IFACE if mesh else ""


def server_url(address: str) -> str:
    return f"https://[{address}]:{API_PORT}" if ":" in address else f"https://{address}:{API_PORT}"


# --- what is on a host ------------------------------------------------------------------------------


@dataclass
class K3sState:
    binary_sha256: str = ""
    version: str = ""  # first line of `k3s --version`
    config_sha256: str = ""
    cluster_init: bool = False  # the current config starts the cluster
    server_url: str = ""  # the current config's `server:`
    etcd_data: bool = False  # this server is (or was) an etcd member
    server_installed: bool = False  # the install script ran for a server (k3s-uninstall.sh exists)
    agent_installed: bool = False
    has_systemctl: bool = False  # the install script needs systemctl or openrc-run to run at all
    has_openrc: bool = False
    has_kubectl: bool = False  # /usr/local/bin/kubectl (the install script's link, or dcx's)
    running: bool = False
    images_sha256: str = ""
    script_sha256: str = ""


def running_check(init: str, role: str) -> str:
    svc = service_name(role)
    if init == "systemd":
        return f"systemctl is-active --quiet {svc}"
    if init == "openrc":
        return f"rc-service {svc} status >/dev/null 2>&1"
    return f"[ -f {PIDFILE} ] && kill -0 \"$(cat {PIDFILE})\" 2>/dev/null"


def state_script(init: str, role: str, images_name: str = "") -> str:
    """Prints key=value lines for parse_state. Reads no secret (the config only through its hash)."""
    lines = [
        f"if [ -x {BIN} ]; then echo \"binary_sha256=$(sha256sum {BIN} | cut -d' ' -f1)\"; "
        f"echo \"version=$({BIN} --version 2>/dev/null | head -n1)\"; fi",
        f"[ -f {CONFIG} ] && echo \"config_sha256=$(sha256sum {CONFIG} | cut -d' ' -f1)\"",
        f"grep -q '^cluster-init: true' {CONFIG} 2>/dev/null && echo cluster_init=1",
        f"echo \"server_url=$(sed -n 's/^server: *//p' {CONFIG} 2>/dev/null)\"",
        f"[ -d {ETCD_DIR} ] && echo etcd_data=1",
        f"[ -x {uninstall_script('server')} ] && echo server_installed=1",
        f"[ -x {uninstall_script('agent')} ] && echo agent_installed=1",
        "command -v systemctl >/dev/null 2>&1 && echo has_systemctl=1",
        "[ -x /sbin/openrc-run ] && echo has_openrc=1",
        f"[ -e {BIN_DIR}/kubectl ] && echo has_kubectl=1",
        f"{running_check(init, role)} && echo running=1",
        f"[ -f {INSTALL_SCRIPT} ] && echo \"script_sha256=$(sha256sum {INSTALL_SCRIPT} | cut -d' ' -f1)\"",
    ]
    if images_name:
        image = q(f"{IMAGES_DIR}/{images_name}")
        lines.append(f"[ -f {image} ] && echo \"images_sha256=$(sha256sum {image} | cut -d' ' -f1)\"")
    lines.append("true")
    return "\n".join(lines)


def parse_state(text: str) -> K3sState:
    st = K3sState()
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in K3sState.__dataclass_fields__:
            continue
        if isinstance(getattr(st, key), bool):
            setattr(st, key, value == "1")
        else:
            setattr(st, key, value)
    if st.server_url.startswith('"'):
        try:
            st.server_url = json.loads(st.server_url)
        except ValueError:
            pass
    return st


def script_usable(init: str, st: K3sState) -> bool:
    """k3s's install script refuses to run without systemctl or openrc-run (even when told not to start)."""
    return init in ("systemd", "openrc") or st.has_systemctl or st.has_openrc


def version_matches(want: str, have: str) -> bool:
    return not want or want in have.split()


def node_actions(st: K3sState, *, init: str, role: str, config_sha256: str, version: str = "",
                 binary_changed: bool = False, script: bool = True) -> list[str]:
    """What to do on one node, in order: write-config, install (or link), start or restart.

    With systemd or openrc the install script enables and (re)starts the service itself; where no init
    system runs it only installs, and dcx starts or restarts the detached process. Where the script
    cannot run (`script` False: an air-gap without one; or no systemctl/openrc-run) dcx only links
    kubectl, crictl and ctr to the binary it uploaded."""
    actions: list[str] = []
    config_changed = st.config_sha256 != config_sha256
    if config_changed:
        actions.append("write-config")
    usable = script and script_usable(init, st)
    installed = st.server_installed if role == "server" else st.agent_installed
    need_install = (not st.binary_sha256 or not version_matches(version, st.version)
                    or (not installed if usable else not st.has_kubectl))
    if need_install:
        actions.append("install" if usable else "link")
        if usable and init in ("systemd", "openrc"):
            return actions
    if not st.running:
        actions.append("start")
    elif config_changed or binary_changed or need_install:
        actions.append("restart")
    return actions


# --- commands -----------------------------------------------------------------------------------


def write_config_command(path: str = CONFIG) -> str:
    """The config arrives on stdin (it holds the token) and is written 0600 before it is moved in place."""
    new = q(f"{path}.dcx-new")
    return (f"umask 077; mkdir -p {q(str(Path(path).parent))} && cat > {new} && chmod 600 {new} "
            f"&& mv {new} {q(path)}")


def fetch_script_command(url: str = INSTALL_URL) -> str:
    """Online: k3s's install script, fetched on the node (curl, else wget)."""
    new = f"{INSTALL_SCRIPT}.new"
    return (f"mkdir -p {DCX_DIR} && {{ curl -sfL {q(url)} -o {new} || wget -qO {new} {q(url)}; }} "
            f"&& chmod 755 {new} && mv {new} {INSTALL_SCRIPT}")


def install_env(init: str, role: str, *, version: str = "", airgap: bool = False) -> dict[str, str]:
    """The install script's INSTALL_K3S_* variables. No K3S_TOKEN or K3S_URL: those are in config.yaml,
    so they reach neither a command line nor the service's environment file."""
    env = {"INSTALL_K3S_EXEC": role}
    if airgap:
        env["INSTALL_K3S_SKIP_DOWNLOAD"] = "true"
    elif version:
        env["INSTALL_K3S_VERSION"] = version
    if init in ("systemd", "openrc"):
        # The script skips the (re)start when its files did not change; dcx runs it when the config did.
        env["INSTALL_K3S_FORCE_RESTART"] = "true"
    else:
        env["INSTALL_K3S_SKIP_ENABLE"] = "true"
        env["INSTALL_K3S_SKIP_START"] = "true"
    return env


def install_command(env: dict[str, str]) -> str:
    return cmd("env", *(f"{k}={v}" for k, v in sorted(env.items())), "sh", INSTALL_SCRIPT)


def links_command() -> str:
    """Where the install script cannot run (no systemctl, no openrc): the links it would have made."""
    return (f"for c in kubectl crictl ctr; do [ -e {BIN_DIR}/$c ] || ln -s k3s {BIN_DIR}/$c; done")


def detached_start_command(role: str) -> str:
    """No init system: `k3s server|agent` in its own session, pidfile and log, unless it runs already.
    It reads /etc/rancher/k3s/config.yaml itself. The modprobes are the service unit's ExecStartPre."""
    return (f"mkdir -p /run/dcx; modprobe br_netfilter 2>/dev/null; modprobe overlay 2>/dev/null; "
            f"{RUNNING_FUNCTION}; if running \"$(cat {PIDFILE} 2>/dev/null)\" k3s; then :; else "
            f"{PROXY_ENV_SOURCE}; setsid {BIN} {role} >>{LOG} 2>&1 </dev/null & echo $! > {PIDFILE}; fi")


def detached_stop_command() -> str:
    """Stop the detached k3s (TERM, up to 30 s, then KILL). Its containers keep running, as with the services."""
    return (f"if [ -f {PIDFILE} ]; then pid=$(cat {PIDFILE}); kill \"$pid\" 2>/dev/null; i=0; "
            f"while kill -0 \"$pid\" 2>/dev/null && [ $i -lt 30 ]; do sleep 1; i=$((i+1)); done; "
            f"kill -9 \"$pid\" 2>/dev/null; rm -f {PIDFILE}; fi; true")


def start_command(init: str, role: str) -> str:
    svc = service_name(role)
    if init == "systemd":
        return f"systemctl enable --now {svc}"
    if init == "openrc":
        return f"rc-update add {svc} default >/dev/null 2>&1; rc-service {svc} start"
    return detached_start_command(role)


def stop_command(init: str, role: str) -> str:
    svc = service_name(role)
    if init == "systemd":
        return f"systemctl stop {svc}"
    if init == "openrc":
        return f"rc-service {svc} stop"
    return detached_stop_command()


def restart_command(init: str, role: str) -> str:
    svc = service_name(role)
    if init == "systemd":
        return f"systemctl restart {svc}"
    if init == "openrc":
        return f"rc-service {svc} restart"
    return detached_stop_command() + "; " + detached_start_command(role)


def log_tail_command(init: str, role: str, lines: int = 15) -> str:
    svc = service_name(role)
    if init == "systemd":
        return f"journalctl -u {svc} -n {lines} --no-pager 2>/dev/null"
    if init == "openrc":
        return f"tail -n {lines} /var/log/{svc}.log 2>/dev/null"
    return f"tail -n {lines} {LOG} 2>/dev/null"


def kubectl(*args: str) -> str:
    """kubectl through k3s on a server (it reads the admin kubeconfig k3s wrote, as root)."""
    return cmd(BIN, "kubectl", *args)


READYZ = kubectl("get", "--raw=/readyz")
NODES_JSON = kubectl("get", "nodes", "-o", "json")


ETCD_REMOVE = "etcd.k3s.cattle.io/remove"  # k3s member controller: remove this node's etcd member
ETCD_REMOVED = "etcd.k3s.cattle.io/removed-node-name"  # ... and it has been removed


def drain_command(node: str, timeout: float) -> str:
    """Evict the node's pods (DaemonSets stay; emptyDir data goes with its pods; pods no controller
    would recreate are deleted), bounded by kubectl's own timeout."""
    return kubectl("drain", node, "--ignore-daemonsets", "--delete-emptydir-data", "--force",
                   f"--timeout={timeout:.0f}s")


def etcd_members(doc: dict[str, Any]) -> set[str]:
    """Nodes whose etcd member is in the cluster: k3s labels its etcd servers, and marks a removed one."""
    out = set()
    for item in doc.get("items") or []:
        meta = item.get("metadata", {})
        if (meta.get("labels") or {}).get("node-role.kubernetes.io/etcd") == "true" \
                and not (meta.get("annotations") or {}).get(ETCD_REMOVED):
            out.add(meta.get("name", ""))
    return out


def annotation(api: Host, node: str, key: str) -> str:
    out = api.run(kubectl("get", "node", node, "-o", "json"), timeout=60, check=True, what=f"reading node {node}")
    try:
        return str((json.loads(out.stdout or "{}").get("metadata", {}).get("annotations") or {}).get(key, ""))
    except ValueError:
        raise OperationFailed(f"kubectl get node {node} printed no JSON") from None


def label_commands(node: dict[str, Any], labels: dict[str, str], taints: list[str]) -> list[str]:
    """kubectl commands that bring one node's labels and taints to what the spec says (node-label and
    node-taint in config.yaml apply only when a node registers). Labels and taints dcx set earlier and
    the spec no longer has are removed; others (k3s's own, the user's) are left alone."""
    meta = node.get("metadata", {})
    name = meta.get("name", "")
    have_labels = meta.get("labels") or {}
    notes = meta.get("annotations") or {}
    try:
        managed_labels = set(json.loads(notes.get(MANAGED_LABELS, "[]")))
        managed_taints = set(json.loads(notes.get(MANAGED_TAINTS, "[]")))
    except ValueError:
        managed_labels, managed_taints = set(), set()
    out: list[str] = []
    changes = [f"{k}={v}" for k, v in labels.items() if have_labels.get(k) != v]
    changes += [f"{k}-" for k in sorted(managed_labels - set(labels)) if k in have_labels]
    if changes:
        out.append(kubectl("label", "node", name, "--overwrite", *changes))
    have_taints = {(t.get("key", ""), t.get("value", "") or "", t.get("effect", ""))
                   for t in (node.get("spec", {}).get("taints") or [])}
    want = {parse_taint(t) for t in taints}
    for t in taints:
        if parse_taint(t) not in have_taints:
            out.append(kubectl("taint", "node", name, t, "--overwrite"))
    for t in sorted(managed_taints - set(taints)):
        try:
            key, value, effect = parse_taint(t)
        except ValueError:
            continue
        if (key, value, effect) in have_taints and (key, value, effect) not in want:
            out.append(kubectl("taint", "node", name, f"{key}:{effect}-"))
    new_notes = {MANAGED_LABELS: json.dumps(sorted(labels)), MANAGED_TAINTS: json.dumps(sorted(taints))}
    if any(notes.get(k) != v for k, v in new_notes.items()):
        out.append(kubectl("annotate", "node", name, "--overwrite", *(f"{k}={v}" for k, v in new_notes.items())))
    return out


def reset_script() -> str:
    """Take k3s off a machine that stays, leaving nothing behind: the detached process, k3s's killall and
    uninstall scripts where they exist, then whatever they would have removed (for hosts where the
    script never ran), then dcx's own files. Needs no facts (reset runs without gathering them).

    Without an init system the host may share its process table with others (containers, namespace
    hosts): k3s-killall.sh kills every containerd shim it sees, so there only this host's k3s processes
    (those in its network namespace) and their children are killed, and killall is stubbed out before
    the uninstall scripts call it."""
    data = "/var/lib/rancher/k3s/data"
    return "\n".join([
        detached_stop_command(),
        "if [ -d /run/systemd/system ] || [ -e /run/openrc/softlevel ]; then",
        f"  [ -x {KILLALL} ] && {KILLALL} >/dev/null 2>&1",
        "else",
        "  me=$(readlink /proc/self/ns/net); pids=''",
        "  for p in /proc/[0-9]*; do",
        f"    case \"$(readlink $p/exe 2>/dev/null)\" in {data}/*|{BIN})",
        "      [ \"$(readlink $p/ns/net 2>/dev/null)\" = \"$me\" ] && pids=\"$pids ${p#/proc/}\";; esac",
        "  done",
        "  tree() { for t in \"$@\"; do echo \"$t\"; "
        "tree $(ps -e -o ppid= -o pid= | awk -v p=\"$t\" '$1 == p {print $2}'); done; }",
        "  [ -n \"$pids\" ] && kill -9 $(tree $pids) 2>/dev/null",
        f"  [ -x {KILLALL} ] && printf '#!/bin/sh\\n' > {KILLALL}",
        "fi",
        f"for s in {uninstall_script('server')} {uninstall_script('agent')}; do",
        "  [ -x \"$s\" ] && \"$s\" >/dev/null 2>&1",
        "done",
        "awk '$2 ~ \"^(/run/k3s|/var/lib/kubelet|/run/netns/cni-)\" {print $2}' /proc/self/mounts | sort -r | "
        "while read -r m; do umount -f \"$m\" 2>/dev/null; done",
        "for l in cni0 flannel.1 flannel-v6.1 kube-ipvs0 flannel-wg; do ip link delete \"$l\" 2>/dev/null; done",
        "for x in iptables ip6tables; do command -v $x-save >/dev/null 2>&1 && "
        "$x-save | grep -v KUBE- | grep -v CNI- | grep -iv flannel | $x-restore; done",
        "rm -rf /etc/rancher/k3s /etc/rancher/node /var/lib/rancher/k3s /var/lib/kubelet /run/k3s /run/flannel "
        "/var/lib/cni",
        f"for c in kubectl crictl ctr; do [ \"$(readlink {BIN_DIR}/$c)\" = k3s ] && rm -f {BIN_DIR}/$c; done",
        f"rm -f {BIN} {KILLALL} {uninstall_script('server')} {uninstall_script('agent')} {PIDFILE} {LOG}",
        f"rm -rf {DCX_DIR}",
        "rmdir /etc/rancher /var/lib/rancher 2>/dev/null",
        "true",
    ])


# --- node health ------------------------------------------------------------------------------------

BAD_WHEN_TRUE = ("MemoryPressure", "DiskPressure", "PIDPressure", "NetworkUnavailable")


def node_health(item: dict[str, Any]) -> NodeHealth:
    meta, status = item.get("metadata", {}), item.get("status", {})
    labels = meta.get("labels") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready_cond = conditions.get("Ready", {})
    ready = ready_cond.get("status") == "True"
    problems = []
    if not ready:
        reason = ready_cond.get("reason") or "no Ready condition yet"
        message = ready_cond.get("message", "")
        problems.append(f"{reason}: {message}" if message else reason)
    problems += [f"{t}: {conditions[t].get('message') or conditions[t].get('reason', '')}".rstrip(": ")
                 for t in BAD_WHEN_TRUE if conditions.get(t, {}).get("status") == "True"]
    state = "Ready" if ready else "NotReady"
    if item.get("spec", {}).get("unschedulable"):
        state += ",SchedulingDisabled"
    control = (labels.get("node-role.kubernetes.io/control-plane") == "true"
               or "node-role.kubernetes.io/master" in labels)
    addresses = {a.get("type"): a.get("address") for a in status.get("addresses") or []}
    return NodeHealth(meta.get("name", ""), ready, role="control" if control else "worker", state=state,
                      detail="; ".join(problems),
                      extra={"version": status.get("nodeInfo", {}).get("kubeletVersion", ""),
                             "internal_ip": addresses.get("InternalIP", ""), "leader": False,
                             "etcd": labels.get("node-role.kubernetes.io/etcd") == "true"})


def nodes_health(doc: dict[str, Any], names: list[str]) -> dict[str, NodeHealth]:
    by_name = {i.get("metadata", {}).get("name"): i for i in doc.get("items") or []}
    out = {}
    for name in names:
        item = by_name.get(name)
        out[name] = (node_health(item) if item is not None else
                     NodeHealth(name, False, state="absent", detail="not registered with the cluster"))
    return out


# --- air-gap files ----------------------------------------------------------------------------------


@dataclass
class LocalFile:
    path: Path
    sha256: str
    remote: str
    mode: int


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def airgap_files(spec: Any) -> list[LocalFile]:
    """binary, install script and images (those given): present, and matching the SHA-256 the spec gives."""
    airgap = spec.spec.engine.airgap
    base = spec.base_dir
    where = ("spec", "engine", "airgap")
    out = []
    for name, value, want, remote, mode in (
            ("binary", airgap.binary, airgap.binarySha256, BIN, 0o755),
            ("installScript", airgap.installScript, "", INSTALL_SCRIPT, 0o755),
            ("images", airgap.images, airgap.imagesSha256, f"{IMAGES_DIR}/{Path(airgap.images).name}", 0o644)):
        if not value:
            continue
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise spec.error(where + (name,), f"{path} does not exist or is not a file")
        digest = file_sha256(path)
        if want and digest != want:
            raise spec.error(where + (name,), f"{path} has SHA-256 {digest}, the spec says {want}",
                             hint="download the file again, or correct the digest in the spec")
        out.append(LocalFile(path, digest, remote, mode))
    return out


# --- the run ------------------------------------------------------------------------------------------


class K3sRun:
    """What the k3s phases share during one run. The token lives here, never in ctx.shared."""

    def __init__(self, ctx: RunContext) -> None:
        engine = ctx.spec.spec.engine
        self.version = engine.version
        self.airgap = airgap_files(ctx.spec) if engine.airgap else []
        self.images_name = Path(engine.airgap.images).name if engine.airgap and engine.airgap.images else ""
        # Online the script comes from get.k3s.io; air-gapped only when the spec gives it.
        self.has_script = not engine.airgap or bool(engine.airgap.installScript)
        self._token: str | None = None
        self._topology: tuple[str | None, str] | None = None

    # token --------------------------------------------------------------------------------------

    def token(self, ctx: RunContext) -> str:
        if self._token is None:
            self._token = load_or_make_token(ctx)
        return self._token

    # topology -----------------------------------------------------------------------------------

    def topology(self, ctx: RunContext) -> tuple[str | None, str]:
        """(the node that starts the cluster, or None when it exists; the node others join)."""
        if self._topology is None:
            self._topology = choose_topology(
                [(h.name, state(h).etcd_data, state(h).running) for h in ctx.control_hosts])
        return self._topology

    def config(self, ctx: RunContext, host: Host) -> NodeConfig:
        init, target = self.topology(ctx)
        st = state(host)
        role = k3s_role(host.node.role)
        cluster_init, join_url = False, server_url(engine_address(ctx, ctx.host(target)))
        if host.name == init:
            cluster_init, join_url = True, ""
        elif role == "server" and st.etcd_data and (st.cluster_init or st.server_url):
            # An etcd member keeps its config: the keys only matter when joining, and a change would restart it.
            cluster_init, join_url = st.cluster_init, "" if st.cluster_init else st.server_url
        elif role == "agent" and st.server_url in {server_url(engine_address(ctx, h)) for h in ctx.control_hosts}:
            join_url = st.server_url  # still a server of the cluster: no restart for a new join target
        node_ip, external_ip, iface = node_addresses(host)
        return NodeConfig(cluster=ctx.cluster_name, node_name=host.name, role=role, token=self.token(ctx),
                          join_url=join_url, cluster_init=cluster_init, labels=desired_labels(ctx, host),
                          taints=desired_taints(ctx, host), node_ip=node_ip, external_ip=external_ip,
                          flannel_iface=iface, tls_san=tls_sans(ctx) if role == "server" else [])

    def actions(self, ctx: RunContext, host: Host) -> list[str]:
        text = render_config(self.config(ctx, host))
        return node_actions(state(host), init=host.facts.init, role=k3s_role(host.node.role),
                            config_sha256=sha256_text(text), version="" if self.airgap else self.version,
                            binary_changed=bool(host.data.get("k3s_binary_changed")), script=self.has_script)


def choose_topology(controls: list[tuple[str, bool, bool]]) -> tuple[str | None, str]:
    """controls: (name, has etcd data, running) in spec order. A cluster that exists (some control node
    has etcd data) is never initialised again: new servers join a member, preferably a running one."""
    if not controls:
        raise OperationFailed("a k3s cluster needs at least one control node")
    members = [c for c in controls if c[1]]
    if not members:
        return controls[0][0], controls[0][0]
    running = [c for c in members if c[2]]
    return None, (running or members)[0][0]


def state(host: Host) -> K3sState:
    return host.data.get("k3s") or K3sState()


def load_or_make_token(ctx: RunContext) -> str:
    """The cluster token: kept 0600 in the cluster directory; recovered from a server's config when the
    directory lost it (so a re-run never gives a live cluster a new token); else made now."""
    from dcx.state import atomic_write

    path = ctx.secrets_dir.secret_file(TOKEN_SECRET) if ctx.secrets_dir is not None else None
    token = path.read_text().strip() if path is not None and path.exists() else ""
    if not token:
        token = recover_token(ctx) or secrets.token_hex(32)
        if path is not None:
            atomic_write(path, token + "\n", 0o600)
    register_secret(token)
    return token


def recover_token(ctx: RunContext) -> str:
    for h in ctx.control_hosts:
        if not state(h).config_sha256:
            continue
        out = h.run(f"sed -n 's/^token: *//p' {CONFIG}", timeout=30).stdout.strip()
        if out:
            try:
                token = json.loads(out) if out.startswith('"') else out
            except ValueError:
                continue
            register_secret(token)
            log.info("k3s token recovered from %s's config", h.name)
            return token
    return ""


def wait_until(host: Host, check: str, timeout: float, init: str, role: str, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if host.run(check, timeout=30).ok:
            return
        if time.monotonic() > deadline:
            tail = host.run(log_tail_command(init, role), timeout=30).stdout.strip()
            raise OperationFailed(f"{what} within {timeout:.0f}s" + (f"; last log lines:\n{tail}" if tail else ""))
        time.sleep(2.0)


# --- phases --------------------------------------------------------------------------------------------


class GatherK3sState(Phase):
    title = "Read k3s state"
    read_only = True

    def __init__(self, run: K3sRun) -> None:
        self.k3s = run

    def run(self, ctx: RunContext, host: Host) -> None:
        script = state_script(host.facts.init, k3s_role(host.node.role), self.k3s.images_name)
        host.data["k3s"] = parse_state(host.run(script, timeout=60, check=True, what="reading k3s state").stdout)


class UploadAirgap(Phase):
    title = "Upload k3s (air-gapped)"
    pipelined = True  # after its own state is read

    def __init__(self, run: K3sRun) -> None:
        self.k3s = run

    def _stale(self, host: Host) -> list[LocalFile]:
        st = state(host)
        have = {BIN: st.binary_sha256, INSTALL_SCRIPT: st.script_sha256}
        return [f for f in self.k3s.airgap if have.get(f.remote, st.images_sha256) != f.sha256]

    def needs_run(self, ctx: RunContext, host: Host) -> bool:
        return bool(self._stale(host))

    def run(self, ctx: RunContext, host: Host) -> None:
        stale = self._stale(host)
        host.run(cmd("mkdir", "-p", BIN_DIR, DCX_DIR, IMAGES_DIR), timeout=60, check=True, what="mkdir")
        for f in stale:
            log.info("%s: uploading %s to %s", host.name, f.path, f.remote)
            host.conn.upload(f.path.read_bytes(), f.remote, f.mode)
            got = host.run(f"sha256sum {q(f.remote)} | cut -d' ' -f1", timeout=120, check=True,
                           what="checking the upload").stdout.strip()
            if got != f.sha256:
                raise OperationFailed(f"{f.remote} arrived with SHA-256 {got}, expected {f.sha256}")
            if f.remote == BIN:
                host.data["k3s_binary_changed"] = True
        st = state(host)
        for f in stale:
            if f.remote == BIN:
                st.binary_sha256 = f.sha256
            elif f.remote == INSTALL_SCRIPT:
                st.script_sha256 = f.sha256
            else:
                st.images_sha256 = f.sha256


class _K3sNodes(Phase):
    """Write the config, install, start or restart: only what the node's state calls for."""

    def __init__(self, run: K3sRun) -> None:
        self.k3s = run

    def needs_run(self, ctx: RunContext, host: Host) -> bool:
        return bool(self.k3s.actions(ctx, host))

    @staticmethod
    def _proxied(host: Host, command: str) -> str:
        if not host.data.get("proxy"):
            return command
        from dcx.bootstrap.proxy import with_env

        return with_env(command)

    def run(self, ctx: RunContext, host: Host) -> None:
        init, role = host.facts.init, k3s_role(host.node.role)
        config = self.k3s.config(ctx, host)
        text = render_config(config)
        for action in self.k3s.actions(ctx, host):
            if action == "write-config":
                host.run(write_config_command(), stdin=text, timeout=60, check=True, what=f"writing {CONFIG}")
            elif action == "install":
                if not self.k3s.airgap:
                    host.run(self._proxied(host, fetch_script_command()), timeout=300, check=True,
                             what=f"downloading k3s's install script ({INSTALL_URL})")
                env = install_env(init, role, version=self.k3s.version, airgap=bool(self.k3s.airgap))
                # With a proxy, the script downloads through it and writes it into the service's env file.
                host.run(self._proxied(host, install_command(env)), timeout=900, check=True,
                         what="k3s's install script")
            elif action == "link":
                if init in ("systemd", "openrc"):
                    raise OperationFailed(
                        f"{host.name} runs {init}: k3s's install script must write its service",
                        hint=f"set engine.airgap.installScript to k3s's install script (saved from {INSTALL_URL})")
                if not state(host).binary_sha256 and not self.k3s.airgap:
                    raise OperationFailed(
                        f"k3s's install script needs systemctl or openrc-run, and {host.name} has neither",
                        hint="give the k3s binary with engine.airgap: dcx then installs and starts it itself")
                host.run(links_command(), timeout=60, check=True, what="linking kubectl, crictl, ctr")
            elif action == "start":
                host.run(start_command(init, role), timeout=300, check=True, what=f"starting {service_name(role)}")
            elif action == "restart":
                host.run(restart_command(init, role), timeout=300, check=True,
                         what=f"restarting {service_name(role)}")
        if role == "server":
            wait_until(host, READYZ, 300, init, role, f"the k3s API on {host.name} did not become ready")
            ctx.shared.setdefault("k3s_api", host.name)
        else:
            wait_until(host, running_check(init, role), 60, init, role,
                       f"k3s-agent on {host.name} did not keep running")
        st = state(host)
        st.config_sha256, st.running = sha256_text(text), True
        st.cluster_init, st.server_url = config.cluster_init, config.join_url


class InitK3s(_K3sNodes):
    title = "Start k3s on the first control node (embedded etcd)"
    serial = True

    def hosts(self, ctx: RunContext) -> list[Host]:
        init, _ = self.k3s.topology(ctx)
        return [ctx.host(init)] if init else []


class _Join(_K3sNodes):
    def prepare(self, ctx: RunContext) -> None:
        forget_replaced(ctx, [h for h in self.hosts(ctx) if not state(h).config_sha256])


def forget_replaced(ctx: RunContext, fresh: list[Host]) -> None:
    """A machine dcx replaced comes back under the same node name: the cluster still has the old one's
    node (and, for a server, its etcd member) and node password, and would reject the new machine. For
    hosts without any k3s config, those are deleted first (k3s removes the member and the password
    with the node)."""
    if not fresh:
        return
    api = api_host(ctx)
    registered = {i.get("metadata", {}).get("name") for i in get_nodes(api).get("items") or []}
    for h in fresh:
        if h.name in registered:
            log.info("%s is registered but its machine is new: deleting the old registration", h.name)
            api.run(kubectl("delete", "node", h.name, "--ignore-not-found"), timeout=180, check=True,
                    what=f"deleting the old node {h.name}")
            api.run(kubectl("-n", "kube-system", "delete", "secret", f"{h.name}.node-password.k3s",
                            "--ignore-not-found"), timeout=60)


class JoinK3sServers(_Join):
    title = "Join control nodes"
    serial = True  # etcd membership changes one member at a time

    def hosts(self, ctx: RunContext) -> list[Host]:
        init, _ = self.k3s.topology(ctx)
        return [h for h in ctx.control_hosts if h.name != init]


class JoinK3sAgents(_Join):
    title = "Join workers"

    def hosts(self, ctx: RunContext) -> list[Host]:
        return ctx.worker_hosts


def api_host(ctx: RunContext, exclude: list[Host] | None = None) -> Host:
    """A control node whose API answers (the one found earlier this run, when there is one)."""
    exclude = exclude or []
    name = ctx.shared.get("k3s_api")
    if name and all(h.name != name for h in exclude):
        return ctx.host(name)
    errors = []
    for h in ctx.control_hosts:
        if h in exclude:
            continue
        try:
            if h.run(READYZ, timeout=30).ok:
                ctx.shared["k3s_api"] = h.name
                return h
            errors.append(f"{h.name}: API not ready")
        except Exception as exc:  # noqa: BLE001 - try the next control node
            errors.append(f"{h.name}: {getattr(exc, 'message', exc)}")
    raise OperationFailed("no k3s server answers" + (": " + "; ".join(errors) if errors else ""))


def get_nodes(api: Host) -> dict[str, Any]:
    out = api.run(NODES_JSON, timeout=60, check=True, what="kubectl get nodes").stdout
    try:
        return json.loads(out or "{}")
    except ValueError:
        raise OperationFailed(f"kubectl get nodes on {api.name} printed no JSON") from None


class LabelK3sNodes(Phase):
    title = "Apply node labels and taints"

    def hosts(self, ctx: RunContext) -> list[Host]:
        return [api_host(ctx)]

    def run(self, ctx: RunContext, host: Host) -> None:
        by_name = {i.get("metadata", {}).get("name"): i for i in get_nodes(host).get("items") or []}
        for h in ctx.hosts:
            node = by_name.get(h.name)
            if node is None:
                continue  # not registered yet: node-label/node-taint in its config apply when it does
            for command in label_commands(node, desired_labels(ctx, h), desired_taints(ctx, h)):
                host.run(command, timeout=60, check=True, what=f"labelling {h.name}")


class VerifyK3s(Phase):
    title = "Verify every node is Ready"
    read_only = True
    timeout = 300.0

    def hosts(self, ctx: RunContext) -> list[Host]:
        return [api_host(ctx)]

    def run(self, ctx: RunContext, host: Host) -> None:
        deadline = time.monotonic() + self.timeout
        names = [h.name for h in ctx.hosts]
        while True:
            health = nodes_health(get_nodes(host), names)
            not_ready = [h for h in health.values() if not h.ready]
            if not not_ready:
                return
            if time.monotonic() > deadline:
                raise OperationFailed(f"not Ready after {self.timeout:.0f}s: " + ", ".join(
                    f"{h.name} ({h.state}{': ' + h.detail if h.detail else ''})" for h in not_ready))
            time.sleep(2.0)


class FetchKubeconfig(Phase):
    """k3s.yaml from a server, renamed to dcx-NAME and pointed at an address this machine reaches,
    kept 0600 in the cluster directory (access merges it into the user's kubeconfig)."""

    title = "Fetch the kubeconfig"
    read_only = True

    def hosts(self, ctx: RunContext) -> list[Host]:
        return [api_host(ctx)] if ctx.secrets_dir is not None else []

    def run(self, ctx: RunContext, host: Host) -> None:
        from dcx.access import context_name
        from dcx.bootstrap import kubeconfig
        from dcx.state import atomic_write

        text = host.run(cmd("cat", REMOTE_KUBECONFIG), timeout=60, check=True, what=f"reading {REMOTE_KUBECONFIG}"
                        ).stdout
        data = kubeconfig.rename(text, context_name(ctx.cluster_name), api_server_url(ctx, host))
        atomic_write(ctx.secrets_dir.secret_file(KUBECONFIG_SECRET), kubeconfig.dumps(data), 0o600)


def api_server_url(ctx: RunContext, api: Host) -> str:
    """What the operator's kubectl talks to: the load balancer when the spec names one, else the
    server's SSH address (the address this machine reaches it on)."""
    from dcx.bootstrap.kubeconfig import server_url as url

    lb = ctx.spec.spec.engine.loadBalancer
    return url(lb, API_PORT) if lb else url(api.node.ssh_address or api.node.public_address, API_PORT)


class ResetK3s(Phase):
    title = "Remove k3s"

    def needs_run(self, ctx: RunContext, host: Host) -> bool:
        probe = (f"[ -e {BIN} ] || [ -e {CONFIG_DIR} ] || [ -e /var/lib/rancher/k3s ] || [ -e {PIDFILE} ] "
                 f"|| [ -e {DCX_DIR} ]")
        return host.run(probe, timeout=30).ok

    def run(self, ctx: RunContext, host: Host) -> None:
        host.run(reset_script(), timeout=600, check=True, what="removing k3s")


class K3sEngine(ClusterEngine):
    type = "k3s"
    uses_docker = False  # k3s runs its own containerd

    def phases(self, ctx: RunContext) -> list[Phase]:
        validate_taints(ctx.spec)
        if len(ctx.control_hosts) % 2 == 0:
            ctx.reporter.note(f"warning: {len(ctx.control_hosts)} control nodes: etcd needs an odd number to "
                              "tolerate failures (3 tolerate 1, 5 tolerate 2)")
        run = K3sRun(ctx)  # checks the air-gap files before anything changes on a host
        phases: list[Phase] = [GatherK3sState(run)]
        if run.airgap:
            phases.append(UploadAirgap(run))
        restore: list[Phase] = []
        prune: list[Phase] = []
        if self.restore is not None:  # `create --restore`: the backup's token, then its snapshot on the first server
            use_backup_token(ctx, run, self.restore)
            restore, prune = [RestoreK3s(run, self.restore)], [PruneOldK3sNodes()]
        return phases + [InitK3s(run), *restore, JoinK3sServers(run), JoinK3sAgents(run), LabelK3sNodes(), *prune,
                         VerifyK3s(), FetchKubeconfig()]

    def backup(self, ctx: RunContext) -> EngineBackup:
        return backup_k3s(ctx, api_host(ctx))

    def health(self, ctx: RunContext, api: Host | None = None) -> dict[str, NodeHealth]:
        api = api or api_host(ctx)
        return nodes_health(get_nodes(api), [h.name for h in ctx.hosts])

    control_noun = "etcd members"

    def control_host(self, ctx: RunContext, exclude: list[Host]) -> Host:
        if not [h for h in ctx.control_hosts if h not in exclude]:
            raise OperationFailed("cannot remove every control node of a running cluster")
        return api_host(ctx, exclude=exclude)

    def control_members(self, ctx: RunContext, api: Host) -> set[str]:
        return etcd_members(get_nodes(api))

    def drain(self, ctx: RunContext, api: Host, host: Host) -> None:
        log.info("draining %s", host.name)
        api.run(kubectl("cordon", host.name), timeout=60)
        drain = api.run(drain_command(host.name, self.drain_timeout), timeout=self.drain_timeout + 60)
        if not drain.ok:
            ctx.reporter.note(f"warning: {host.name} did not drain within {self.drain_timeout:.0f}s "
                              f"({drain.tail(3)}); removing it anyway")

    def demote(self, ctx: RunContext, api: Host, host: Host) -> None:
        # k3s's etcd member controller removes the member of a node annotated etcd.k3s.cattle.io/remove=true
        # and then records etcd.k3s.cattle.io/removed-node-name on it (k3s pkg/etcd/member_controller.go).
        log.info("removing %s's etcd member", host.name)
        api.run(kubectl("annotate", "node", host.name, f"{ETCD_REMOVE}=true", "--overwrite"), timeout=60, check=True,
                what=f"asking k3s to remove {host.name}'s etcd member")
        deadline = time.monotonic() + 120
        while not annotation(api, host.name, ETCD_REMOVED):
            if time.monotonic() > deadline:
                raise OperationFailed(f"k3s did not remove {host.name}'s etcd member within 120s",
                                      hint="see `kubectl get node -o yaml` and the k3s log on the servers; re-run")
            time.sleep(2.0)

    def remove(self, ctx: RunContext, api: Host, host: Host) -> None:
        api.run(kubectl("delete", "node", host.name, "--ignore-not-found"), timeout=180, check=True,
                what=f"deleting node {host.name}")
        try:
            host.run(reset_script(), timeout=600, check=True, what="removing k3s")
        except Exception as exc:  # noqa: BLE001 - the machine may be gone already
            log.info("%s: k3s removal failed (%s)", host.name, getattr(exc, "message", exc))
        # It may have registered again between the delete and the uninstall.
        api.run(kubectl("delete", "node", host.name, "--ignore-not-found"), timeout=180)

    def reset_phases(self, ctx: RunContext, purge: bool) -> list[Phase]:
        return [ResetK3s()]


# --- backup and restore (docs.k3s.io/cli/etcd-snapshot) -----------------------------------------------

SNAPSHOT_MEMBER = "etcd-snapshot"
BACKUP_DIR = "/var/lib/rancher/k3s/server/db/dcx-backup"  # a directory of its own: the one file in it is ours
RESTORE_DIR = "/var/lib/rancher/k3s/server/db/dcx-restore"
RESTORED_MARKER = f"{DCX_DIR}/restored"  # the first server was reset from the snapshot (a re-run skips it)


def snapshot_save_command(name: str, directory: str = BACKUP_DIR) -> str:
    """An on-demand snapshot; k3s names the file NAME-NODE-TIMESTAMP in the directory."""
    return cmd(BIN, "etcd-snapshot", "save", "--name", name, "--etcd-snapshot-dir", directory)


def cluster_reset_command(path: str) -> str:
    """Reset the embedded etcd to one member restored from the snapshot; k3s exits when done and is then
    started normally (it reads the token and everything else from config.yaml)."""
    return cmd(BIN, "server", "--cluster-reset", f"--cluster-reset-restore-path={path}")


def backup_k3s(ctx: RunContext, api: Host) -> EngineBackup:
    """An etcd snapshot taken on a server (etcd stays up), copied back, and the cluster token: k3s restores a
    snapshot only with the token of the cluster that took it."""
    name = f"dcx-{ctx.cluster_name}"
    api.run(f"rm -rf {q(BACKUP_DIR)}", timeout=60, check=True, what="clearing the snapshot directory")
    api.run(snapshot_save_command(name), timeout=600, check=True, what="k3s etcd-snapshot save")
    files = api.run(f"ls -1 {q(BACKUP_DIR)}", timeout=60, check=True, what="listing the snapshot").stdout.split()
    if len(files) != 1:
        raise OperationFailed(f"k3s etcd-snapshot save left {len(files)} files in {BACKUP_DIR} on {api.name}")
    try:
        data = api.conn.download(f"{BACKUP_DIR}/{files[0]}")
    finally:
        api.run(f"rm -rf {q(BACKUP_DIR)}", timeout=60)
    token = load_or_make_token(ctx)
    return EngineBackup({SNAPSHOT_MEMBER: data}, source=api.name, secrets={TOKEN_SECRET: token})


def use_backup_token(ctx: RunContext, run: K3sRun, backup: EngineBackup) -> None:
    """The restored cluster keeps the old token (its bootstrap data is encrypted with it): it is written to
    the cluster directory (0600) before any node gets its config."""
    from dcx.state import atomic_write

    token = backup.secrets.get(TOKEN_SECRET, "")
    if not token:
        raise OperationFailed("the backup holds no k3s token: it cannot be restored")
    register_secret(token)
    if ctx.secrets_dir is not None:
        atomic_write(ctx.secrets_dir.secret_file(TOKEN_SECRET), token + "\n", 0o600)
    run._token = token


class RestoreK3s(Phase):
    """The first server is reset from the snapshot (docs.k3s.io/cli/etcd-snapshot, "Restoring a Cluster from
    a Snapshot"): k3s stopped, `k3s server --cluster-reset --cluster-reset-restore-path=FILE`, then started
    normally; the other servers join it as usual (they are new machines with no db directory)."""

    title = "Restore etcd from the backup on the first control node"
    serial = True

    def __init__(self, run: K3sRun, backup: EngineBackup) -> None:
        self.k3s, self.backup = run, backup

    def hosts(self, ctx: RunContext) -> list[Host]:
        _, target = self.k3s.topology(ctx)  # the first server, or (a resumed run) the one the others join
        return [ctx.host(target)]

    def needs_run(self, ctx: RunContext, host: Host) -> bool:
        return not host.run(f"test -f {RESTORED_MARKER}", timeout=30).ok

    def run(self, ctx: RunContext, host: Host) -> None:
        init = host.facts.init
        path = f"{RESTORE_DIR}/{SNAPSHOT_MEMBER}"
        host.run(f"mkdir -p -m 700 {q(RESTORE_DIR)}", timeout=60, check=True, what=f"making {RESTORE_DIR}")
        host.conn.upload(self.backup.files[SNAPSHOT_MEMBER], path, mode=0o600)
        host.run(stop_command(init, "server"), timeout=120, check=True, what="stopping k3s")
        host.run(cluster_reset_command(path), timeout=900, check=True, what="k3s server --cluster-reset")
        host.run(f"mkdir -p {q(DCX_DIR)} && touch {RESTORED_MARKER} && rm -rf {q(RESTORE_DIR)}", timeout=60,
                 check=True, what="recording the restore")
        host.run(start_command(init, "server"), timeout=300, check=True, what="starting k3s")
        wait_until(host, READYZ, 300, init, "server", f"the k3s API on {host.name} did not become ready")
        # The snapshot holds the old machine's node password for this name (k3s keeps it as the secret
        # NODE.node-password.k3s in kube-system): this machine's differs, so the old one goes.
        host.run(kubectl("-n", "kube-system", "delete", "secret", f"{host.name}.node-password.k3s",
                         "--ignore-not-found"), timeout=60, check=True, what="forgetting the old node password")


class PruneOldK3sNodes(Phase):
    """After a restore, the old cluster's machines are still nodes of the snapshot: every node that is not one
    of this cluster's is deleted."""

    title = "Remove the old cluster's nodes"

    def hosts(self, ctx: RunContext) -> list[Host]:
        return [api_host(ctx)]

    def run(self, ctx: RunContext, host: Host) -> None:
        ours = {h.name for h in ctx.hosts}
        old = sorted(n for n in (i.get("metadata", {}).get("name") for i in get_nodes(host).get("items") or [])
                     if n and n not in ours)
        for name in old:
            host.run(kubectl("delete", "node", name, "--ignore-not-found"), timeout=180, check=True,
                     what=f"deleting node {name}")
        if old:
            ctx.reporter.note(f"removed {len(old)} node(s) of the old cluster: {', '.join(old)}")


def run_k3s(ctx: RunContext) -> None:
    run_phases(ctx, K3sEngine().phases(ctx))
