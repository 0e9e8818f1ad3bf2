"""Fleet operations end to end: `dcx node run` (selection, exit codes, JSON, --fold, timeouts, sudo
with and without a password, a jump host) and `dcx cluster diagnose` (archive contents, every kind of
secret planted on a node and locally and absent from the archive, the summary of what is wrong)."""

from __future__ import annotations

import json
import re
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcx import netns
from dcx.netns import LoginUser
from tests.testbed.lab import Lab
from tests.testbed.local import Dcx, cluster_yaml, registry_entries, skip_without_namespace_nodes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

NAME = "e2e-fleet"
CONTROL, WORKER = f"{NAME}-control-1", f"{NAME}-workers-1"
# One of each kind of secret diagnose must never let into its archive (all made up).
SWARM_TOKEN = "SWMTKN-1-3pu6hszjas19xyp7ghgosyx9k8atbfcr8p2is99znpy26u2lkl-1awxwuwd3z9j1z3puu7rcgdbx"
K3S_TOKEN = "K10d9a3b1c7e5f40123456789abcdef0123456789abcdef0123456789abcdef01::server:7f3e9c1b2a4d6e8f"
PEM_BODY = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZWQ"
PRIVATE_KEY = f"-----BEGIN OPENSSH PRIVATE KEY-----\n{PEM_BODY}\n-----END OPENSSH PRIVATE KEY-----"
PASSWORD = "Plant3d-Passw0rd-xyz"
SUDO_PASSWORD = "sudo-Pa55-for-deploy"


