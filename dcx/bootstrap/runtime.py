"""Host facts (OS family, arch, init system, docker) and the container runtime phases.

Facts are a command plus a parser (after pyinfra): `FACTS_SCRIPT` prints key=value lines and
`parse_facts` turns them into `Facts`. The install and start commands are pure functions of the
facts, so every OS family and init system has table-driven tests even where it cannot run here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from dcx.bootstrap.phases import Host, Phase, RunContext
from dcx.errors import OperationFailed
from dcx.shell import q

# proto/port/process of every listening socket, space separated ("" process: the kernel's, as WireGuard's).
LISTENING_COMMAND = (
    "ss -Hlntup 2>/dev/null | awk '{split($5, a, \":\"); p=a[length(a)]; "
    "match($0, /users:\\(\\(\"[^\"]*\"/); u=substr($0, RSTART+9, RLENGTH-10); print $1 \"/\" p \"/\" u}' "
    "| tr '\\n' ' '")
FACTS_SCRIPT = r"""
# Shell builtins and /proc files where they do: every process spawned costs each node ~2-5 ms of CPU.
set -f
. /etc/os-release 2>/dev/null
echo "os_id=${ID:-unknown}"
echo "os_like=${ID_LIKE:-}"
echo "os_version=${VERSION_ID:-}"
set -- $(uname -rm)
echo "arch=$2"
echo "kernel=$1"
read -r h < /proc/sys/kernel/hostname && echo "hostname=$h"
r=$(ip -4 route get 1.0.0.0 2>/dev/null)
case $r in *" src "*) r=${r#* src }; echo "primary_ip=${r%% *}";; *) echo "primary_ip=";; esac
a=
while read -r _ dev _ cidr _; do
  case $dev in docker*|br-*|veth*|dcx0*|cni*|flannel*|kube*|"") continue;; esac  # container bridges, the mesh
  a="$a${cidr%%/*} "
done <<EOF
$(ip -4 -o addr show scope global 2>/dev/null)
EOF
echo "addresses=$a"
while read -r k _ e _; do [ "$k" = Uid: ] && echo "uid=$e" && break; done < /proc/self/status
echo "cpus=$(nproc 2>/dev/null || echo 0)"
while read -r k v _; do [ "$k" = MemTotal: ] && echo "mem_kb=$v" && break; done < /proc/meminfo
d=$(df -Pk / 2>/dev/null | { read -r _; read -r _ _ _ free _; echo "$free"; })
echo "disk_kb=$d"
echo "epoch=$(date +%s.%N 2>/dev/null || date +%s)"
if [ -d /run/systemd/system ]; then echo init=systemd
elif [ -e /run/openrc/softlevel ] || { command -v rc-service >/dev/null 2>&1 && [ -d /run/openrc ]; }
then echo init=openrc
else echo init=none; fi
echo "docker_bin=$(command -v dockerd 2>/dev/null)"
# One docker CLI call (each costs the node ~20 ms of CPU) for the version and the swarm state, which
# GatherSwarmState reuses when nothing changed the host in between.
swarm=
if v=$(docker info --format '{{.ServerVersion}}{{"\n"}}{{json .Swarm}}' 2>/dev/null); then
  echo docker_running=1; swarm=${v#*
}; v=${v%%
*}
else echo docker_running=0; v=; fi
echo "docker_version=$v"
printf 'docker_swarm=%s\n' "$swarm"  # not echo: dash's turns the JSON's \n escapes into newlines
echo "wg_bin=$(command -v wg 2>/dev/null)"
# A package install killed half-way (dpkg leaves it unconfigured, and apt refuses until it is finished).
if command -v dpkg >/dev/null 2>&1 && [ -n "$(dpkg --audit 2>/dev/null)" ]; then echo packages_interrupted=1; fi
echo "wggo_bin=$(command -v wireguard-go 2>/dev/null)"
if [ -d /sys/module/wireguard ] || modprobe -n wireguard >/dev/null 2>&1
then echo wg_kernel=1; else echo wg_kernel=0; fi
echo "sudo_ok=1"
# Listening sockets. Their owners (ss -p) cost a walk through every process's open files, so on an active
# swarm member only the ports are read (owner "?"): Preflight asks for the owners when a port it checks is
# not one the member's own dockerd holds (listening_owners=0).
case $swarm in
*'"LocalNodeState":"active"'*) echo listening_owners=0
  echo "listening=$(ss -Hlntu 2>/dev/null | awk '{n=split($5, a, ":"); print $1 "/" a[n] "/?"}' | tr '\n' ' ')";;
