"""Malformed and hostile input, through the real CLI in a subprocess: each is refused in one line
(`error: FILE:LINE: FIELD: problem` where there is a file), with exit 2, quickly (the subprocess
timeout is the failure condition, not a timed assert), and nothing is written under DCX_HOME."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TIMEOUT = 20  # seconds: far above what any of these takes; reaching it is the failure

HEAD = "apiVersion: dcx/v1\nkind: Cluster\nmetadata: {name: demo}\nspec:\n"
ONE_POOL = "  pools:\n    - {name: control, role: control, count: 1, provider: local}\n"


def spec_text(body: str = ONE_POOL, head: str = HEAD) -> str:
    return head + body


def ssh_pool(inventory: str = "hosts.ini", engine: str = "") -> str:
    return (engine + "  pools:\n"
            f"    - {{name: control, role: control, provider: ssh, ssh: {{inventory: {inventory}}}}}\n")


@dataclass
class Case:
    id: str
    argv: list[str]  # {dir} is the test's directory
    expect: str  # a substring of the one error line; {dir} as above
    files: dict[str, str | bytes] = field(default_factory=dict)
    setup: Callable[[Path], None] | None = None


def plan(file: str = "cluster.yaml") -> list[str]:
    return ["cluster", "plan", "-f", "{dir}/" + file]


def create(file: str = "cluster.yaml") -> list[str]:
    # ssh pools with an unreachable host and a 1 s timeout: were a case accepted, it would fail fast.
    return ["cluster", "create", "-f", "{dir}/" + file, "--ssh-timeout", "1"]


def alias_bomb() -> str:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 10):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n" + HEAD + ONE_POOL


def symlink_loop(d: Path) -> None:
    (d / "loop.yaml").symlink_to(d / "loop2.yaml")
    (d / "loop2.yaml").symlink_to(d / "loop.yaml")


def fifo(d: Path) -> None:
    os.mkfifo(d / "fifo.yaml")


SPEC = "{dir}/cluster.yaml"
INV = "{dir}/hosts.ini"

CASES = [
    # --- fields that reach a shell, a hostname, a label: each to its target's grammar --------------
    Case("count-true", plan(), f"{SPEC}:8: spec.pools[0].count: must be an integer",
         {"cluster.yaml": spec_text("  pools:\n    - name: control\n      role: control\n      count: true\n"
                                    "      provider: local\n")}),
    Case("count-string", plan(), f"{SPEC}:6: spec.pools[0].count: must be an integer",
         {"cluster.yaml": spec_text("  pools:\n    - {name: control, role: control, count: '3', provider: local}\n")}),
    Case("ssh-port-bool", plan(), f"{SPEC}:5: spec.ssh.port: must be an integer",
         {"cluster.yaml": spec_text("  ssh: {port: true}\n" + ONE_POOL)}),
    Case("ssh-user-shell", plan(), f"{SPEC}:5: spec.ssh.user: is not a login name",
         {"cluster.yaml": spec_text("  ssh: {user: 'root;id'}\n" + ONE_POOL)}),
    Case("mesh-contains-local-subnet", plan(),
         f"{SPEC}:5: spec.network.meshCIDR: 10.0.0.0/8 overlaps pool control's subnet 10.213.0.0/24",
         {"cluster.yaml": spec_text("  network: {meshCIDR: 10.0.0.0/8}\n  pools:\n    - {name: control, role: control,"
                                    " count: 1, provider: local, local: {subnet: 10.213.0.0/24}}\n")}),
    Case("mesh-inside-aws-vpc", plan(), f"{SPEC}:5: spec.network.meshCIDR: 100.96.0.0/16 overlaps pool control's "
         "vpcCIDR 100.64.0.0/10",
         {"cluster.yaml": spec_text("  network: {meshCIDR: 100.96.0.0/16, sshCIDR: 203.0.113.7/32}\n  pools:\n"
                                    "    - {name: control, role: control, count: 1, provider: aws,"
                                    " aws: {region: eu-west-1, vpcCIDR: 100.64.0.0/10}}\n")}),
    Case("k3s-two-control-nodes", plan(), f"{SPEC}:7: spec.pools[0].count: k3s needs an odd number of control nodes",
         {"cluster.yaml": spec_text("  engine: {type: k3s}\n  pools:\n"
                                    "    - {name: control, role: control, count: 2, provider: local}\n")}),
    Case("k3s-two-control-pools", plan(), "etcd quorum",
         {"cluster.yaml": spec_text("  engine: {type: k3s}\n  pools:\n"
                                    "    - {name: a, role: control, count: 1, provider: local}\n"
                                    "    - {name: b, role: control, count: 1, provider: local}\n")}),
    Case("label-key-space-bang", plan(), f"{SPEC}:6: spec.pools[0].labels.bad key!: is not a label key",
         {"cluster.yaml": spec_text("  pools:\n    - {name: c, role: control, count: 1, provider: local,"
                                    " labels: {'bad key!': x}}\n")}),
    Case("label-key-equals", plan(), "spec.pools[0].labels.a=b: is not a label key",
         {"cluster.yaml": spec_text("  pools:\n    - {name: c, role: control, count: 1, provider: local,"
                                    " labels: {'a=b': x}}\n")}),
    Case("label-key-option", plan(), "spec.pools[0].labels.--rm: is not a label key",
         {"cluster.yaml": spec_text("  pools:\n    - {name: c, role: control, count: 1, provider: local,"
                                    " labels: {'--rm': x}}\n")}),
    Case("label-value-newline", plan(), "spec.pools[0].labels.tier: value must be one line of printable text",
         {"cluster.yaml": spec_text("  pools:\n    - {name: c, role: control, count: 1, provider: local,"
                                    ' labels: {tier: "a\\nb"}}\n')}),
    Case("metadata-label-key", plan(), f"{SPEC}:3: metadata.labels.$(reboot): is not a label key",
         {"cluster.yaml": spec_text(ONE_POOL, head=HEAD.replace("{name: demo}",
                                                                "{name: demo, labels: {'$(reboot)': x}}"))}),
    Case("taint-no-effect", plan(), "spec.pools[0].taints[0]: taint 'foo' must be key[=value]:Effect",
         {"cluster.yaml": spec_text("  pools:\n    - {name: c, role: control, count: 1, provider: local,"
                                    " taints: [foo]}\n")}),
    Case("taint-bad-effect", plan(), "taint 'gpu=yes:Sometimes' must be key[=value]:Effect",
         {"cluster.yaml": spec_text("  pools:\n    - {name: c, role: control, count: 1, provider: local,"
                                    " taints: ['gpu=yes:Sometimes']}\n")}),
    Case("engine-version-shell", plan(), f"{SPEC}:5: spec.engine.version: is not a version",
         {"cluster.yaml": spec_text("  engine: {type: k3s, version: 'v1.31.4; rm -rf /'}\n" + ONE_POOL)}),
    Case("engine-version-subshell", plan(), "spec.engine.version: is not a version",
         {"cluster.yaml": spec_text("  engine: {version: '$(reboot)'}\n" + ONE_POOL)}),
    Case("load-balancer-shell", plan(), f"{SPEC}:5: spec.engine.loadBalancer: is not a host name",
         {"cluster.yaml": spec_text("  engine: {type: k3s, loadBalancer: 'lb.example.com; reboot'}\n" + ONE_POOL)}),
    Case("tls-san-space", plan(), "spec.engine.tlsSAN: 'a b' is not a host name",
         {"cluster.yaml": spec_text("  engine: {type: k3s, tlsSAN: ['a b']}\n" + ONE_POOL)}),
    Case("inline-host-shell", plan(), f"{SPEC}:9: spec.pools[0].ssh.hosts[0]: host 'mgr;touch /tmp/x'",
         {"cluster.yaml": spec_text("  pools:\n    - name: c\n      role: control\n      provider: ssh\n"
                                    "      ssh: {hosts: [{name: 'mgr;touch /tmp/x', address: 127.0.0.1}]}\n")}),
    Case("inline-host-twice", create(), f"{SPEC}:9: spec.pools[0].ssh.hosts: hosts listed twice: h1",
         {"cluster.yaml": spec_text("  pools:\n    - name: c\n      role: control\n      provider: ssh\n"
                                    "      ssh: {hosts: [{name: h1, address: 127.0.0.1, port: 1},"
                                    " {name: h1, address: 127.0.0.2, port: 1}]}\n")}),
    # --- inventories: located at the inventory's line and at the spec's ------------------------------
    Case("inventory-host-semicolon", create(),
         f"{SPEC}:6: spec.pools[0].ssh.inventory: {INV}:2: host mgr;touch${{IFS}}/tmp/dcx-h3-pwned: "
         "is not a usable node name",
         {"cluster.yaml": spec_text(ssh_pool()), "hosts.ini": "[all]\nmgr;touch${IFS}/tmp/dcx-h3-pwned\n"}),
    Case("inventory-host-subshell", create(), f"{INV}:3: host $(reboot): is not a usable node name",
         {"cluster.yaml": spec_text(ssh_pool()), "hosts.ini": "[all]\nok1 ansible_host=127.0.0.1 ansible_port=1\n"
                                                               "$(reboot)\n"}),
    Case("inventory-ansible-host-option", plan(), f"{INV}:2: host web: ansible_host: is not a host name or an IP",
         {"cluster.yaml": spec_text(ssh_pool()),
          "hosts.ini": "[all]\nweb ansible_host='10.0.0.1 -oProxyCommand=touch'\n"}),
    Case("inventory-user-option", plan(), f"{INV}:2: host web: ansible_user: is not a login name",
         {"cluster.yaml": spec_text(ssh_pool()), "hosts.ini": "[all]\nweb ansible_user=-oProxyCommand=x\n"}),
    Case("inventory-million-host-range", ["inventory", "show", INV],
         f"{INV}:2: host node[1:1000000]: the range makes more than 10000 hosts",
         {"hosts.ini": "[all]\nnode[1:1000000]\n"}),
    Case("inventory-range-through-spec", create(), f"{SPEC}:6: spec.pools[0].ssh.inventory: {INV}:2: host n[1:999]"
         "[1:999]: the range makes more than 10000 hosts",
         {"cluster.yaml": spec_text(ssh_pool()), "hosts.ini": "[all]\nn[1:999][1:999]\n"}),
    Case("inventory-yaml-dcx-host", plan("c.yaml"), "{dir}/inv.yaml:4: hosts[0].name: is not a usable node name",
         {"c.yaml": spec_text(ssh_pool("inv.yaml")),
          "inv.yaml": "apiVersion: dcx/v1\nkind: Inventory\nhosts:\n  - {name: '`id`', address: 10.0.0.1}\n"}),
    Case("inventory-mesh-endpoint", plan(), f"{INV}:2: host web: dcx_mesh_endpoint: port 'x'",
         {"cluster.yaml": spec_text(ssh_pool()), "hosts.ini": "[all]\nweb dcx_mesh_endpoint=1.2.3.4:x\n"}),
    Case("inventory-not-utf8", plan(), f"{SPEC}:6: spec.pools[0].ssh.inventory: {INV}: not UTF-8 text",
         {"cluster.yaml": spec_text(ssh_pool()), "hosts.ini": b"[all]\nh\xe9te\n"}),
    Case("inventory-count-mismatch", create(), f"{SPEC}:6: spec.pools[0].count: is 3 but the pool's inventory has "
         "1 hosts", {"cluster.yaml": spec_text(ssh_pool().replace("provider: ssh", "count: 3, provider: ssh")),
                     "hosts.ini": "[all]\nh1 ansible_host=127.0.0.1 ansible_port=1\n"}),
    Case("inventory-missing", create(), f"{SPEC}:6: spec.pools[0].ssh.inventory: {INV}: inventory file not found",
         {"cluster.yaml": spec_text(ssh_pool())}),
    # --- typos and messages ----------------------------------------------------------------------------
    Case("azure-without-location", plan(), f"{SPEC}:7: spec.pools[0].azure.location: is required",
         {"cluster.yaml": spec_text("  network: {sshCIDR: 203.0.113.7/32}\n  pools:\n    - {name: control, role: "
                                    "control, count: 1, provider: azure, azure: {vmSize: Standard_B2s}}\n")}),
    Case("typo-metadata", plan(), f"{SPEC}:3: metdata: unknown field; did you mean 'metadata'?",
         {"cluster.yaml": spec_text(ONE_POOL, head=HEAD.replace("metadata:", "metdata:"))}),
    Case("typo-pools", plan(), f"{SPEC}:5: spec.pool: unknown field; did you mean 'pools'?",
         {"cluster.yaml": spec_text(ONE_POOL.replace("pools:", "pool:"))}),
    Case("emoji-code-printed-as-is", plan(), "spec.:x:: unknown field",
         {"cluster.yaml": spec_text("  ':x:': 1\n" + ONE_POOL)}),
    Case("name-too-long", plan(), f"{SPEC}:3: metadata.name: must be at most 24 characters",
         {"cluster.yaml": spec_text(ONE_POOL, head=HEAD.replace("demo", "d" * 300))}),
    Case("duplicate-key", plan(), "invalid YAML",
         {"cluster.yaml": spec_text(ONE_POOL, head=HEAD + "spec:\n")}),
    # --- files that hang, crash or are not files -------------------------------------------------------
    Case("alias-bomb", plan(), f"{SPEC}: more than 200000 values once aliases are expanded",
         {"cluster.yaml": alias_bomb()}),
    Case("deep-nesting", plan(), f"{SPEC}: invalid YAML: nested too deeply",
         {"cluster.yaml": "a: " + "[" * 50_000 + "]" * 50_000 + "\n"}),
    Case("spec-50-mb", plan(), f"{SPEC}: is larger than 1 MiB",
         {"cluster.yaml": HEAD + ONE_POOL + ("# " + "x" * 1000 + "\n") * 50_000}),
    Case("dev-zero", ["cluster", "plan", "-f", "/dev/zero"], "/dev/zero: is not a regular file"),
    Case("fifo", plan("fifo.yaml"), "{dir}/fifo.yaml: is not a regular file", setup=fifo),
    Case("directory", ["cluster", "plan", "-f", "{dir}"], "is a directory"),
    Case("spec-not-utf8", plan(), f"{SPEC}: not UTF-8 text (byte 0xff at offset 20)",
         {"cluster.yaml": b"apiVersion: dcx/v1\n#\xff\n"}),
    Case("symlink-loop", plan("loop.yaml"), "{dir}/loop.yaml: is a symlink loop", setup=symlink_loop),
    Case("file-name-over-255-bytes", plan("x" * 300 + ".yaml"), ": file name too long"),
    # --- cluster names before paths ----------------------------------------------------------------------
    Case("status-dotdot", ["cluster", "status", "../../x"], "'../../x' is not a cluster name"),
    Case("destroy-dotdot", ["cluster", "destroy", "../..", "--yes"], "'../..' is not a cluster name"),
    Case("status-name-300-bytes", ["cluster", "status", "a" * 300], "is not a cluster name"),
    Case("env-uppercase-name", ["cluster", "env", "Demo"], "'Demo' is not a cluster name"),
    Case("status-unknown", ["cluster", "status", "ghost"], "no cluster named 'ghost'"),
    Case("destroy-unknown", ["cluster", "destroy", "ghost", "--yes"], "no cluster named 'ghost'"),
    Case("node-list-unknown", ["node", "list", "ghost"], "no cluster named 'ghost'"),
    # --- usage errors: one line, exit 2 ------------------------------------------------------------------
    Case("negative-ssh-timeout", ["cluster", "create", "-f", SPEC, "--ssh-timeout", "-5"],
         "dcx cluster create: invalid value for '--ssh-timeout'", {"cluster.yaml": spec_text()}),
    Case("negative-check-timeout", ["inventory", "check", INV, "--timeout", "-1"],
         "dcx inventory check: invalid value for '--timeout'", {"hosts.ini": "[all]\nh1\n"}),
    Case("parallel-zero", ["cluster", "create", "-f", SPEC, "--parallel", "0"], "invalid value for '--parallel'",
         {"cluster.yaml": spec_text()}),
    Case("missing-file-option", ["cluster", "create"], "dcx cluster create: missing option '--file'"),
    Case("unknown-command", ["cluster", "launch"], "dcx cluster: no such command 'launch'"),
    Case("unknown-option", ["version", "--bogus"], "dcx version: no such option: --bogus"),
    Case("bad-output-format", ["-o", "yaml", "version"], "invalid value for --output"),
    Case("destroy-without-target", ["cluster", "destroy", "--yes"], "give a cluster NAME or -f FILE"),
]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its mode and size: what a refused command must not change."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size if stat.S_ISREG(st.st_mode) else 0)
    return out


def run_dcx(argv: list[str], home: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DCX_HOME": str(home), "DCX_SSH_CONFIG": str(cwd / "no-ssh-config"),
           "DCX_NO_SSH_CONFIG": "1", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "dcx", *argv], capture_output=True, text=True, env=env,
                          cwd=cwd, stdin=subprocess.DEVNULL, timeout=TIMEOUT)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_in_one_located_line_with_nothing_written(tmp_path: Path, case: Case) -> None:
    work = tmp_path / "in"
    work.mkdir()
    for name, content in case.files.items():
        (work / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    if case.setup:
        case.setup(work)
    home = tmp_path / "deep" / "home"  # destroy ../.. would reach tmp_path/deep and tmp_path
    before = tree(tmp_path)
    r = run_dcx([a.replace("{dir}", str(work)) for a in case.argv], home, work)
    lines = r.stderr.splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert case.expect.replace("{dir}", str(work)) in lines[0]
    assert "Traceback" not in r.stderr and "Error:" not in lines[0].removeprefix("error: ")  # no class names
    assert r.stdout == ""
    assert tree(tmp_path) == before  # nothing under DCX_HOME, nothing beside it
    assert not Path("/tmp/dcx-h3-pwned").exists()


def test_at_least_forty_hostile_cases() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 40


def test_the_largest_inventory_allowed_is_read_whole(tmp_path: Path) -> None:
    """10,000 hosts (the cap) through `dcx inventory show`: all listed, within the subprocess timeout."""
    (tmp_path / "hosts.ini").write_text("[web]\nnode[00001:10000] ansible_user=ops\n[web:vars]\nansible_port=2222\n")
    r = run_dcx(["inventory", "show", str(tmp_path / "hosts.ini"), "-o", "json"], tmp_path / "home", tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 10_000 and rows[-1] == {"name": "node10000", "address": "node10000", "port": 2222,
                                                "user": "ops", "keys": [], "jumps": []}
    assert not (tmp_path / "home").exists()


def test_ssh_config_is_parsed_once_for_all_hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import paramiko

    from dcx import hostcheck

    config = tmp_path / "ssh_config"
    config.write_text("Host node1*\n  User someone\n  Port 2200\n")
    (tmp_path / "hosts.ini").write_text("[web]\nnode[1:500]\n")
    monkeypatch.setenv("DCX_SSH_CONFIG", str(config))
    parsed: list[str] = []
    original = paramiko.SSHConfig.from_path

    def counting(path: str) -> paramiko.SSHConfig:  # a spy: paramiko still parses the file
        parsed.append(path)
        return original(path)

    monkeypatch.setattr(paramiko.SSHConfig, "from_path", counting)
    rows = hostcheck.show(tmp_path / "hosts.ini", None)
    assert len(rows) == 500 and len(parsed) <= 1
    assert {r["name"]: (r["user"], r["port"]) for r in rows}["node10"] == ("someone", 2200)
    assert {r["name"]: (r["user"], r["port"]) for r in rows}["node2"] == ("root", 22)
    config.write_text("Host node2\n  User changed\n")  # a new version of the file is read again
    assert {r["name"]: r["user"] for r in hostcheck.show(tmp_path / "hosts.ini", None)}["node2"] == "changed"


# --- archives a user names: `create --restore FILE`, `cluster import FILE`, and -o FILE of backup, export and
# diagnose. Each is refused in one line (plus a hint) before any node is contacted or anything is written; the
# recorded cluster's one host (127.0.0.1:1) would fail with exit 1 were it contacted first.

ARCHIVE_SPEC = HEAD + ("  pools:\n    - {name: control, role: control, provider: ssh,"
                       " ssh: {hosts: [{name: h1, address: 127.0.0.1, port: 1}]}}\n")


def backup_archive(engine: str = "swarm", version: int = 1) -> bytes:
    """An archive as `dcx cluster backup` writes one (its own writer), with incompressible engine state."""
    import random

    from dcx.lifecycle.backup import KIND, build_archive

    manifest = {"kind": KIND, "schema_version": version, "cluster": "old", "cluster_id": "0123abcd",
                "engine": engine, "created_at": "2026-12-01T00:00:00Z", "source_node": "c1", "images": []}
    return build_archive(manifest, {"spec.json": b"{}\n",
                                    "engine/raft.tar.gz": random.Random(0).randbytes(64_000)})


def truncated(data: bytes) -> bytes:
    return data[:len(data) // 2]


def recorded_cluster(work: Path) -> None:
    """Cluster `demo` recorded in the case's DCX_HOME (work/../home), as `create` leaves one."""
    from dcx.spec import load
    from dcx.state import ClusterState, StateStore

    (work / "demo.yaml").write_text(ARCHIVE_SPEC)
    node = {"name": "h1", "pool": "control", "provider": "ssh", "role": "control", "ssh_address": "127.0.0.1",
            "ssh_port": 1}
    cdir = StateStore(work.parent / "home").cluster("demo")
    cdir.save(ClusterState(name="demo", id="0123abcd", status="ready", spec_file=str(work / "demo.yaml"),
                           spec=load(work / "demo.yaml").model_dump(mode="json"), nodes={"h1": node},
                           resources={"ssh/node/h1": node}))
    cdir.ensure_ssh_key()


