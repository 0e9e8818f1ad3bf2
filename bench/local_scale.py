"""Create wall time for 1 vs 8 local namespace nodes, as a ratio (printed, not asserted).

Needs root and the packages scripts/setup installs. Each cluster is destroyed after it is timed."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def spec(name: str, workers: int, subnet: str) -> str:
    local = f"provider: local, local: {{subnet: {subnet}}}"
    text = (f"apiVersion: dcx/v1\nkind: Cluster\nmetadata: {{name: {name}}}\nspec:\n  pools:\n"
            f"    - {{name: control, role: control, count: 1, {local}}}\n")
    if workers:
        text += f"    - {{name: workers, role: worker, count: {workers}, {local}}}\n"
    return text


def timed_create(home: Path, name: str, spec_text: str) -> float:
    """Wall time of `dcx cluster create` of `spec_text` (cluster `name`), which is destroyed after."""
    env = {**os.environ, "DCX_HOME": str(home), "DCX_NO_SSH_CONFIG": "1"}
    path = home / f"{name}.yaml"
    path.write_text(spec_text)
    dcx = [sys.executable, "-m", "dcx"]
    start = time.perf_counter()
    try:
        subprocess.run([*dcx, "cluster", "create", "-f", str(path), "-q"], env=env, check=True,
                       stdin=subprocess.DEVNULL)
        return time.perf_counter() - start
    finally:
        subprocess.run([*dcx, "cluster", "destroy", "-f", str(path), "--yes", "-q"], env=env, check=False,
                       stdin=subprocess.DEVNULL)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="dcx-bench-") as tmp:
        home = Path(tmp)
        one = timed_create(home, "bench-one", spec("bench-one", 0, "10.213.241.0/24"))
        eight = timed_create(home, "bench-eight", spec("bench-eight", 7, "10.213.242.0/24"))
    print(f"create, 1 node : {one:6.2f} s")
    print(f"create, 8 nodes: {eight:6.2f} s   ({eight / one:.2f}x the 1-node time for 8x the nodes)")


if __name__ == "__main__":
    main()