*) echo "listening=$(""" + LISTENING_COMMAND + """)";;
esac
"""


@dataclass
class Facts:
    os_id: str = "unknown"
    os_like: str = ""
    os_version: str = ""
    arch: str = ""
    kernel: str = ""
    hostname: str = ""
    primary_ip: str = ""  # the source address of the default route ("" without one)
    addresses: str = ""  # the host's own global IPv4 addresses (not container bridges or the mesh), space separated
    uid: int = -1
    cpus: int = 0
    mem_kb: int = 0
    disk_kb: int = 0
    epoch: float = 0.0
    init: str = "none"  # systemd | openrc | none
    docker_bin: str = ""
    docker_running: bool = False
    docker_version: str = ""
    wg_bin: str = ""
    wggo_bin: str = ""
    wg_kernel: bool = False
    listening: str = ""  # "tcp/2377/dockerd udp/4789/ ..." (proto/port/process)
    packages_interrupted: bool = False  # dpkg was interrupted: a binary may be there, its package unfinished
    docker_swarm: str = ""  # `docker info` .Swarm as JSON, read with the version ("" when docker is not running)
    listening_owners: bool = True  # False: `listening` names no processes ("?" for each)

    def listeners(self) -> dict[tuple[str, int], str]:
        out = {}
        for item in self.listening.split():
            proto, _, rest = item.partition("/")
            port, _, proc = rest.partition("/")
            if port.isdigit():
                out[(proto, int(port))] = proc
        return out

    @property
    def family(self) -> str:
        """debian | rhel | alpine | suse | arch | unknown"""
        ids = {self.os_id, *self.os_like.split()}
        for family, members in FAMILIES.items():
            if ids & members:
                return family
        return "unknown"


FAMILIES: dict[str, set[str]] = {
    "debian": {"debian", "ubuntu", "raspbian", "linuxmint", "pop"},
    "rhel": {"rhel", "centos", "fedora", "rocky", "almalinux", "ol", "amzn"},
    "alpine": {"alpine"},
    "suse": {"suse", "opensuse", "opensuse-leap", "sles", "opensuse-tumbleweed"},
    "arch": {"arch", "archarm", "manjaro"},
}
SUPPORTED_ARCHES = {"x86_64", "aarch64", "armv7l"}


def parse_facts(text: str) -> Facts:
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    f = Facts()
    for name, field in Facts.__dataclass_fields__.items():
        if name == "primary_ip" and not values.get(name):
            values[name] = values.get("addresses", "").split(" ")[0]
        if name not in values:
            continue
        raw = values[name]
        if field.type in ("int",):
            setattr(f, name, int(raw) if raw.lstrip("-").isdigit() else 0)
        elif field.type in ("float",):
            try:
                setattr(f, name, float(raw))
            except ValueError:
                pass
        elif field.type in ("bool",):
            setattr(f, name, raw == "1")
        else:
            setattr(f, name, raw)
    return f


def gather_facts(host: Host) -> Facts:
    """Facts, and the host's clock offset from this machine's (remote time minus the midpoint of the call)."""
    result = host.run(FACTS_SCRIPT, timeout=60, check=True, what="gathering facts")
    facts = parse_facts(result.stdout)
    # The clock on its own, without sudo (which may wait on name resolution) between the two readings.
    started = time.time()
    remote = host.run("date +%s.%N", sudo=False, timeout=30).stdout.strip()
    try:
        host.data["clock_offset"] = float(remote) - (started + time.time()) / 2
    except ValueError:
        host.data["clock_offset"] = 0.0
    return facts


def set_hostname_command(name: str) -> str:
    """Set the hostname now and for every boot: /etc/hostname, an /etc/hosts line for it, and (where
    cloud-init runs) `preserve_hostname` so cloud-init does not put the cloud's name back. The live
    hostname, which SetHostname looks at, is set last: a run killed before it leaves the phase to do."""
    n = q(name)
    return (f"echo {n} > /etc/hostname && "
            f"{{ grep -v '^127.0.1.1[[:space:]]' /etc/hosts; echo \"127.0.1.1 \"{n}; }} > /etc/hosts.dcx && "
            "cat /etc/hosts.dcx > /etc/hosts && rm -f /etc/hosts.dcx && "
            "if [ -d /etc/cloud/cloud.cfg.d ]; then "
            "echo 'preserve_hostname: true' > /etc/cloud/cloud.cfg.d/99-dcx-hostname.cfg; fi && "
            f"hostname {n}")