def exported_cluster(work: Path, file: Path) -> None:
    """`dcx cluster export` of the recorded cluster: a dcx tar.gz that is not a backup."""
    from dcx.state import StateStore
    from dcx.stores.moving import export_cluster

    recorded_cluster(work)
    export_cluster(StateStore(work.parent / "home"), "demo", file)


def restore(file: str) -> list[str]:
    return ["cluster", "create", "-f", SPEC, "--restore", file, "--ssh-timeout", "1"]


ARCHIVE_CASES = [
    Case("restore-missing", restore("{dir}/nope.tgz"), "{dir}/nope.tgz: cannot read the backup (No such file"),
    Case("restore-fifo", restore("{dir}/fifo.yaml"), "{dir}/fifo.yaml: is not a regular file", setup=fifo),
    Case("restore-dev-zero", restore("/dev/zero"), "/dev/zero: is not a regular file (a device, pipe or socket)"),
    Case("restore-not-gzip", restore("{dir}/b.tgz"), "{dir}/b.tgz: damaged or not a backup archive (ReadError",
         {"b.tgz": "hello\n"}),
    Case("restore-truncated", restore("{dir}/b.tgz"), "{dir}/b.tgz: damaged or not a backup archive (EOFError",
         {"b.tgz": truncated(backup_archive())}),
    Case("restore-other-engine", restore("{dir}/b.tgz"),
         f"{{dir}}/b.tgz: a backup of a k3s cluster cannot be restored into the swarm cluster of {SPEC}",
         {"b.tgz": backup_archive("k3s")}),
    Case("restore-newer-schema", restore("{dir}/b.tgz"), "backup schema_version 99 is not one this dcx reads",
         {"b.tgz": backup_archive(version=99)}),
    Case("restore-an-export", restore("{dir}/b.tgz"), "{dir}/b.tgz: not a dcx backup (no manifest.json)",
         setup=lambda d: exported_cluster(d, d / "b.tgz")),
    Case("import-fifo", ["cluster", "import", "{dir}/fifo.yaml"], "{dir}/fifo.yaml: is not a regular file",
         setup=fifo),
    Case("import-dev-zero", ["cluster", "import", "/dev/zero"], "/dev/zero: is not a regular file"),
    Case("import-truncated", ["cluster", "import", "{dir}/e.tgz"], "{dir}/e.tgz: damaged tar.gz (EOFError",
         {"e.tgz": truncated(backup_archive())}),
    Case("backup-to-dev-null", ["cluster", "backup", "demo", "-o", "/dev/null"],
         "/dev/null: is not a regular file: give a new file name for the backup", setup=recorded_cluster),
    Case("backup-to-missing-dir", ["cluster", "backup", "demo", "-o", "{dir}/no/b.tgz"],
         "{dir}/no/b.tgz: directory {dir}/no does not exist", setup=recorded_cluster),
    Case("backup-to-sysfs", ["cluster", "backup", "demo", "-o", "/sys/b.tgz"],
         "/sys/b.tgz: cannot write the backup there (", setup=recorded_cluster),
    Case("backup-to-directory", ["cluster", "backup", "demo", "-o", "{dir}"], "is a directory",
         setup=recorded_cluster),
    Case("export-to-dev-null", ["cluster", "export", "demo", "-o", "/dev/null"],
         "/dev/null: is not a regular file: give a new file name for the export", setup=recorded_cluster),
    Case("diagnose-to-dev-null", ["cluster", "diagnose", "demo", "-o", "/dev/null"],
         "/dev/null: is not a regular file: give a new file name for the archive", setup=recorded_cluster),
]


