"""Boot simulation for cloud-provider tests: when a fake (or moto) reports a new instance, start a
real namespace host at the instance's private address with the instance's SSH key, so that dcx
can go from provisioning through bootstrap to a real cluster. `halt` stops it when the instance is
deleted. Everything is torn down by `close()` (use it as a context manager)."""

from __future__ import annotations

import ipaddress
import re
import shutil
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

from dcx import netns


def authorized_key_from_user_data(user_data: str) -> str:
    """The first ssh key in cloud-init user-data (dcx's template puts the cluster key there)."""
    match = re.search(r"(ssh-(?:ed25519|rsa)|ecdsa-sha2-nistp\d+) [A-Za-z0-9+/=]+", user_data)
    if not match:
        raise ValueError("no ssh key in user-data")
    return match.group(0)


class BootSimulator:
    """Machines for a network (e.g. a VPC subnet) on one bridge; .1 is the bridge's own address."""

    def __init__(self, subnet: str, tag: str = "boot") -> None:
        self.subnet = ipaddress.ip_network(subnet)
        self.bridge = netns.bridge_name(f"test-{tag}-{subnet}")
        self.workdir = Path(tempfile.mkdtemp(prefix=f"dcx-{tag}-"))
        self.hosts: dict[str, str] = {}  # instance id -> netns
        self._lock = threading.Lock()
        self.booted: list[str] = []
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"boot-{tag}")
        self._booting: list[Future[None]] = []
        netns.ensure_bridge(self.bridge, f"{next(self.subnet.hosts())}/{self.subnet.prefixlen}")

    def boot(self, instance_id: str, ip: str, authorized_key: str, hostname: str, login_user: str = "root") -> None:
        """Start a machine; `login_user` other than root gets passwordless sudo, as cloud images do."""
        ns = f"dcxtest-{netns.short_hash(instance_id, n=10)}"
        with self._lock:
            if instance_id in self.hosts:
                return
            self.hosts[instance_id] = ns
        netns.start_host(netns.HostSpec(
            netns=ns, hostname=hostname, address=f"{ip}/{self.subnet.prefixlen}", bridge=self.bridge,
            home=self.workdir / ns, authorized_key=authorized_key,
            users=[] if login_user == "root" else [netns.LoginUser(login_user)]))
        self.booted.append(instance_id)

    def boot_in_background(self, instance_id: str, ip: str, authorized_key: str, hostname: str,
                           login_user: str = "root") -> None:
        """`boot`, without holding up the caller: the cloud API answers before the machine is up, as
        in life (dcx's Connect phase waits for its SSH)."""
        future = self._pool.submit(self.boot, instance_id, ip, authorized_key, hostname, login_user)
        with self._lock:
            self._booting.append(future)

    def wait_for_boots(self, timeout: float = 120) -> None:
        """Wait for every background boot; one that failed raises its own error."""
        with self._lock:
            booting = list(self._booting)
        for future in booting:
            future.result(timeout=timeout)

    def halt(self, instance_id: str) -> None:
        with self._lock:
            ns = self.hosts.pop(instance_id, None)
        if ns:
            netns.stop_host(ns, self.workdir / ns)

    def close(self) -> None:
        self._pool.shutdown(wait=True)  # a boot under way finishes, so that it is halted below
        for instance_id in list(self.hosts):
            self.halt(instance_id)
        netns.delete_bridge(self.bridge)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> BootSimulator:
        return self

    def assert_ready_swarm(self, dcx: Any, cluster: str, address_prefix: str) -> dict[str, Any]:
        """After `create` on these machines: healthy, control-1 and workers-1..2 Ready at addresses of
        the subnet, one machine each, logged in as ubuntu (cloud images' user). Returns the status."""
        status = dcx.json("cluster", "status", cluster)
        assert status["healthy"] is True
        assert sorted(n["name"] for n in status["nodes"]) == [f"{cluster}-control-1", f"{cluster}-workers-1",
                                                              f"{cluster}-workers-2"]
        assert all(n["ready"] for n in status["nodes"])
        assert all(n["address"].startswith(address_prefix) for n in status["nodes"])
        assert len(self.hosts) == 3
        assert {n["ssh_user"] for n in dcx.state(cluster)["nodes"].values()} == {"ubuntu"}
        return status

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
