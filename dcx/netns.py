"""Namespace hosts on this machine: the machinery behind the `local` provider and the test beds.

A namespace host is a network namespace (own addresses, routes, iptables) with its own mount and UTS
namespace (hostname), a private tmpfs /run, private /var/lib/docker, /etc/docker and /root (bind
mounts of per-host directories), and its own sshd. Everything a login session starts (dockerd,
containerd, wireguard-go) inherits that world.

Teardown finds a host's processes by network namespace and by parentage (containers live in their
own namespaces but descend from a shim that lives in the host's), so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dcx.errors import OperationFailed
from dcx.log import log

NETNS_DIR = Path("/run/netns")
SSHD = "/usr/sbin/sshd"
# Copy-on-write views of this machine's directories: what a host writes there (configs, keys, tools
# it installs) stays its own, like on a separate machine.
OVERLAID = ("/etc", "/usr/local", "/var/lib", "/var/log", "/opt")


def sh(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a local command (argv, never a shell string)."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, input=input, check=False)
    if check and proc.returncode != 0:
        raise OperationFailed(f"{' '.join(argv)}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def short_hash(*parts: str, n: int = 8) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:n]


def bridge_name(tag: str) -> str:
    return f"dcxb{short_hash(tag, n=10)}"  # interface names are at most 15 characters


def veth_name(netns: str) -> str:
    return f"dcxv{short_hash(netns, n=10)}"


def link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def list_netns() -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir())


def host_ipv4_interfaces() -> list[tuple[str, ipaddress.IPv4Interface]]:
    """(link, address/prefix) for every IPv4 address on this machine's own interfaces."""
    out = []
    for line in sh("ip", "-o", "-4", "addr", "show", check=False).stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            out.append((parts[1], ipaddress.IPv4Interface(parts[parts.index("inet") + 1])))
    return out


def ensure_bridge(name: str, gateway_cidr: str | None) -> None:
    """A Linux bridge on this machine (idempotent), with the gateway address when given."""
    if not link_exists(name):
        sh("ip", "link", "add", name, "type", "bridge")
    if gateway_cidr:
        have = sh("ip", "-o", "addr", "show", "dev", name).stdout
        if f" {gateway_cidr} " not in have:
            sh("ip", "addr", "add", gateway_cidr, "dev", name, check=False)
    sh("ip", "link", "set", name, "up")
    # Bridged traffic may traverse iptables (br_netfilter, loaded by any dockerd): let the bridge's
    # own ports talk to each other whatever the FORWARD policy is.
    if shutil.which("iptables"):
        rule = ["FORWARD", "-i", name, "-o", name, "-j", "ACCEPT"]
        if sh("iptables", "-C", *rule, check=False).returncode != 0:
            sh("iptables", "-I", *rule, check=False)


def delete_bridge(name: str) -> None:
    if shutil.which("iptables"):
        rule = ["FORWARD", "-i", name, "-o", name, "-j", "ACCEPT"]
        while sh("iptables", "-C", *rule, check=False).returncode == 0:
            sh("iptables", "-D", *rule, check=False)
    if link_exists(name):
        sh("ip", "link", "del", name, check=False)


def bridge_ports(name: str) -> list[str]:
    path = Path(f"/sys/class/net/{name}/brif")
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


@dataclass
class LoginUser:
    """A non-root account on a test-bed host (private /etc/passwd, shadow, group, sudoers.d)."""

    name: str
    sudo: str = "nopasswd"  # nopasswd | password | none
    password: str = ""  # for sudo: password


@dataclass(frozen=True)
class SshdLimits:
    """sshd's per-connection session limit and its limit on connections not yet logged in.

    Hosts made here keep OpenSSH's defaults (sshd_config(5): MaxSessions 10, MaxStartups 10:30:100)
    or harden them (HARDENED_SSHD, a common baseline), never relax them: dcx must work within what
    users' machines allow, and a generous test host would hide it when it does not.
    """

    max_sessions: int = 10
    max_startups: tuple[int, int, int] = (10, 30, 100)  # start:rate:full

    def lines(self) -> str:
        start, rate, full = self.max_startups
        return f"MaxSessions {int(self.max_sessions)}\nMaxStartups {int(start)}:{int(rate)}:{int(full)}\n"