@pytest.mark.parametrize("case", ARCHIVE_CASES, ids=[c.id for c in ARCHIVE_CASES])
def test_archive_files_refused_before_anything_is_touched(tmp_path: Path, case: Case) -> None:
    work = tmp_path / "in"
    work.mkdir()
    (work / "cluster.yaml").write_text(ARCHIVE_SPEC)
    for name, content in case.files.items():
        (work / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    if case.setup:
        case.setup(work)
    before = tree(tmp_path)
    r = run_dcx([a.replace("{dir}", str(work)) for a in case.argv], tmp_path / "home", work)
    lines = r.stderr.splitlines()
    assert r.returncode == 2, r.stderr
    assert lines and lines[0].startswith("error: ") and case.expect.replace("{dir}", str(work)) in lines[0], r.stderr
    assert len(lines) <= 2 and all(line.startswith("hint: ") for line in lines[1:]), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert tree(tmp_path) == before  # no state, lock, log or partial archive anywhere
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)  # as root, a rename over it would have replaced it


def test_a_proxy_password_is_in_no_error_or_output(tmp_path: Path) -> None:
    """Malformed, mistyped and valid proxy URLs with a password: the password is never printed, and the format
    the error explains is not itself masked (it once read `http(s)://[user:***@]host`)."""
    secret = "S3cretPw"
    bad = {f"{{http: 'http://bob:{secret}@proxy:3128/path'}}": "as user:password@; percent-encode",
           f"{{http: 'http://bob:{secret}@pro xy:3128'}}": "host 'pro xy'",
           f"{{http: 'http://bob:{secret}@proxy:99999'}}": "port '99999'",
           f"{{htps: 'http://bob:{secret}@proxy:3128'}}": "unknown field; did you mean 'https'?",
           f"'http://bob:{secret}@proxy:3128'": "spec.network.proxy: must be a mapping"}
    for i, (proxy, expect) in enumerate(bad.items()):
        (tmp_path / f"{i}.yaml").write_text(spec_text(f"  network: {{proxy: {proxy}}}\n" + ONE_POOL))
        r = run_dcx(["cluster", "plan", "-f", f"{i}.yaml", "-o", "json"], tmp_path / "home", tmp_path)
        assert r.returncode == 2 and expect in r.stderr and "***" not in r.stderr, r.stderr
        assert secret not in r.stderr + r.stdout
    (tmp_path / "ok.yaml").write_text(spec_text(f"  network: {{proxy: {{http: 'http://bob:{secret}@proxy:3128'}}}}\n"
                                                + ARCHIVE_SPEC.removeprefix(HEAD)))
    r = run_dcx(["cluster", "plan", "-f", "ok.yaml", "-o", "json"], tmp_path / "home", tmp_path)
    assert r.returncode == 0, r.stderr
    json.loads(r.stdout)
    assert secret not in r.stderr + r.stdout
