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
from pathlib import Path
from types import TracebackType

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

    def halt(self, instance_id: str) -> None:
        with self._lock:
            ns = self.hosts.pop(instance_id, None)
        if ns:
            netns.stop_host(ns, self.workdir / ns)

    def close(self) -> None:
        for instance_id in list(self.hosts):
            self.halt(instance_id)
        netns.delete_bridge(self.bridge)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> BootSimulator:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