DEFAULT_SSHD = SshdLimits()
HARDENED_SSHD = SshdLimits(max_sessions=1, max_startups=(3, 50, 6))


@dataclass
class HostSpec:
    """One namespace host to make."""

    netns: str
    hostname: str
    address: str  # CIDR, e.g. 10.213.0.2/24
    bridge: str
    home: Path  # per-host directory on this machine (0700)
    authorized_key: str
    ssh_port: int = 22
    gateway: str | None = None  # default route (test beds with routers); none for plain nodes
    users: list[LoginUser] = field(default_factory=list)  # non-root logins (test beds); root always accepts the key
    extra_links: list[tuple[str, str]] = field(default_factory=list)  # (bridge, CIDR) as eth1, eth2, ...
    sshd: SshdLimits = DEFAULT_SSHD

    @property
    def ip(self) -> str:
        return str(ipaddress.ip_interface(self.address).ip)


def _host_dirs(home: Path) -> dict[str, Path]:
    return {
        "sshd": home / "sshd",
        "docker": home / "var-lib-docker",
        "etc_docker": home / "etc-docker",
        "root": home / "root",
        "log": home / "log",
    }


def _write_sshd(spec: HostSpec, dirs: dict[str, Path]) -> Path:
    sshd_dir = dirs["sshd"]
    key = sshd_dir / "ssh_host_ed25519_key"
    if not key.exists():
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", spec.hostname, "-f", str(key))
    # sshd reads authorized keys as the logging-in user: non-root test users must be able to.
    sshd_dir.chmod(0o755)
    (sshd_dir / "authorized_keys").write_text(spec.authorized_key.strip() + "\n")
    (sshd_dir / "authorized_keys").chmod(0o644)
    # Inside the host, this directory is bind-mounted at /run/dcx-host (its /root is private).
    config = sshd_dir / "sshd_config"
    config.write_text(
        f"Port {spec.ssh_port}\n"
        f"ListenAddress {spec.ip}\n"
        "HostKey /run/dcx-host/ssh_host_ed25519_key\n"
        "PidFile /run/sshd.pid\n"
        "AuthorizedKeysFile /run/dcx-host/authorized_keys .ssh/authorized_keys\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "StrictModes no\n"
        "PrintMotd no\n"
        + spec.sshd.lines()
        + "Subsystem sftp /usr/lib/openssh/sftp-server\n"
    )
    return config


def running_host(spec: HostSpec, pid: int | None) -> int | None:
    """The host's sshd PID when there is nothing to complete: its namespace is there, `pid` (its listening
    sshd, from sshd_pid or sshd_pids) is given, and sshd is reached over the bridge (a re-run's repair)."""
    if pid and netns_exists(spec.netns) and _answers(spec.ip, spec.ssh_port):
        return pid
    return None


_TOOLS_FOUND: list[bool] = []  # once every tool was found, not looked up again in this process


def _missing_tool() -> str | None:
    # Each shutil.which walks PATH: 4 tools per host, 20 hosts cost ~0.1 s under the GIL. A missing tool
    # is looked up again on the next call (it may be installed meanwhile).
    if _TOOLS_FOUND:
        return None
    missing = next((tool for tool in ("ip", "nsenter", "unshare", "ssh-keygen") if not shutil.which(tool)), None)
    if missing is None:
        _TOOLS_FOUND.append(True)
    return missing


