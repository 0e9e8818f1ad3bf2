"""The redirect a joining control node needs while the restored manager's raft address is stale: run for real
in a scratch network namespace (iptables and ip as on a node), then removed without touching other rules."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from dcx.bootstrap import swarm_address

pytestmark = pytest.mark.skipif(not shutil.which("iptables") or not shutil.which("ip"),
                                reason="needs iptables and ip (scripts/setup installs them)")


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"dcxut-{uuid.uuid4().hex[:8]}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot make a network namespace here: {r.stderr.strip()}")
    try:
        inside(name, "ip link add d0 type veth peer name d1 && ip addr add 10.9.0.2/24 dev d0 && "
                     "ip link set d1 up && ip link set d0 up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def inside(ns: str, script: str) -> str:
    r = subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_redirect_is_idempotent_and_removed_with_its_route_only(netns: str) -> None:
    inside(netns, "iptables -t nat -A OUTPUT -d 10.9.9.9/32 -j ACCEPT")  # somebody else's rule
    for _ in range(2):
        inside(netns, swarm_address.redirect_command("192.0.2.7", "10.9.0.5"))
    rules = inside(netns, "iptables -t nat -S OUTPUT")
    assert rules.count("dcx raft redirect") == 1, rules
    assert "--to-destination 10.9.0.5:2377" in rules and "-d 192.0.2.7/32" in rules
    # connect() reaches the DNAT: the old address has a route, through the device that reaches the manager.
    assert "dev d0" in inside(netns, "ip route get 192.0.2.7")
    inside(netns, swarm_address.unredirect_command("192.0.2.7"))
    rules = inside(netns, "iptables -t nat -S OUTPUT")
    assert "dcx raft redirect" not in rules and "-d 10.9.9.9/32" in rules
    assert "192.0.2.7" not in inside(netns, "ip route show")
    inside(netns, swarm_address.unredirect_command("192.0.2.7"))  # again: nothing to do, no error

