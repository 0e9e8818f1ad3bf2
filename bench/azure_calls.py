"""ARM requests and wall time of `dcx cluster create --provision-only` and `destroy` for azure pools of
1, 10 and 50 nodes, counted at the local ARM fake (tests/fakes/arm.py, over TLS, real azure-identity and
azure-mgmt clients, polling interval 0). ARM has no bulk VM create (outside scale sets): the calls grow
with the node count (PIP, NIC, VM, disk tag: one PUT/PATCH each, plus their polls), so what matters is
the per-node cost and that a pool's operations overlap: the "in flight" column is the most VM
creations the fake saw under way at once. Needs no root: `.venv/bin/python bench/azure_calls.py`."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fakes.arm import ArmFake, make_test_pki  # noqa: E402

SUB = "7d3c0a51-52b6-4c1e-9d0e-2f1a0b6c9e11"
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT = "5f1c2d3e-4a5b-4c6d-8e7f-0a1b2c3d4e5f"


def spec(name: str, count: int) -> str:
    azure = "{location: westeurope, vnetCIDR: 10.214.48.0/20, subnetCIDR: 10.214.48.0/22}"
    return (f"apiVersion: dcx/v1\nkind: Cluster\nmetadata: {{name: {name}}}\nspec:\n"
            f"  network: {{sshCIDR: 198.51.100.7/32}}\n  pools:\n"
            f"    - {{name: nodes, role: control, count: {count}, provider: azure, azure: {azure}}}\n")


def kind(method: str, path: str) -> str:
    if path.startswith("/fake/"):
        return "poll"
    if "/oauth2/" in path or "/.well-known/" in path:
        return "auth"
    parts = [p for p in path.split("/") if p]
    if "providers" in parts:
        rtype = parts[parts.index("providers") + 2]
        return f"{method} {rtype}{'' if len(parts) > parts.index('providers') + 3 else ' (list)'}"
    return f"{method} resourceGroup{'' if len(parts) > 3 else 's (list)'}"


def in_flight(events: list[tuple[str, str]]) -> int:
    """The most VM creations under way at once (PUT seen, not yet done)."""
    most = now = 0
    for what, _ in events:
        now += 1 if what == "vm-put" else -1 if what == "vm-created" else 0
        most = max(most, now)
    return most


def run(fake: ArmFake, env: dict[str, str], home: Path, name: str, count: int) -> dict[str, object]:
    path = home / f"{name}.yaml"
    path.write_text(spec(name, count))
    dcx = [sys.executable, "-m", "dcx"]
    fake.reset_counts()
    start = time.perf_counter()
    subprocess.run([*dcx, "cluster", "create", "-f", str(path), "--provision-only", "-q"], env=env, check=True,
                   stdin=subprocess.DEVNULL)
    create_s = time.perf_counter() - start
    with fake.lock:
        create_calls = len(fake.requests)
        kinds = Counter(kind(m, p) for m, p in fake.requests)
        flight = in_flight(fake.events)
    fake.reset_counts()
    start = time.perf_counter()
    subprocess.run([*dcx, "cluster", "destroy", name, "--yes", "-q"], env=env, check=True, stdin=subprocess.DEVNULL)
    destroy_s = time.perf_counter() - start
    with fake.lock:
        destroy_calls = len(fake.requests)
    if fake.inventory():
        raise SystemExit(f"destroy left resources behind: {fake.inventory()}")
    return {"count": count, "create_calls": create_calls, "create_s": create_s, "kinds": kinds,
            "in_flight": flight, "destroy_calls": destroy_calls, "destroy_s": destroy_s}


def main() -> None:
    secret = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="dcx-bench-") as tmp:
        home = Path(tmp)
        with ArmFake(make_test_pki(home / "pki"), (SUB,), TENANT, CLIENT, secret) as fake:
            env = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_")}
            env.update(DCX_HOME=str(home / "dcx"), DCX_NO_SSH_CONFIG="1", AZURE_AUTHORITY_HOST=fake.url,
                       AZURE_TENANT_ID=TENANT, AZURE_CLIENT_ID=CLIENT, AZURE_CLIENT_SECRET=secret,
                       AZURE_SUBSCRIPTION_ID=SUB, DCX_AZURE_ENDPOINT=fake.url, DCX_AZURE_CA_BUNDLE=str(fake.ca_file),
                       DCX_AZURE_POLL_INTERVAL="0", HOME=str(home))
            rows = [run(fake, env, home, f"bench-{n}", n) for n in (1, 10, 50)]
    print(f"{'nodes':>5} {'create calls':>12} {'per node':>8} {'create s':>8} {'in flight':>9} "
          f"{'destroy calls':>13} {'destroy s':>9}")
    base = rows[0]
    for r in rows:
        extra = (r["create_calls"] - base["create_calls"]) / max(1, r["count"] - 1) if r is not base else 0
        print(f"{r['count']:>5} {r['create_calls']:>12} {extra:>8.1f} {r['create_s']:>8.2f} {r['in_flight']:>9} "
              f"{r['destroy_calls']:>13} {r['destroy_s']:>9.2f}")
    print("create, 1 node:  " + ", ".join(f"{k} {v}" for k, v in sorted(base["kinds"].items())))
    print("create, 50 nodes: " + ", ".join(f"{k} {v}" for k, v in sorted(rows[-1]["kinds"].items())))
    print(f"wall time 50 nodes / 1 node: create {rows[-1]['create_s'] / base['create_s']:.2f}x, "
          f"destroy {rows[-1]['destroy_s'] / base['destroy_s']:.2f}x")


if __name__ == "__main__":
    main()
