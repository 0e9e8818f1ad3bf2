"""`dcx --help` wall time, and whether any cloud SDK was imported for it (printed, not asserted).

Compares with a bare `python -c pass` in the same run, so the number reads as a ratio."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

CLOUD = ("boto3", "botocore", "google.cloud", "azure", "kubernetes")
RUNS = 10


def wall(argv: list[str]) -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    bare = wall([sys.executable, "-c", "pass"])
    helped = wall([sys.executable, "-m", "dcx", "--help"])
    probe = ("import sys; sys.argv=['dcx','--help']\nfrom dcx.cli.main import main\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\nprint(' '.join(sys.modules))")
    mods = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    leaked = sorted({m.split(".")[0] for m in mods if m.startswith(CLOUD)})
    print(f"python -c pass     median {bare * 1000:7.1f} ms")
    print(f"dcx --help         median {helped * 1000:7.1f} ms   ({helped / bare:.1f}x bare python)")
    print(f"cloud SDKs imported by --help: {', '.join(leaked) if leaked else 'none'}")


if __name__ == "__main__":
    main()
