"""12-node create wall time on local nodes whose sshd is hardened (MaxSessions 1, MaxStartups 3:50:6)
vs OpenSSH's defaults (MaxSessions 10, MaxStartups 10:30:100), as a ratio (printed, not asserted).

Needs root and the packages scripts/setup installs. Each cluster is destroyed after it is timed; with
--rounds N the two kinds alternate N times and the medians are compared.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from local_scale import timed_create  # bench/ is on sys.path when a bench runs

NODES = 12


def spec(name: str, sshd: str, subnet: str) -> str:
    local = f"provider: local, local: {{subnet: {subnet}, sshd: {sshd}}}"
    return (f"apiVersion: dcx/v1\nkind: Cluster\nmetadata: {{name: {name}}}\nspec:\n  pools:\n"
            f"    - {{name: control, role: control, count: 1, {local}}}\n"
            f"    - {{name: workers, role: worker, count: {NODES - 1}, {local}}}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    rounds = parser.parse_args().rounds
    times: dict[str, list[float]] = {"default": [], "hardened": []}
    with tempfile.TemporaryDirectory(prefix="dcx-bench-") as tmp:
        for i in range(rounds):
            for sshd, subnet in (("default", "10.213.243.0/24"), ("hardened", "10.213.244.0/24")):
                name = f"bench-{sshd}-{i}"
                times[sshd].append(timed_create(Path(tmp), name, spec(name, sshd, subnet)))
    default, hardened = statistics.median(times["default"]), statistics.median(times["hardened"])
    print(f"create, {NODES} nodes, sshd defaults (MaxSessions 10)  : {default:6.2f} s")
    print(f"create, {NODES} nodes, sshd hardened (MaxSessions 1)   : {hardened:6.2f} s   "
          f"({hardened / default:.2f}x the defaults' time; median of {rounds})")


if __name__ == "__main__":
    main()
