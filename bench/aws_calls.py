"""AWS API calls of the aws provider for a 1-node and a 100-node pool, counted with botocore's event
hooks ('before-call' on the client's meta.events) against moto in server mode on 127.0.0.1.

Each size runs on a fresh moto: create (network, group, key, image, instances), then a re-run
(look-up only), list, and destroy (delete + sweep). Budget: a 100-node pool costs at most the calls
of a 1-node pool + 5 (batching; describe by filter, never per instance).

    .venv/bin/python bench/aws_calls.py [--sizes 1,100,1000]
"""

from __future__ import annotations

import argparse
import http.client
import logging
import os
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REGION = "us-east-1"
BUDGET = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reset(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/moto-api/reset")
    conn.getresponse().read()
    conn.close()


def measure(count: int, port: int) -> dict[str, Any]:
    from dcx.providers.aws import AwsProvider
    from dcx.providers.base import NodeRequest
    from dcx.spec import NetworkSpec, PoolSpec
    from tests.testbed.journal import MemoryJournal

    reset(port)
    ctx = MemoryJournal().context(
        "bench", f"b{count}", Path(tempfile.gettempdir()),
        ssh_public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOcdh2t7rhcgXhlhzR5JfRL7sG5BKjXbjRtq2R4jTXvn bench",
        ssh_private_key_path=Path("/nonexistent"), log=logging.getLogger("bench"),
        network=NetworkSpec(sshCIDR="192.0.2.1/32"), ssh_user="ubuntu")
    pool = PoolSpec(name="workers", role="worker", count=count, provider="aws", aws={
        "region": REGION, "vpcCIDR": "10.214.16.0/20", "subnetCIDR": "10.214.20.0/22", "sshAddress": "private",
        "publicIP": False})
    requests = [NodeRequest(f"bench-workers-{i}", "workers", "worker", i) for i in range(1, count + 1)]
    out: dict[str, Any] = {}

    def run(step: str, fn: Any) -> Any:
        provider = AwsProvider(ctx)  # a fresh provider per step, as a new dcx run would have
        calls: Counter[str] = Counter()
        provider.api.ec2(REGION).meta.events.register("before-call.ec2", lambda model, **_: calls.update([model.name]))
        start = time.perf_counter()
        result = fn(provider)
        out[step] = {"calls": sum(calls.values()), "by_operation": dict(calls), "seconds": time.perf_counter() - start}
        return result

    nodes = run("create", lambda p: p.create_nodes(pool, requests))
    assert len(nodes) == count
    run("rerun", lambda p: p.create_nodes(pool, requests))
    run("list", lambda p: p.list_nodes([pool]))
    run("destroy", lambda p: (p.delete_nodes([pool], nodes), p.sweep([pool])))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,100", help="pool sizes, comma separated (first is the baseline)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION=REGION, AWS_EC2_METADATA_DISABLED="true")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        results = {n: measure(n, port) for n in sizes}
    finally:
        server.stop()

    steps = ["create", "rerun", "list", "destroy"]
    print(f"{'nodes':>6} " + " ".join(f"{s + ' calls':>14}" for s in steps) + f" {'create s':>9}")
    for n, r in results.items():
        print(f"{n:>6} " + " ".join(f"{r[s]['calls']:>14}" for s in steps) + f" {r['create']['seconds']:>9.2f}")
    base = results[sizes[0]]
    ok = True
    for n in sizes[1:]:
        for step in steps:
            extra = results[n][step]["calls"] - base[step]["calls"]
            over = extra > BUDGET
            ok &= not over
            print(f"{step} {n} nodes vs {sizes[0]}: {extra:+d} calls (budget +{BUDGET}){'  OVER' if over else ''}")
    print("create calls by operation:", ", ".join(f"{k} {v}" for k, v in sorted(
        results[sizes[-1]]["create"]["by_operation"].items())))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