def node_shell(cluster: str, node: str, command: str) -> str:
    """A shell command in a local node's own world (mount, UTS and network namespaces), not over SSH."""
    entry = next(e for e in registry_entries(cluster) if e["node"] == node)
    pid = netns.sshd_pid(entry["netns"])
    r = subprocess.run(["nsenter", "-t", str(pid), "-m", "-u", "-n", "sh", "-c", command], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def run_json(cli: Dcx, *args: str) -> tuple[int, dict]:
    r = cli.run("-o", "json", "node", "run", NAME, *args)  # before `--`: what follows it is the remote command
    return r.returncode, json.loads(r.stdout)


def test_node_run_and_diagnose_on_a_local_cluster(dcx_cli: tuple[Dcx, list[str]], tmp_path: Path) -> None:
    cli, clusters = dcx_cli
    clusters.append(NAME)
    spec = tmp_path / "cluster.yaml"
    # mesh: wireguard, so the archive's mesh section (and the node's WireGuard private key) is real.
    spec.write_text(cluster_yaml(NAME, "10.213.209.0/24", workers=1).replace(
        "  engine: {type: swarm}", "  engine: {type: swarm}\n  network: {mesh: wireguard}")
        .replace("local: {subnet: 10.213.209.0/24}}", "local: {subnet: 10.213.209.0/24}, labels: {tier: core}}", 1))
    cli.run("cluster", "create", "-f", str(spec), check=True)

    # Every node, one JSON document; CMD is a shell command line on the node (pipes, $(()), $HOSTNAME).
    code, doc = run_json(cli, "--", "echo $((6*7)) | tr 4 X; hostname")
    assert code == 0 and doc["ok"] is True and doc["summary"] == {"nodes": 2, "ok": 2, "failed": 0}
    assert [n["node"] for n in doc["nodes"]] == [CONTROL, WORKER]
    for n in doc["nodes"]:
        assert set(n) == {"node", "pool", "role", "exit_code", "stdout", "stderr", "duration_s", "error"}
        assert n["exit_code"] == 0 and n["stdout"] == f"X2\n{n['node']}\n" and n["error"] is None
        assert isinstance(n["duration_s"], float) and n["duration_s"] > 0

    # Selection: each filter alone, and filters together (all must match).
    assert [n["node"] for n in run_json(cli, "--role", "worker", "--", "true")[1]["nodes"]] == [WORKER]
    assert [n["node"] for n in run_json(cli, "--pool", "control", "--", "true")[1]["nodes"]] == [CONTROL]
    assert [n["node"] for n in run_json(cli, "--label", "tier=core", "--", "true")[1]["nodes"]] == [CONTROL]
    assert [n["node"] for n in run_json(cli, "--node", WORKER, "--node", CONTROL, "--", "true")[1]["nodes"]] \
        == [CONTROL, WORKER]
    # Bad input: one line, exit 2, nothing run.
    for args, message in ((["--role", "worker", "--pool", "control"], "no node of cluster e2e-fleet matches"),
                          (["--node", "nope"], "has no node nope"), (["--label", "tier"], "expected KEY=VALUE"),
                          (["--role", "boss"], "must be control or worker")):
        r = cli.run("node", "run", NAME, *args, "--", "true")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)

    # Exit 1 unless every node exited 0; each node's own code is reported.
    code, doc = run_json(cli, "--", f'test "$(hostname)" = {CONTROL} || {{ echo no >&2; exit 3; }}')
    assert code == 1 and doc["ok"] is False
    assert {n["node"]: (n["exit_code"], n["stderr"]) for n in doc["nodes"]} == {CONTROL: (0, ""), WORKER: (3, "no\n")}

    # A node past --timeout has no exit code but an error; the run fails.
    code, doc = run_json(cli, "--timeout", "1", "--node", WORKER, "--", "sleep 5")
    assert code == 1 and doc["nodes"][0]["exit_code"] is None and doc["nodes"][0]["error"] == "timed out after 1 s"

    # --fold: identical results print once, under the nodes that gave them.
    r = cli.run("node", "run", NAME, "--fold", "--", "echo same")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"==> {CONTROL}, {WORKER} (2 nodes): ok\nsame\n"
    code, doc = run_json(cli, "--fold", "--", "hostname")
    assert [g["nodes"] for g in doc["groups"]] == [[CONTROL], [WORKER]]
    unfolded = cli.run("node", "run", NAME, "--", "echo same").stdout
    assert re.findall(r"^==> (\S+): ok \(\d+\.\d\ds\)$", unfolded, re.M) == [CONTROL, WORKER]

    # --- diagnose ---------------------------------------------------------------------------------
    wg_private = node_shell(NAME, CONTROL, "cat /etc/dcx/wireguard/private.key").strip()
    assert len(wg_private) == 44
    planted = "\n".join([f"planted-daemon-line join --token {SWARM_TOKEN}", f"planted-k3s {K3S_TOKEN}",
                         f"planted-password password={PASSWORD}", f"planted-wg {wg_private}", PRIVATE_KEY, ""])
    # On the node: in the log file dockerd was started with (what the daemon-log section collects).
    node_shell(NAME, CONTROL, f"cat >> /var/log/dcx-dockerd.log <<'EOF'\n{planted}EOF")
    # Locally: in one of dcx's run logs for the cluster. A bare WireGuard key looks like any public key,
    # so only its `PrivateKey = ` form is recognisable here (the bare one never leaves its node).
    local_plant = planted.replace(f"planted-wg {wg_private}", f"planted-wg PrivateKey = {wg_private}")
    (cli.home / "clusters" / NAME / "logs" / "planted.log").write_text(
        local_plant + f"ansible_become_password={PASSWORD}\n")

    archive = tmp_path / "diag.tar.gz"
    r = cli.run("cluster", "diagnose", NAME, "-o", str(archive))
    assert r.returncode == 0, r.stderr
    assert f"wrote {archive} (2 nodes, 0 unreachable)" in r.stdout
    assert "nothing looks wrong" in r.stdout, r.stdout + r.stderr
    assert oct(archive.stat().st_mode & 0o777) == "0o600"
    members = extract(archive)
    top = next(iter(members)).split("/")[0]
    assert top.startswith(f"dcx-{NAME}-diagnose-")
    names = {m.split("/", 1)[1] for m in members}
    for node in (CONTROL, WORKER):
        for section in ("facts.json", "os.txt", "resources.txt", "disk.txt", "network.txt", "firewall.txt",
                        "mesh.txt", "engine.txt", "daemon-log.txt", "config.txt"):
            assert f"nodes/{node}/{section}" in names, (node, section, sorted(names))
    assert {"summary.txt", "cluster.json", "health.json", "dcx-logs/planted.log"} <= names
    node_dir = f"{top}/nodes/{CONTROL}"
    assert "Swarm: active" in members[f"{node_dir}/engine.txt"]
    assert "*filter" in members[f"{node_dir}/firewall.txt"]  # iptables-save, run as root on the node
    mesh = members[f"{node_dir}/mesh.txt"]
    assert re.search(r"^interface\t\S+\t51820$", mesh, re.M), mesh  # public key and port: no private key column
    assert re.search(r"^peer\t\S+\t\S+\t100\.96\.", mesh, re.M), mesh
    assert json.loads(members[f"{node_dir}/facts.json"])["facts"]["hostname"] == CONTROL
    assert json.loads(members[f"{top}/health.json"])[WORKER]["ready"] is True
    # The planted lines were collected (their markers are there), their secrets were not.
    daemon_log = members[f"{node_dir}/daemon-log.txt"]
    for marker in ("planted-daemon-line", "planted-k3s", "planted-password", "planted-wg"):
        assert marker in daemon_log and marker in members[f"{top}/dcx-logs/planted.log"]
    for secret in (SWARM_TOKEN, K3S_TOKEN, "7f3e9c1b2a4d6e8f", PEM_BODY, PASSWORD, wg_private):
        leaked = [m for m, text in members.items() if secret in text]
        assert not leaked, (secret, leaked)

    # A node whose docker stopped is named in the summary.
    node_shell(NAME, WORKER, "kill $(cat /run/dcx/dockerd.pid)")
    r = cli.run("cluster", "diagnose", NAME, "-o", str(tmp_path / "again.tar.gz"))
    assert f"{WORKER}: docker is not running" in r.stderr, r.stdout + r.stderr
    assert f"{CONTROL}: docker is not running" not in r.stderr


