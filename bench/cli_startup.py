"""`dcx --help` and `dcx version` wall times (medians), and whether any cloud SDK was imported for
`--help` (printed, not asserted). Target: at most 0.25 s each.

Compares with a bare `python -c pass` in the same run, so the numbers read as ratios.

    .venv/bin/python bench/cli_startup.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

CLOUD = ("boto3", "botocore", "google.cloud", "azure", "kubernetes")
RUNS = 10
TARGET = 0.25  # seconds, from issue 15


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
    versioned = wall([sys.executable, "-m", "dcx", "version"])
    probe = ("import sys; sys.argv=['dcx','--help']\nfrom dcx.cli.main import main\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\nprint(' '.join(sys.modules))")
    mods = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    leaked = sorted({m.split(".")[0] for m in mods if m.startswith(CLOUD)})
    print(f"python -c pass     median {bare * 1000:7.1f} ms")
    for label, took in (("dcx --help", helped), ("dcx version", versioned)):
        met = "met" if took <= TARGET else "NOT met"
        print(f"{label:18} median {took * 1000:7.1f} ms   ({took / bare:.1f}x bare python; target "
              f"{TARGET * 1000:.0f} ms {met})")
    print(f"cloud SDKs imported by --help: {', '.join(leaked) if leaked else 'none'}")


if __name__ == "__main__":
    main()
