"""A test lab of namespace hosts: bridges (networks), plain SSH hosts, routers with NAT and port
forwards, bastions. Used for bare-metal (ssh provider) and hybrid-mesh tests. Every bridge and host
it makes is torn down by `close()`, by the names it recorded, even when a test fails.

Only private test ranges on bridges made here are used; nothing leaves this machine.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from dcx import netns
from dcx.netns import LoginUser


class Lab:
    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.dir = Path(tempfile.mkdtemp(prefix=f"dcx-lab-{tag}-"))
        self.bridges: dict[str, tuple[str, ipaddress.IPv4Network]] = {}  # logical name -> (bridge, net)
        self.hosts: dict[str, str] = {}  # logical name -> netns
        self.specs: dict[str, netns.HostSpec] = {}
        self.key, self.public_key = self._operator_key()

    def _operator_key(self) -> tuple[Path, str]:
        key = self.dir / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dcx-lab-operator", "-f", str(key)],
                       check=True)
        return key, (self.dir / "id_ed25519.pub").read_text().strip()

    def network(self, name: str, cidr: str, operator_ip: str | None = None) -> str:
        """A bridge. With operator_ip, this machine (the operator) has that address on it."""
        bridge = netns.bridge_name(f"lab-{self.tag}-{name}")
        net = ipaddress.ip_network(cidr)
        netns.ensure_bridge(bridge, f"{operator_ip}/{net.prefixlen}" if operator_ip else None)
        self.bridges[name] = (bridge, net)
        return bridge

    def _cidr(self, network: str, ip: str) -> tuple[str, str]:
        bridge, net = self.bridges[network]
        return bridge, f"{ip}/{net.prefixlen}"

    def host(self, name: str, network: str, ip: str, *, gateway: str | None = None,
             users: list[LoginUser] | None = None, extra: list[tuple[str, str]] | None = None,
             forward: bool = False, keys: list[str] | None = None,
             sshd: netns.SshdLimits = netns.DEFAULT_SSHD) -> str:
        """A plain SSH host; it accepts the lab's operator key, or only `keys` when given. Its sshd keeps
        OpenSSH's limits, or `sshd=netns.HARDENED_SSHD` (MaxSessions 1, MaxStartups 3:50:6)."""
        ns = f"dcxlab-{netns.short_hash(self.tag, name, n=10)}"
        bridge, cidr = self._cidr(network, ip)
        links = [self._cidr(net, addr) for net, addr in (extra or [])]
        self.hosts[name] = ns
        self.specs[name] = netns.HostSpec(
            netns=ns, hostname=name, address=cidr, bridge=bridge, home=self.dir / ns,
            authorized_key="\n".join(keys or [self.public_key]), gateway=gateway, users=users or [], extra_links=links,
            sshd=sshd)
        netns.start_host(self.specs[name])
        if forward:
            self.exec(name, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        return ns

    def exec(self, host: str, *argv: str) -> str:
        """A command inside a host's network namespace (iptables, sysctl, ip): not through SSH."""
        r = subprocess.run(["ip", "netns", "exec", self.hosts[host], *argv], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{host}: {' '.join(argv)}: {r.stderr.strip()}")
        return r.stdout

    def router(self, name: str, public: tuple[str, str], inside: tuple[str, str],
               forwards: list[tuple[str, int, str, int]] = (), gateway: str | None = None) -> None:
        """A site router: its public side is its primary address (its sshd listens there, so it can be
        a bastion), NAT for the inside network, and port forwards (proto, public port, inside ip, port).
        With `gateway` (the router of an outer NAT), it is the inner router of a double NAT."""
        self.host(name, public[0], public[1], extra=[inside], forward=True, gateway=gateway)
        out_if = "eth0"
        self.exec(name, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", out_if, "-j", "MASQUERADE")
        for proto, port, ip, to_port in forwards:
            self.exec(name, "iptables", "-t", "nat", "-A", "PREROUTING", "-i", out_if, "-p", proto, "--dport",
                      str(port), "-j", "DNAT", "--to-destination", f"{ip}:{to_port}")

    def inside(self, host: str, command: str) -> subprocess.CompletedProcess[str]:
        """Run a shell command in the host's own world (its mount and network namespaces), not over SSH."""
        pid = self.sshd_pid(host)
        assert pid, f"{host} has no sshd"
        return subprocess.run(["nsenter", "-t", str(pid), "-m", "-n", "-u", "sh", "-c", command],
                              capture_output=True, text=True, timeout=60)

    def sshd_pid(self, host: str) -> int | None:
        return netns.sshd_pid(self.hosts[host])

    def rekey(self, host: str) -> None:
        """The machine is reinstalled at the same address and rebooted: every process ends, and it comes
        back with a new host key (its disk, and so docker's state, is kept)."""
        netns.kill_host_processes(self.hosts[host])
        for key in (self.specs[host].home / "sshd").glob("ssh_host_*"):
            key.unlink()
        netns.start_host(self.specs[host])

    def power_off(self, host: str) -> None:
        """The machine stops: every process ends (sshd, dockerd, wireguard-go) and its link goes down, so
        that nothing answers at its address (connections time out, as to a machine switched off)."""
        netns.kill_host_processes(self.hosts[host])
        self.exec(host, "ip", "link", "set", "eth0", "down")

    def close(self) -> None:
        for ns in self.hosts.values():
            netns.stop_host(ns, self.dir / ns)
        self.hosts.clear()
        for bridge, _ in self.bridges.values():
            netns.delete_bridge(bridge)
        self.bridges.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
