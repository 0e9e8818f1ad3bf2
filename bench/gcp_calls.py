"""Compute API calls of `dcx cluster create --provision-only` for a 1-node vs a 100-node gcp pool,
counted at the local Compute REST fake (tests/fakes/gce.py). Prints both counts, the difference
(the goal: at most +5) and, for information, what destroy costs (one delete per instance: the API
has no bulk delete). Needs no root; run from the repository: `.venv/bin/python bench/gcp_calls.py`."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fakes.gce import GceFake  # noqa: E402


def spec(name: str, count: int) -> str:
    gcp = "{project: dcx-bench, zone: us-central1-a, subnetCIDR: 10.214.36.0/23}"
    return (f"apiVersion: dcx/v1\nkind: Cluster\nmetadata: {{name: {name}}}\nspec:\n"
            f"  network: {{sshCIDR: 198.51.100.7/32}}\n  pools:\n"
            f"    - {{name: nodes, role: control, count: {count}, provider: gcp, gcp: {gcp}}}\n")


def kind(method: str, path: str) -> str:
    tail = path.split("/projects/", 1)[-1].split("/")
    if "operations" in tail:
        return "operation wait"
    resource = next((t for t in reversed(tail) if t in ("instances", "bulkInsert", "firewalls", "networks",
                                                         "subnetworks", "start")), tail[-1])
    return f"{method} {resource}"


def run(fake: GceFake, home: Path, name: str, count: int) -> tuple[int, int, Counter[str]]:
    env = {**os.environ, "DCX_HOME": str(home), "DCX_NO_SSH_CONFIG": "1", "DCX_GCP_ENDPOINT": fake.url,
           "GOOGLE_APPLICATION_CREDENTIALS": str(home / "sa.json"), "NO_GCE_CHECK": "True"}
    path = home / f"{name}.yaml"
    path.write_text(spec(name, count))
    dcx = [sys.executable, "-m", "dcx"]
    fake.reset_counts()
    subprocess.run([*dcx, "cluster", "create", "-f", str(path), "--provision-only", "-q"], env=env, check=True,
                   stdin=subprocess.DEVNULL)
    with fake.lock:
        created = len(fake.requests)
        kinds = Counter(kind(m, p) for m, p in fake.requests)
    fake.reset_counts()
    subprocess.run([*dcx, "cluster", "destroy", "-f", str(path), "--yes", "-q"], env=env, check=True,
                   stdin=subprocess.DEVNULL)
    with fake.lock:
        destroyed = len(fake.requests)
    left = [r for r in fake.all_resources().values() if r]
    if left:
        raise SystemExit(f"destroy left resources behind: {fake.all_resources()}")
    return created, destroyed, kinds


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="dcx-bench-") as tmp, GceFake(projects=("dcx-bench",)) as fake:
        home = Path(tmp)
        fake.credentials_file(home / "sa.json", project="dcx-bench")
        one = run(fake, home, "bench-one", 1)
        hundred = run(fake, home, "bench-hundred", 100)
    print(f"create, 1 node:    {one[0]} API calls  ({', '.join(f'{k} {v}' for k, v in sorted(one[2].items()))})")
    print(f"create, 100 nodes: {hundred[0]} API calls  "
          f"({', '.join(f'{k} {v}' for k, v in sorted(hundred[2].items()))})")
    print(f"difference: {hundred[0] - one[0]:+d} (goal: <= +5)")
    print(f"destroy, 1 node: {one[1]} API calls; 100 nodes: {hundred[1]} (one delete + one wait per instance)")


if __name__ == "__main__":
    main()