def start_host(spec: HostSpec) -> int:
    """Make (or complete) a namespace host and start its sshd. Returns sshd's PID. Idempotent."""
    tool = _missing_tool()
    if tool:
        raise OperationFailed(f"'{tool}' not found on this machine")
    if netns_exists(spec.netns) and _answers(spec.ip, spec.ssh_port):
        pid = sshd_pid(spec.netns)
        if pid:  # its sshd runs and is reached over the bridge: nothing to complete (a re-run's repair)
            return pid
    dirs = _host_dirs(spec.home)
    spec.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not netns_exists(spec.netns):
        sh("ip", "netns", "add", spec.netns)
    veth = veth_name(spec.netns)
    inside = sh("ip", "-n", spec.netns, "-o", "link", "show", "eth0", check=False)
    if inside.returncode != 0:
        if link_exists(veth):
            sh("ip", "link", "del", veth, check=False)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
        sh("ip", "link", "set", f"{veth}p", "netns", spec.netns)
        sh("ip", "-n", spec.netns, "link", "set", f"{veth}p", "name", "eth0")
    if link_exists(veth):
        sh("ip", "link", "set", veth, "master", spec.bridge)
        sh("ip", "link", "set", veth, "up")
    have = sh("ip", "-n", spec.netns, "-o", "addr", "show", "dev", "eth0").stdout
    if f" {spec.address} " not in have:
        sh("ip", "-n", spec.netns, "addr", "add", spec.address, "dev", "eth0")
    sh("ip", "-n", spec.netns, "link", "set", "lo", "up")
    sh("ip", "-n", spec.netns, "link", "set", "eth0", "up")
    for i, (bridge, cidr) in enumerate(spec.extra_links, start=1):
        _add_link(spec.netns, f"eth{i}", bridge, cidr)
    if spec.gateway:
        sh("ip", "-n", spec.netns, "route", "replace", "default", "via", spec.gateway)

    pid = sshd_pid(spec.netns)
    if pid:
        return pid
    _write_sshd(spec, dirs)  # inside the host it is /run/dcx-host/sshd_config
    sshd_argv = [SSHD, "-D", "-f", "/run/dcx-host/sshd_config", "-E", "/run/dcx-host/sshd.log"]
    anchor = node_process(spec.netns, spec.home)
    if anchor is not None:
        # The host still runs (dockerd, wireguard-go...) but its sshd died: a new one starts inside the
        # same mount and UTS namespaces, seeing the host's own /run, /var/lib/docker and hostname, as
        # `systemctl restart ssh` would on a machine. A new mount namespace would be a second machine
        # on the same disk (a second dockerd on the first one's /var/lib/docker).
        return _start_process(spec, dirs, ["nsenter", f"--target={anchor}", "--mount", "--uts", "--net", *sshd_argv])
    if host_processes(spec.netns):
        # Processes in the host's network but not in its own namespaces (the host lost them): stop them
        # all and start the host again from its disk, as after a reboot.
        log.warning("%s: processes outside its own namespaces; restarting it from its disk", spec.netns)
        kill_host_processes(spec.netns)
    steps = [
        "mount -t tmpfs -o mode=0755 tmpfs /run",
        "mkdir -p /run/sshd /run/dcx-host /run/netns /var/lib/docker /etc/docker",
        f"mount --bind {dirs['sshd']} /run/dcx-host",
    ]
    steps += _overlay_mounts(spec.home)
    steps += [
        f"mount --bind {dirs['docker']} /var/lib/docker",  # docker's overlay2 cannot sit on an overlay
        f"mount --bind {dirs['etc_docker']} /etc/docker",
        f"mount --bind {dirs['root']} /root",
    ]
    if spec.users:
        steps += _user_mounts(spec, dirs)
    if any(s.endswith(" /etc") for s in steps):  # a private /etc: name the host there, as cloud-init does
        steps.append(f"{{ grep -q ' {spec.hostname}$' /etc/hosts || echo '127.0.1.1 {spec.hostname}' >> /etc/hosts; }}")
    steps += [f"hostname {spec.hostname}", "exec " + " ".join(sshd_argv)]
    setup = " && ".join(steps)
    return _start_process(spec, dirs, ["nsenter", f"--net={NETNS_DIR / spec.netns}", "unshare", "--mount", "--uts",
                                       "--propagation", "private", "sh", "-c", setup])


