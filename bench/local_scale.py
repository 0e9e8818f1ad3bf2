"""How dcx's commands scale with the number of local namespace nodes: wall time of `create`, a no-op
re-run of `create`, `plan` (of the unchanged cluster) and `destroy`, for 1, 5, 10 and 20 nodes, printed
with the ratio T(N)/T(1) (printed, not asserted).

Each command is a fresh `python -m dcx` process, as a user runs it. `--compare DIR` first prints the
table of the dcx package found in DIR (a copy of an earlier dcx/: `cp -a dcx /tmp/before/`), then this
tree's, back to back under one hold of the lock. Needs root and the packages scripts/setup installs;
takes the machine's namespace-test lock (/run/dcx-tests.lock, as the end-to-end tests do); every
cluster is destroyed, also on Ctrl-C. Other load on the machine shows in the load averages printed.

    .venv/bin/python bench/local_scale.py [--nodes 1,5,10,20] [--compare DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.testbed.local import missing_for_namespace_nodes, skip_without_namespace_nodes  # noqa: E402

COMMANDS = ("create", "re-run", "plan", "destroy")


def spec(name: str, workers: int, subnet: str) -> str:
    local = f"provider: local, local: {{subnet: {subnet}}}"
    text = (f"apiVersion: dcx/v1\nkind: Cluster\nmetadata: {{name: {name}}}\nspec:\n  pools:\n"
            f"    - {{name: control, role: control, count: 1, {local}}}\n")
    if workers:
        text += f"    - {{name: workers, role: worker, count: {workers}, {local}}}\n"
    return text


def dcx_env(home: Path, tree: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "DCX_HOME": str(home), "DCX_NO_SSH_CONFIG": "1"}
    if tree is not None:  # ahead of the editable install on sys.path
        env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def dcx(env: dict[str, str], *args: str, check: bool = True) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Wall time of one dcx process, and what it printed."""
    start = time.perf_counter()
    # cwd: DCX_HOME, not the repository: `python -m` puts the cwd first on sys.path, ahead of PYTHONPATH.
    proc = subprocess.run([sys.executable, "-m", "dcx", *args], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=1800, cwd=env["DCX_HOME"])
    took = time.perf_counter() - start
    if check and proc.returncode != 0:
        raise SystemExit(f"dcx {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return took, proc


def timed_create(home: Path, name: str, spec_text: str) -> float:
    """Wall time of `dcx cluster create` of `spec_text` (cluster `name`), which is destroyed after."""
    env = dcx_env(home)
    path = home / f"{name}.yaml"
    path.write_text(spec_text)
    try:
        return dcx(env, "cluster", "create", "-f", str(path), "-q")[0]
    finally:
        dcx(env, "cluster", "destroy", "-f", str(path), "--yes", "-q", check=False)


def measure(home: Path, nodes: int, subnet: str, tree: Path | None) -> dict[str, float]:
    """create, a no-op re-run, plan (must be empty) and destroy of one cluster of `nodes` nodes."""
    name = f"bench-scale-{nodes}"
    env = dcx_env(home, tree)
    path = home / f"{name}.yaml"
    path.write_text(spec(name, nodes - 1, subnet))
    times: dict[str, float] = {}
    try:
        times["create"] = dcx(env, "cluster", "create", "-f", str(path), "-q")[0]
        times["re-run"] = dcx(env, "cluster", "create", "-f", str(path), "-q")[0]
        times["plan"], proc = dcx(env, "-o", "json", "cluster", "plan", "-f", str(path))
        if not json.loads(proc.stdout)["empty"]:
            raise SystemExit(f"plan of the unchanged {nodes}-node cluster is not empty: {proc.stdout}")
        times["destroy"] = dcx(env, "cluster", "destroy", name, "--yes", "-q")[0]
    finally:
        if "destroy" not in times:
            dcx(env, "cluster", "destroy", "-f", str(path), "--yes", "-q", check=False)
    return times


def report(label: str, rows: dict[int, dict[str, float]], load: tuple[float, float]) -> None:
    first = rows[min(rows)]
    print(f"\n{label}  (load average 1 min: {load[0]:.2f} before, {load[1]:.2f} after; {os.cpu_count()} cores)")
    print(f"{'nodes':>5}" + "".join(f"{c:>11}{'T/T1':>7}" for c in COMMANDS))
    for n, times in sorted(rows.items()):
        print(f"{n:>5}" + "".join(f"{times[c]:>10.2f}s{times[c] / first[c]:>6.2f}x" for c in COMMANDS))


def table(sizes: list[int], tree: Path | None, label: str) -> None:
    before = os.getloadavg()[0]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="dcx-bench-scale-") as tmp:
        for i, n in enumerate(sizes):
            rows[n] = measure(Path(tmp), n, f"10.213.{241 + i}.0/24", tree)
    report(label, rows, (before, os.getloadavg()[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="1,5,10,20", help="comma-separated cluster sizes")
    parser.add_argument("--compare", type=Path, metavar="DIR", help="a directory holding an earlier dcx package")
    args = parser.parse_args()
    sizes = [int(n) for n in args.nodes.split(",")]
    why = missing_for_namespace_nodes()
    if why:
        print(f"skipped: namespace hosts unavailable here: {why}")
        return
    skip_without_namespace_nodes()  # takes this machine's namespace-test lock
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through the destroys
    if args.compare:
        table(sizes, args.compare, f"before: dcx from {args.compare}")
    table(sizes, None, "after: this tree's dcx" if args.compare else "dcx")


if __name__ == "__main__":
    main()
