"""Inventory parsing and host resolution for 1,000 vs 10,000 hosts (and how long refusing a 1,000,000-host
range takes): printed as a ratio, which stays near 10 while the work is linear in the hosts.

Also counts how many times ~/.ssh/config is parsed for the 10,000 hosts (should be 1)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import paramiko

from dcx.errors import SpecError
from dcx.inventory import parse_inventory_text
from dcx.sshconfig import resolve


def inventory(n: int) -> str:
    # Groups, children and vars, so that variable precedence is part of the work.
    return (f"[web]\nnode[1:{n}] ansible_user=ops\n[web:vars]\nansible_port=2222\n"
            "[dc1:children]\nweb\n[dc1:vars]\ndcx_mesh_endpoint=203.0.113.1:51820\n")


def seconds(n: int) -> float:
    start = time.perf_counter()
    for h in parse_inventory_text(inventory(n), "bench.ini", "web"):
        resolve(h.name, host=h.address, port=h.port, user=h.user)
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        config = Path(d) / "config"
        config.write_text("Host node1*\n  User someone\nHost *\n  ServerAliveInterval 30\n")
        os.environ["DCX_SSH_CONFIG"] = str(config)
        parses = 0
        original = paramiko.SSHConfig.from_path

        def counting(path: str) -> paramiko.SSHConfig:
            nonlocal parses
            parses += 1
            return original(path)

        paramiko.SSHConfig.from_path = counting  # type: ignore[method-assign]
        seconds(100)  # warm up imports and caches
        small, large = seconds(1_000), seconds(10_000)
        start = time.perf_counter()
        try:
            parse_inventory_text("[all]\nnode[1:1000000]\n", "bench.ini")
        except SpecError:
            pass
        refused = time.perf_counter() - start
    print(f"1,000 hosts: {small:.3f} s; 10,000 hosts: {large:.3f} s; ratio {large / small:.1f} (10 = linear)")
    print(f"~/.ssh/config parsed {parses} time(s) for 11,100 host resolutions")
    print(f"a 1,000,000-host range refused in {refused * 1000:.2f} ms")


if __name__ == "__main__":
    main()