MNT_NS_FILE = "mnt-ns"  # in the host's home: the inode of the mount namespace its sshd was started in


def _start_process(spec: HostSpec, dirs: dict[str, Path], argv: list[str]) -> int:
    """Start the host's sshd (argv ends by exec'ing it, so its PID is the child's); wait until it listens;
    record its mount namespace, by which a later repair finds the host's own."""
    log_file = open(dirs["log"] / "start.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                start_new_session=True, close_fds=True)
    finally:
        log_file.close()
    (spec.home / "sshd.pid").write_text(str(proc.pid))
    wait_for_port(spec.netns, spec.ip, spec.ssh_port, proc, log_file=dirs["log"] / "start.log")
    with contextlib.suppress(OSError):
        (spec.home / MNT_NS_FILE).write_text(str(os.stat(f"/proc/{proc.pid}/ns/mnt").st_ino))
    return proc.pid


def node_process(netns: str, home: Path) -> int | None:
    """A live process of the host inside its own mount namespace (the one its sshd was started in), or
    None when no such process is left."""
    try:
        mnt = int((home / MNT_NS_FILE).read_text())
    except (OSError, ValueError):
        return None
    for pid in pids_in_netns(netns):
        try:
            if os.stat(f"/proc/{pid}/ns/mnt").st_ino == mnt and _alive(pid):
                return pid
        except OSError:
            continue
    return None


def _overlay_mounts(home: Path) -> list[str]:
    steps = []
    resolved = home.resolve()
    for target in OVERLAID:
        if not Path(target).is_dir() or resolved.is_relative_to(target):
            continue  # the host's own files live there: an overlay would hide them (and overlap itself)
        name = target.strip("/").replace("/", "-")
        upper, work = home / "overlay" / name / "upper", home / "overlay" / name / "work"
        upper.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        steps.append(f"mount -t overlay overlay -o lowerdir={target},upperdir={upper},workdir={work} {target}")
    return steps


def _add_link(ns: str, name: str, bridge: str, cidr: str) -> None:
    if sh("ip", "-n", ns, "-o", "link", "show", name, check=False).returncode != 0:
        veth = veth_name(f"{ns}/{name}")
        if link_exists(veth):
            sh("ip", "link", "del", veth, check=False)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
        sh("ip", "link", "set", f"{veth}p", "netns", ns)
        sh("ip", "-n", ns, "link", "set", f"{veth}p", "name", name)
        sh("ip", "link", "set", veth, "master", bridge)
        sh("ip", "link", "set", veth, "up")
    if f" {cidr} " not in sh("ip", "-n", ns, "-o", "addr", "show", "dev", name).stdout:
        sh("ip", "-n", ns, "addr", "add", cidr, "dev", name)
    sh("ip", "-n", ns, "link", "set", name, "up")


def _user_mounts(spec: HostSpec, dirs: dict[str, Path]) -> list[str]:
    """Private account files for the host: this machine's, plus the test-bed users."""
    etc = spec.home / "etc"
    sudoers = etc / "sudoers.d"
    homes = spec.home / "home"
    sudoers.mkdir(parents=True, exist_ok=True)
    homes.mkdir(exist_ok=True)
    passwd = Path("/etc/passwd").read_text()
    group = Path("/etc/group").read_text()
    shadow = Path("/etc/shadow").read_text() if Path("/etc/shadow").exists() else ""
    for i, user in enumerate(spec.users):
        uid = 2000 + i
        passwd += f"{user.name}:x:{uid}:{uid}::/home/{user.name}:/bin/sh\n"
        group += f"{user.name}:x:{uid}:\n"
        hashed = sh("openssl", "passwd", "-6", "-stdin", input=user.password).stdout.strip() if user.password else "*"
        shadow += f"{user.name}:{hashed}:19000:0:99999:7:::\n"
        home = homes / user.name
        home.mkdir(exist_ok=True)
        os.chown(home, uid, uid)
        if user.sudo != "none":
            tag = "NOPASSWD: " if user.sudo == "nopasswd" else ""
            rule = sudoers / f"90-{user.name}"
            rule.write_text(f"{user.name} ALL=(ALL:ALL) {tag}ALL\n")
            rule.chmod(0o440)
    (etc / "passwd").write_text(passwd)
    (etc / "group").write_text(group)
    (etc / "shadow").write_text(shadow)
    (etc / "shadow").chmod(0o640)
    return [f"mount --bind {etc / 'passwd'} /etc/passwd", f"mount --bind {etc / 'group'} /etc/group",
            f"mount --bind {etc / 'shadow'} /etc/shadow", f"mount --bind {sudoers} /etc/sudoers.d",
            f"mount --bind {homes} /home"]


def sshd_pid(netns: str) -> int | None:
    """The host's listening sshd: an sshd in the namespace whose parent is not one (sshd rewrites its
    argv, so the command line cannot tell the listener from the per-connection children)."""
    return _listener({pid for pid in program_pids(netns, "sshd") if _alive(pid)})


def sshd_pids(names: list[str]) -> dict[str, int]:
    """sshd_pid for several hosts from one look at /proc (per host, a walk of /proc each: 20 hosts made
    ~2,600 stat calls). Hosts without a listening sshd are left out."""
    inodes = {ino: n for n, ino in ((n, _netns_inode(n)) for n in names) if ino is not None}
    found: dict[str, set[int]] = {}
    for entry in os.listdir("/proc") if inodes else []:
        if not entry.isdigit():
            continue
        try:
            name = inodes.get(os.stat(f"/proc/{entry}/ns/net").st_ino)
            if name is not None and os.readlink(f"/proc/{entry}/exe").endswith("/sshd"):
                found.setdefault(name, set()).add(int(entry))
        except OSError:
            continue
    out = {}
    for name, pids in found.items():
        pid = _listener({p for p in pids if _alive(p)})
        if pid:
            out[name] = pid
    return out


def _listener(sshds: set[int]) -> int | None:
    """Of one host's live sshd processes, the listener."""
    # OpenSSH names its listener in its rewritten argv; a closing connection's child can briefly look
    # parentless (reparented to init), so the parent test is only the fallback.
    named = sorted(p for p in sshds if b"[listener]" in _cmdline(p))
    if named:
        return named[0]
    # Per-connection children title themselves "sshd: user@..." or "sshd: user [priv]": one that outlived
    # a killed listener is parentless too, and is no listener (a repair would otherwise never start one).
    parents = _parents()
    listeners = sorted(p for p in sshds if parents.get(p) not in sshds and not _cmdline(p).startswith(b"sshd: "))
    return listeners[0] if listeners else None


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def wait_for_port(netns: str, ip: str, port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 30.0,
                  log_file: Path | None = None) -> None:
    """Wait until the host's sshd accepts connections (tested from this machine over the bridge)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_file.read_text(errors="replace").strip().splitlines()[-3:] if log_file else []
            raise OperationFailed(f"sshd for {netns} exited with {proc.returncode}: {' | '.join(tail)}")
        with contextlib.suppress(OSError), socket.create_connection((ip, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise OperationFailed(f"sshd for {netns} did not listen on {ip}:{port} within {timeout:.0f}s")


def _answers(ip: str, port: int) -> bool:
    """Something accepts TCP connections at ip:port from this machine now."""
    try:
        with socket.create_connection((ip, port), timeout=0.5):
            return True
    except OSError:
        return False


def _netns_inode(netns: str) -> int | None:
    try:
        return os.stat(NETNS_DIR / netns).st_ino
    except OSError:
        return None


def pids_in_netns(netns: str) -> list[int]:
    ino = _netns_inode(netns)
    if ino is None:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino == ino:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def program_pids(netns: str, program: str) -> list[int]:
    """PIDs in the namespace running the executable named `program` (processes that exit meanwhile are
    skipped)."""
    out = []
    for pid in pids_in_netns(netns):
        try:
            if os.readlink(f"/proc/{pid}/exe").endswith(f"/{program}"):
                out.append(pid)
        except OSError:
            continue
    return out


def _parents() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # comm may hold spaces and parentheses: the fields after the last ')' are fixed.
        fields = stat.rsplit(")", 1)[1].split()
        out[int(entry)] = int(fields[1])
    return out


def host_processes(netns: str) -> list[int]:
    """Every process of a namespace host: those in its netns and all their descendants."""
    return hosts_processes([netns])


def hosts_processes(names: list[str]) -> list[int]:
    """Every process of these namespace hosts (in their netns, and all their descendants), from one look
    at /proc for all of them."""
    inodes = {ino for ino in (_netns_inode(n) for n in names) if ino is not None}
    if not inodes:
        return []
    roots = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                roots.add(int(entry))
        except OSError:
            continue
    if not roots:
        return []
    parents = _parents()
    members = set(roots)
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in members and pid not in members:
                members.add(pid)
                changed = True
    return sorted(members)


def kill_host_processes(netns: str, timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL, every process of the host until none is left. Returns how many there were."""
    return kill_hosts_processes([netns], timeout)


def kill_hosts_processes(names: list[str], timeout: float = 10.0, grace: float = 3.0) -> int:
    """kill_host_processes for several hosts at once: their daemons stop side by side (a dockerd takes
    about a second after SIGTERM; one host after another, 20 hosts took 20 s). `grace`: seconds between
    SIGTERM and SIGKILL."""
    pids = hosts_processes(names)
    total = len(pids)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, timeout)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            if not pids:  # the whole /proc walk only now (20 hosts: ~20 ms of CPU each): any started meanwhile?
                pids = hosts_processes(names)
                if not pids:
                    return total
            time.sleep(0.05)
    if pids:
        raise OperationFailed(f"processes of {', '.join(names)} would not die: {pids}")
    return total


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop_host(netns: str, home: Path | None) -> None:
    """Tear a namespace host down: processes, namespace (its veth goes with it), directory."""
    stop_hosts([(netns, home)])