class SetHostname(Phase):
    title = "Set hostnames"
    pipelined = True  # after its own Connect

    def hosts(self, ctx: RunContext) -> list[Host]:
        return [h for h in ctx.hosts if h.node.hostname]

    def needs_run(self, ctx: RunContext, host: Host) -> bool:
        return host.run("hostname", sudo=False, timeout=30).stdout.strip() != host.node.hostname

    def run(self, ctx: RunContext, host: Host) -> None:
        host.run(set_hostname_command(host.node.hostname), timeout=60, check=True, what="setting the hostname")


class GatherFacts(Phase):
    title = "Gather host facts"
    read_only = True
    pipelined = True

    def run(self, ctx: RunContext, host: Host) -> None:
        host.facts = gather_facts(host)
        host.data["facts_changes"] = host.data.get("changes", 0)  # a later phase that changes the host bumps it
        if host.facts.arch and host.facts.arch not in SUPPORTED_ARCHES:
            raise OperationFailed(f"unsupported architecture {host.facts.arch}")


# --- installing the runtime -------------------------------------------------------------------


def docker_install_commands(facts: Facts) -> list[str]:
    """Docker Engine from the distribution's own packages, per OS family."""
    family = facts.family
    if family == "debian":
        return [
            "export DEBIAN_FRONTEND=noninteractive",
            *DPKG_FINISH,
            "apt-get update -q",
            "apt-get install -y -q docker.io",
        ]
    if family == "rhel":
        if facts.os_id == "amzn":
            return ["yum install -y docker"]
        if facts.os_id == "fedora":
            return ["dnf install -y moby-engine"]
        # RHEL and its rebuilds ship podman, not docker: Docker's own repository is the documented way.
        return [
            "dnf install -y dnf-plugins-core",
            "dnf config-manager --add-repo https://download.docker.com/linux/centos/docker-ce.repo",
            "dnf install -y docker-ce docker-ce-cli containerd.io",
        ]
    if family == "alpine":
        return ["apk add --no-cache docker"]
    if family == "suse":
        return ["zypper --non-interactive install docker"]
    if family == "arch":
        return ["pacman -Sy --noconfirm docker"]
    raise OperationFailed(f"unsupported OS '{facts.os_id}': install Docker on it first, then re-run")


# Finish what an interrupted install left (apt-get refuses to run until then); nothing when there is none.
DPKG_FINISH = ["dpkg --configure -a"]


DOCKERD_PIDFILE = "/run/dcx/dockerd.pid"
DOCKERD_LOG = "/var/log/dcx-dockerd.log"


def docker_start_commands(facts: Facts) -> list[str]:
    """Enable and start dockerd through the init system, or detached where none runs."""
    if facts.init == "systemd":
        return ["systemctl enable --now docker"]
    if facts.init == "openrc":
        return ["rc-update add docker default", "rc-service docker start"]
    # No init system (containers, the local provider's namespace nodes): a detached dockerd with a
    # pidfile, started only when none is running for this host. A pidfile naming a dead dockerd is removed
    # (dockerd refuses to start while the PID's /proc entry exists), and so is its containerd's.
    return [
        "mkdir -p /run/dcx",
        f"{RUNNING_FUNCTION}; if running \"$(cat {DOCKERD_PIDFILE} 2>/dev/null)\" dockerd; then :; else "
        f"rm -f {DOCKERD_PIDFILE}; running \"$(cat {CONTAINERD_PIDFILE} 2>/dev/null)\" containerd || "
        f"rm -f {CONTAINERD_PIDFILE}; {PROXY_ENV_SOURCE}; "
        f"setsid dockerd --pidfile {q(DOCKERD_PIDFILE)} >>{q(DOCKERD_LOG)} 2>&1 </dev/null "
        "& fi",
    ]


CONTAINERD_PIDFILE = "/run/docker/containerd/containerd.pid"  # the containerd dockerd starts itself
# The node's proxy (dcx.bootstrap.proxy writes the file), exported to the dockerd dcx starts itself:
# Docker 20.10 takes a proxy for image pulls only from its environment.
PROXY_ENV_SOURCE = "if [ -r /etc/dcx/proxy.env ]; then set -a; . /etc/dcx/proxy.env; set +a; fi"
# `running PID PROGRAM`: the PID runs that program now. `kill -0` is not enough: it succeeds for a zombie
# (where nothing reaps, a killed daemon stays one) and for an unrelated process that reused the PID.
RUNNING_FUNCTION = ('running() { case "$(readlink "/proc/$1/exe" 2>/dev/null)" in */"$2"|*/"$2 (deleted)") '
                    'return 0;; esac; return 1; }')


