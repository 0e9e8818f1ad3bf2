"""One command on 20 machines: `dcx node run` vs Ansible's ad-hoc `command` module vs pyinfra's `exec`,
and facts (`dcx inventory check` vs `ansible -m setup`). Printed as wall times and ratios, not asserted.

The machines are 20 plain SSH hosts (tests/testbed's Lab: namespace hosts with their own sshd, root
logins with one operator key, nothing installed by dcx), so every tool sees the same machines. dcx
reaches them as a user would without a cluster on them: the same Ansible INI inventory, adopted by
an ssh pool with `dcx cluster create --provision-only` (the nodes are recorded, nothing is run on
them), then `dcx node run` as a fresh process per command, like `ansible` and `pyinfra`.

Ansible and pyinfra come from PyPI into their own venv (DCX_BENCH_VENV, default
~/.cache/dcx-bench/fanout-venv), made on first use. Ansible runs with -f 20, pipelining and its
default ControlPersist (its steady state for commands a minute apart); every tool gets one untimed
warm-up run first (host keys, control sockets, page cache). Needs root (namespace hosts); takes the
machine's namespace-test lock; every host is removed at the end, also on Ctrl-C or SIGTERM.

    .venv/bin/python bench/fanout.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.testbed.lab import Lab  # noqa: E402 - after the path is set
from tests.testbed.local import missing_for_namespace_nodes, skip_without_namespace_nodes  # noqa: E402

HOSTS = 20
COMMAND = "uname -r"
RUNS = 10
SUBNET = "10.214.70"
VENV = Path(os.environ.get("DCX_BENCH_VENV", Path.home() / ".cache" / "dcx-bench" / "fanout-venv"))


def ensure_tools() -> Path:
    """ansible-core and pyinfra in their own venv (never in dcx's)."""
    bin_dir = VENV / "bin"
    if not (bin_dir / "ansible").exists() or not (bin_dir / "pyinfra").exists():
        print(f"installing ansible-core and pyinfra into {VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(bin_dir / "pip"), "install", "-q", "ansible-core", "pyinfra"], check=True)
    return bin_dir


def write_files(lab: Lab, work: Path, names: list[str]) -> dict[str, Path]:
    ini = work / "hosts.ini"
    ini.write_text("[bench]\n" + "".join(f"{n} ansible_host={SUBNET}.{11 + i}\n" for i, n in enumerate(names))
                   + f"\n[all:vars]\nansible_user=root\nansible_ssh_private_key_file={lab.key}\n"
                   "ansible_python_interpreter=/usr/bin/python3\n")
    cfg = work / "ansible.cfg"
    cfg.write_text(f"[defaults]\nhost_key_checking = False\nforks = {HOSTS}\nstdout_callback = default\n"
                   "interpreter_python = /usr/bin/python3\n"
                   f"[ssh_connection]\npipelining = True\ncontrol_path_dir = {work / 'cp'}\n"
                   "ssh_args = -o ControlMaster=auto -o ControlPersist=60s -o UserKnownHostsFile=/dev/null\n")
    pyinfra_inv = work / "inventory.py"
    hosts = [(n, {"ssh_hostname": f"{SUBNET}.{11 + i}", "ssh_user": "root", "ssh_key": str(lab.key),
                  "ssh_strict_host_key_checking": "no", "ssh_known_hosts_file": "/dev/null"})
             for i, n in enumerate(names)]
    pyinfra_inv.write_text(f"bench = {hosts!r}\n")
    spec = work / "cluster.yaml"
    spec.write_text("apiVersion: dcx/v1\nkind: Cluster\nmetadata: {name: bench}\nspec:\n  pools:\n"
                    "    - {name: bench, role: control, provider: ssh, ssh: {inventory: hosts.ini, group: bench}}\n")
    return {"ini": ini, "cfg": cfg, "pyinfra": pyinfra_inv, "spec": spec}


class Tools:
    def __init__(self, bin_dir: Path, files: dict[str, Path], work: Path) -> None:
        self.bin = bin_dir
        self.files = files
        self.work = work
        self.dcx_env = {**os.environ, "DCX_HOME": str(work / "dcx-home"), "DCX_NO_SSH_CONFIG": "1", "NO_COLOR": "1"}
        self.ansible_env = {**os.environ, "ANSIBLE_CONFIG": str(files["cfg"]), "ANSIBLE_LOCAL_TEMP": str(work / "at"),
                            "ANSIBLE_HOME": str(work / "ah")}
        self.pyinfra_env = {**os.environ, "PYINFRA_PROGRESS": "off"}

    def dcx(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run([sys.executable, "-m", "dcx", *args], self.dcx_env)

    def node_run(self) -> None:
        r = self.dcx("-o", "json", "node", "run", "bench", "--", COMMAND)
        doc = json.loads(r.stdout)
        assert r.returncode == 0 and doc["summary"]["ok"] == HOSTS, r.stdout[-2000:] + r.stderr[-2000:]

    def dcx_facts(self) -> None:
        r = self.dcx("-o", "json", "inventory", "check", str(self.files["ini"]))
        rows = json.loads(r.stdout)
        assert r.returncode == 0 and sum(1 for x in rows if x.get("reachable") and x.get("os")) == HOSTS, r.stderr

    def ansible(self, *module: str) -> None:
        r = run([str(self.bin / "ansible"), "all", "-i", str(self.files["ini"]), "-f", str(HOSTS), *module],
                self.ansible_env)
        ok = r.stdout.count(" | CHANGED") + r.stdout.count(" | SUCCESS")
        assert r.returncode == 0 and ok == HOSTS, r.stdout[-2000:] + r.stderr[-2000:]

    def pyinfra(self) -> None:
        r = run([str(self.bin / "pyinfra"), str(self.files["pyinfra"]), "-y", "--parallel", str(HOSTS), "exec", "--",
                 COMMAND], self.pyinfra_env, cwd=self.work)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def run(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600,
                          cwd=cwd)


def timed(fn: object, times: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(times):
        fn()  # type: ignore[operator]
    return time.perf_counter() - start


def main() -> None:
    why = missing_for_namespace_nodes()
    if why:
        print(f"skipped: namespace hosts unavailable here: {why}")
        return
    skip_without_namespace_nodes()  # takes this machine's namespace-test lock
    # SIGTERM unwinds like Ctrl-C, through the finally that removes every host.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bin_dir = ensure_tools()
    names = [f"h{i:02d}" for i in range(1, HOSTS + 1)]
    with tempfile.TemporaryDirectory(prefix="dcx-bench-fanout-") as tmp:
        work = Path(tmp)
        lab = Lab("fanout")
        try:
            lab.network("lan", f"{SUBNET}.0/24", operator_ip=f"{SUBNET}.1")
            for i, name in enumerate(names):
                lab.host(name, "lan", f"{SUBNET}.{11 + i}")
            files = write_files(lab, work, names)
            t = Tools(bin_dir, files, work)
            r = t.dcx("cluster", "create", "-f", str(files["spec"]), "--provision-only", "-q")
            assert r.returncode == 0, r.stderr
            ansible_command = ("-m", "command", "-a", COMMAND)
            for warm in (t.node_run, lambda: t.ansible(*ansible_command), t.pyinfra):
                warm()
            results = {
                "dcx": (timed(t.node_run), timed(t.node_run, RUNS)),
                "ansible": (timed(lambda: t.ansible(*ansible_command)),
                            timed(lambda: t.ansible(*ansible_command), RUNS)),
                "pyinfra": (timed(t.pyinfra), timed(t.pyinfra, RUNS)),
            }
            t.dcx_facts()
            t.ansible("-m", "setup")
            facts = {"dcx": timed(t.dcx_facts), "ansible": timed(lambda: t.ansible("-m", "setup"))}
        finally:
            # A second Ctrl-C or SIGTERM must not cut the teardown short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            lab.close()
    report(results, facts)


def report(results: dict[str, tuple[float, float]], facts: dict[str, float]) -> None:
    print(f"{HOSTS} hosts, `{COMMAND}`; wall time (s) of 1 command and of {RUNS} consecutive commands")
    print(f"  {'':28}{'1 command':>12}{f'{RUNS} commands':>14}")
    labels = {"dcx": "dcx node run", "ansible": f"ansible -m command -f {HOSTS}", "pyinfra": "pyinfra exec"}
    for tool, (one, many) in results.items():
        print(f"  {labels[tool]:28}{one:12.2f}{many:14.2f}")
    dcx_one, dcx_many = results["dcx"]
    for other in ("ansible", "pyinfra"):
        one, many = results[other]
        print(f"  dcx / {other:10} {dcx_one / one:6.2f}x (1 command)   {dcx_many / many:6.2f}x ({RUNS} commands)")
    target = "met" if dcx_many / results["ansible"][1] <= 0.2 else "NOT met"
    print(f"  target dcx <= 0.2x Ansible for {RUNS} commands: {target}")
    print(f"facts: dcx inventory check {facts['dcx']:.2f} s, ansible -m setup {facts['ansible']:.2f} s "
          f"({facts['dcx'] / facts['ansible']:.2f}x)")


if __name__ == "__main__":
    main()