def stop_hosts(hosts: list[tuple[str, Path | None]], grace: float = 3.0) -> None:
    """stop_host for several hosts: their processes are stopped all at once (SIGKILL after `grace`
    seconds), then the hosts are removed side by side."""
    kill_hosts_processes([netns for netns, _ in hosts], grace=grace)
    # One `ip -batch` and one `rm -rf` for all of them: per host, a process each and Python's rmtree
    # (its ~80 directories, under the GIL) cost 20 hosts about a second. What they leave is retried
    # host by host below. (The kernel then tears the namespaces down on its own: for 20 hosts ~1.3 s,
    # which the `ip link del` of a veth still there below waits for.)
    plain = [n for n, _ in hosts if re.fullmatch(r"[A-Za-z0-9._-]+", n) and netns_exists(n)]  # batch syntax
    if plain:
        sh("ip", "-force", "-batch", "-", input="".join(f"netns del {n}\n" for n in plain), check=False)
    homes = [str(home) for _, home in hosts if home is not None and home.exists()]
    if homes:
        sh("rm", "-rf", "--one-file-system", "--", *homes, check=False)

    def remove(netns: str, home: Path | None) -> None:
        if netns_exists(netns):
            sh("ip", "netns", "del", netns, check=False)
        veth = veth_name(netns)
        if link_exists(veth):
            sh("ip", "link", "del", veth, check=False)
        if home is not None and home.exists():
            _remove_tree(home)

    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="dcx-netns") as pool:
        futures = [pool.submit(remove, netns, home) for netns, home in hosts]
    for future in futures:
        future.result()  # the first failure, once every host was tried


def _remove_tree(path: Path) -> None:
    # dockerd's overlay directories can hold immutable-looking leftovers a moment after its death.
    for _ in range(20):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            last = exc
            time.sleep(0.1)
    log.warning("could not remove %s: %s", path, last)
    raise OperationFailed(f"could not remove {path}: {last}")