def docker_stop_commands(facts: Facts) -> list[str]:
    """Stop dockerd and wait until it is gone (a swarm backup copies its raft directory meanwhile). systemd:
    the socket too, or the next docker command would start it again."""
    if facts.init == "systemd":
        return ["systemctl stop docker.socket docker"]
    if facts.init == "openrc":
        return ["rc-service docker stop"]
    return [f"{RUNNING_FUNCTION}; pid=\"$(cat {DOCKERD_PIDFILE} 2>/dev/null)\"; "
            "if running \"$pid\" dockerd; then kill \"$pid\"; i=0; "
            "while running \"$pid\" dockerd && [ $i -lt 60 ]; do sleep 0.5; i=$((i+1)); done; "
            "if running \"$pid\" dockerd; then echo 'dockerd did not stop within 30 s' >&2; exit 1; fi; fi"]


class InstallRuntime(Phase):
    title = "Install container runtime"

    def needs_run(self, ctx: RunContext, host: Host) -> bool:
        return not host.facts.docker_bin or host.facts.packages_interrupted

    def run(self, ctx: RunContext, host: Host) -> None:
        script = "set -e; " + "; ".join(docker_install_commands(host.facts))
        if host.data.get("proxy"):
            from dcx.bootstrap.proxy import with_env

            script = with_env(script)  # the packages come through the node's proxy
        host.run(script, timeout=900, check=True, what="installing docker")
        host.facts.docker_bin = "dockerd"


class StartRuntime(Phase):
    title = "Start container runtime"
    pipelined = True  # after its own install

    def needs_run(self, ctx: RunContext, host: Host) -> bool:
        return not host.facts.docker_running

    def run(self, ctx: RunContext, host: Host) -> None:
        script = "set -e; " + "; ".join(docker_start_commands(host.facts))
        host.run(script, timeout=120, check=True, what="starting docker")
        wait_for_docker(host)
        host.facts.docker_running = True


def wait_for_docker(host: Host, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = host.run("docker info --format '{{.ServerVersion}}'", timeout=30)
        if result.ok:
            return
        if time.monotonic() > deadline:
            tail = host.run(f"tail -n 5 {DOCKERD_LOG} 2>/dev/null", timeout=15).stdout.strip()
            raise OperationFailed(f"docker did not become ready within {timeout:.0f}s" + (f": {tail}" if tail else ""))
        time.sleep(1.0)


# --- reset (machines that stay: ssh pools) ------------------------------------------------------

DCX_PATHS = ["/etc/dcx", "/run/dcx", DOCKERD_LOG]


def docker_purge_commands(facts: Facts) -> list[str]:
    """Stop and remove Docker Engine and its data (only with --purge)."""
    stop = {"systemd": "systemctl disable --now docker docker.socket || true",
            "openrc": "rc-service docker stop || true; rc-update del docker default || true"}.get(
        facts.init, f"[ -f {DOCKERD_PIDFILE} ] && kill \"$(cat {DOCKERD_PIDFILE})\" || true")
    remove = {"debian": "DEBIAN_FRONTEND=noninteractive apt-get purge -y -q docker.io docker-ce docker-ce-cli || true",
              "rhel": "dnf remove -y docker-ce docker-ce-cli containerd.io moby-engine docker || true",
              "alpine": "apk del docker || true", "suse": "zypper --non-interactive remove docker || true",
              "arch": "pacman -Rns --noconfirm docker || true"}.get(facts.family, "true")
    return [stop, remove, "rm -rf /var/lib/docker /etc/docker"]


class RemoveDcxFiles(Phase):
    title = "Remove dcx's files"

    def __init__(self, purge: bool) -> None:
        self.purge = purge

    def run(self, ctx: RunContext, host: Host) -> None:
        from dcx.bootstrap.proxy import reset_command

        commands = [reset_command(), "rm -rf " + " ".join(q(p) for p in DCX_PATHS)]  # proxy settings first
        if self.purge:
            facts = host.facts or gather_facts(host)
            commands = docker_purge_commands(facts) + commands
        host.run("; ".join(commands), timeout=600, check=True, what="removing dcx's files")
