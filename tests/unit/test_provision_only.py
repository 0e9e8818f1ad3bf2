"""`create --provision-only` with fewer nodes than before: the nodes the spec dropped are kept until the full
create, and the run says so (issue 18). An ssh pool provisions without connecting: it only records hosts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def spec_text(hosts: list[str]) -> str:
    listed = ", ".join(f"{{name: {h}, address: 192.0.2.{i + 10}}}" for i, h in enumerate(hosts))
    return ("apiVersion: dcx/v1\nkind: Cluster\nmetadata: {name: po}\nspec:\n  pools:\n"
            f"    - {{name: control, role: control, provider: ssh, ssh: {{hosts: [{listed}]}}}}\n")


def create(spec: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DCX_HOME": str(home), "DCX_NO_SSH_CONFIG": "1", "HOME": str(home), "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "dcx", "cluster", "create", "-f", str(spec), "--provision-only"],
                          capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60)


def test_provision_only_names_the_nodes_it_leaves_for_the_full_create(tmp_path: Path) -> None:
    spec = tmp_path / "cluster.yaml"
    spec.write_text(spec_text(["m1", "m2", "m3"]))
    first = create(spec, tmp_path / "home")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "no longer has" not in first.stdout + first.stderr
    spec.write_text(spec_text(["m1"]))
    second = create(spec, tmp_path / "home")
    assert second.returncode == 0, second.stdout + second.stderr
    lines = [line for line in (second.stdout + second.stderr).splitlines() if "no longer has" in line]
    assert len(lines) == 1, second.stdout + second.stderr
    assert "m2, m3" in lines[0] and f"dcx cluster create -f {spec}" in lines[0] and "removes them" in lines[0]