def extract(archive: Path) -> dict[str, str]:
    with tarfile.open(archive, "r:gz") as tar:
        out = {}
        for m in tar.getmembers():
            assert m.isfile() and m.mode == 0o600 and not m.name.startswith("/") and ".." not in m.name
            fh = tar.extractfile(m)
            assert fh is not None
            out[m.name] = fh.read().decode()
        return out


@pytest.fixture
def rack() -> Iterator[Lab]:
    """One machine with two logins (passwordless sudo, sudo with a password), and one reachable only
    through a bastion."""
    skip_without_namespace_nodes()
    lab = Lab("fleet")
    try:
        lab.network("lan", "10.214.60.0/24", operator_ip="10.214.60.1")
        lab.network("dark", "10.214.61.0/24")
        lab.host("bastion", "lan", "10.214.60.10", extra=[("dark", "10.214.61.1")], forward=True)
        lab.host("box", "lan", "10.214.60.11", users=[LoginUser("ops"),
                 LoginUser("deploy", sudo="password", password=SUDO_PASSWORD)])
        lab.host("deep", "dark", "10.214.61.21", gateway="10.214.61.1")
        yield lab
    finally:
        lab.close()


def test_node_run_with_sudo_and_a_jump_host_on_adopted_machines(rack: Lab, tmp_path: Path) -> None:
    """Machines adopted with `create --provision-only` (recorded, nothing installed): node run reaches
    them with their inventory's users, sudo rules and ProxyJump; diagnose goes through the same."""
    (tmp_path / "hosts.ini").write_text(f"""\
[rack]
ops ansible_host=10.214.60.11 ansible_user=ops
deploy ansible_host=10.214.60.11 ansible_user=deploy
deep ansible_host=10.214.61.21 ansible_user=root ansible_ssh_common_args='-o ProxyJump=root@10.214.60.10'

[all:vars]
ansible_ssh_private_key_file={rack.key}
""")
    spec = tmp_path / "cluster.yaml"
    spec.write_text("apiVersion: dcx/v1\nkind: Cluster\nmetadata: {name: adopted}\nspec:\n  pools:\n"
                    "    - {name: rack, role: control, provider: ssh, ssh: {inventory: hosts.ini, group: rack}}\n")
    cli = Dcx(tmp_path / "home")
    cli.env["DCX_NO_SSH_CONFIG"] = "1"
    # Nothing is installed on the machines, and the lab goes with them: no destroy is needed.
    cli.run("cluster", "create", "-f", str(spec), "--provision-only", check=True)

    def run(*args: str, password: str = "") -> tuple[int, dict[str, dict]]:
        r = subprocess.run(cli.argv("-o", "json", "node", "run", "adopted", *args), input=password,
                           capture_output=True, text=True, env=cli.env, timeout=120)
        assert SUDO_PASSWORD not in r.stdout + r.stderr
        return r.returncode, {n["node"]: n for n in json.loads(r.stdout)["nodes"]}

    code, nodes = run("--", "id -un")
    assert code == 0 and {n: r["stdout"] for n, r in nodes.items()} == {
        "ops": "ops\n", "deploy": "deploy\n", "deep": "root\n"}
    # --sudo: root through passwordless sudo; deploy's sudo wants a password, refused without -K.
    code, nodes = run("--sudo", "--", "id -un")
    assert code == 1 and nodes["ops"]["stdout"] == "root\n" and nodes["deep"]["stdout"] == "root\n"
    assert nodes["deploy"]["exit_code"] != 0 and "password" in nodes["deploy"]["stderr"]
    # -K: the password reaches sudo on its stdin, never a command line or the output.
    code, nodes = run("--sudo", "-K", "--", "id -un", password=SUDO_PASSWORD + "\n")
    assert code == 0 and {n: r["stdout"] for n, r in nodes.items()} == {
        "ops": "root\n", "deploy": "root\n", "deep": "root\n"}
    logs = (tmp_path / "home" / "clusters" / "adopted" / "logs").glob("*.log")
    assert not any(SUDO_PASSWORD in p.read_text() for p in logs)

    # diagnose through the same logins and jump: nothing runs there yet, and the summary says so.
    r = subprocess.run(cli.argv("cluster", "diagnose", "adopted", "-K", "-o", str(tmp_path / "d.tar.gz")),
                       input=SUDO_PASSWORD + "\n", capture_output=True, text=True, env=cli.env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "(3 nodes, 0 unreachable)" in r.stdout
    for node in ("ops", "deploy", "deep"):
        assert f"{node}: docker is not running" in r.stderr, r.stderr
    members = extract(tmp_path / "d.tar.gz")
    facts = next(text for name, text in members.items() if name.endswith("/nodes/deploy/facts.json"))
    assert json.loads(facts)["facts"]["uid"] == 0  # gathered as root, through deploy's sudo and its password
