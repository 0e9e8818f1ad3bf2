"""HTTP(S) proxies on the nodes (issue 18): what the nodes download goes through the proxy the spec
names, and nothing else does.

Where a node's proxy comes from, most specific first: its inventory host's `proxy_env` / `environment`
(Ansible's spelling), its pool's `proxy` (`{}` = none), `spec.network.proxy`. One phase, before the
runtime is installed, writes per node (each file only where it applies, each compared with what is
there, and rewritten, with the daemon restarted, only when it differs):

- `/etc/dcx/proxy.env` (0600): HTTP_PROXY/HTTPS_PROXY/NO_PROXY, both cases. dcx's own downloads (the
  runtime's packages, k3s's install script) source it; so do the dockerd and k3s that dcx starts itself
  where no init system runs.
- systemd: `/etc/systemd/system/docker.service.d/http-proxy.conf`, a drop-in that reads that file
  (Docker 20.10 takes a proxy for pulls only from the daemon's environment; daemon.json's `proxies`
  needs Engine 23). The password stays in the 0600 file, never in a world-readable unit.
- apt: `/etc/apt/apt.conf.d/90dcx-proxy` (Acquire::http(s)::Proxy). dnf/yum: a `proxy=` line, marked
  `# dcx proxy`, under `[main]` of dnf.conf (yum.conf where there is no dnf.conf).
- k3s: the HTTP_PROXY/HTTPS_PROXY/NO_PROXY lines of the environment file its install script writes
  (`/etc/systemd/system/k3s[-agent].service.env`, openrc `/etc/rancher/k3s/k3s[-agent].env`); the
  script rewrites that file from its own environment, so the install runs with the proxy exported.

NO_PROXY always adds what must never go through a proxy: localhost, the nodes' addresses, the pools'
subnets, the mesh range and, with k3s, its cluster and service ranges. A node with no proxy loses
everything above that dcx wrote.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Any

from dcx.bootstrap import k3s
from dcx.bootstrap.phases import Host, Phase, RunContext
from dcx.bootstrap.runtime import DOCKERD_PIDFILE, PROXY_ENV_SOURCE, RUNNING_FUNCTION
from dcx.shell import q

PROXY_ENV = "/etc/dcx/proxy.env"
DOCKER_DROPIN = "/etc/systemd/system/docker.service.d/http-proxy.conf"
APT_CONF = "/etc/apt/apt.conf.d/90dcx-proxy"
DNF_CONFS = ("/etc/dnf/dnf.conf", "/etc/yum.conf")
DNF_MARK = "# dcx proxy"
# Sourced before a download dcx makes and before a daemon dcx starts itself: the variables exported.
SOURCE_ENV = PROXY_ENV_SOURCE
assert PROXY_ENV in SOURCE_ENV
ALWAYS_DIRECT = ("localhost", "127.0.0.1", "::1")
K3S_RANGES = ("10.42.0.0/16", "10.43.0.0/16")  # k3s's default cluster-cidr and service-cidr
PROXY_LINES = r"^(no|http|https)_proxy="
EMPTY_SHA = hashlib.sha256(b"").hexdigest()
DCX_HEADER = "# Written by dcx"


@dataclass(frozen=True)
class Proxy:
    http: str
    https: str
    no_proxy: tuple[str, ...]

    def env_lines(self) -> list[str]:
        """KEY=VALUE lines, both cases (curl reads only lowercase http_proxy; Go and k3s both). Values are
        URL and host characters only (dcx.grammar), so neither sh nor systemd needs them quoted."""
        out = []
        for name, value in (("HTTP_PROXY", self.http), ("HTTPS_PROXY", self.https),
                            ("NO_PROXY", ",".join(self.no_proxy))):
            if value:
                out += [f"{name}={value}", f"{name.lower()}={value}"]
        return out


def with_env(command: str) -> str:
    """`command` run with the node's proxy exported (dcx's own downloads)."""
    return f"{SOURCE_ENV}; {command}"


# --- which proxy, and NO_PROXY ----------------------------------------------------------------


def chosen(spec: Any, pool_name: str, inventory_proxy: dict[str, Any] | None) -> Any:
    """The ProxySpec for a node: its inventory host's, else its pool's, else the cluster's (None: none)."""
    from dcx.spec import ProxySpec

    if inventory_proxy is not None:
        return ProxySpec.model_validate(inventory_proxy)
    pool = next((p for p in spec.spec.pools if p.name == pool_name), None)
    if pool is not None and pool.proxy is not None:
        return pool.proxy
    return spec.spec.network.proxy


def cluster_ranges(ctx: RunContext) -> list[str]:
    """What every node reaches directly: localhost, every node's addresses, the pools' subnets, the mesh
    and (k3s) the cluster and service ranges. Swarm's default address pool (10.0.0.0/8) is not added: only
    containers use those addresses and they do not get the daemon's environment, while a 10.x proxy-only
    registry (common in enterprises) would then be dialled directly."""
    from dcx.spec import SUBNET_KEYS

    nets: list[str] = [ctx.spec.spec.network.meshCIDR]
    for pool in ctx.spec.spec.pools:
        nets += [str(v) for k, v in pool.settings.items() if k in SUBNET_KEYS and isinstance(v, str) and v]
    if ctx.spec.spec.engine.type == "k3s":
        nets += list(K3S_RANGES)
    networks = []
    for n in nets:
        try:
            networks.append(ipaddress.ip_network(n, strict=False))
        except ValueError:
            continue
    addresses: list[str] = []
    for h in ctx.hosts:
        facts = (h.facts.addresses.split() if h.facts is not None else [])
        addresses += [a for a in (h.node.private_address, h.node.public_address, h.node.ssh_address, *facts) if a]
    out = list(ALWAYS_DIRECT) + [str(n) for n in networks]
    for a in addresses:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            out.append(a)  # a host name
            continue
        if not any(ip in n for n in networks if n.version == ip.version):
            out.append(a)  # an address not already within a listed range
    return list(dict.fromkeys(out))


def node_proxy(chosen_spec: Any, ranges: list[str]) -> Proxy | None:
    if chosen_spec is None or not (chosen_spec.http or chosen_spec.https):
        return None
    if chosen_spec.password_masked:
        # A spec read back from state.json has the password masked (state holds no secret).
        from dcx.errors import InputError

        raise InputError("the proxy's password is not recorded in dcx's state: give the spec file with "
                         "-f FILE (the same file `dcx cluster create` was run with)")
    https = chosen_spec.https or chosen_spec.http  # one proxy for both unless https is given apart
    return Proxy(http=chosen_spec.http, https=https,
                 no_proxy=tuple(dict.fromkeys([*chosen_spec.noProxy, *ranges])))


# --- the files, per node ------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeFiles:
    """What one node should have: contents by path (None: absent), per its facts and the engine."""

    env: str | None
    dropin: str | None
    apt: str | None
    dnf_line: str | None  # the `proxy=` line under [main], or None
    k3s_env: str | None  # the k3s environment file whose proxy lines dcx keeps, or None (none for this init)
    k3s_lines: tuple[str, ...]


def k3s_env_file(init: str, role: str) -> str | None:
    """Where k3s's install script keeps the service's environment (its documented env file)."""
    svc = k3s.service_name(role)
    if init == "systemd":
        return f"/etc/systemd/system/{svc}.service.env"
    if init == "openrc":
        return f"{k3s.CONFIG_DIR}/{svc}.env"
    return None  # dcx starts k3s itself: it sources PROXY_ENV


def target(proxy: Proxy | None, *, family: str, init: str, engine: str, role: str) -> NodeFiles:
    env = "".join(f"{line}\n" for line in proxy.env_lines()) if proxy else None
    dropin = None
    if proxy and init == "systemd" and engine != "k3s":
        dropin = (f"{DCX_HEADER}: Docker's proxy for image pulls (the values are in the 0600 file).\n"
                  f"[Service]\nEnvironmentFile=-{PROXY_ENV}\n")
    apt = None
    if proxy and family == "debian":
        apt = "// Written by dcx.\n" + "".join(
            f'Acquire::{scheme}::Proxy "{url}";\n' for scheme, url in (("http", proxy.http), ("https", proxy.https))
            if url)
    dnf_line = f"proxy={proxy.http or proxy.https}" if proxy and family == "rhel" else None
    k3s_lines = tuple(sorted(proxy.env_lines())) if proxy and engine == "k3s" else ()
    return NodeFiles(env=env, dropin=dropin, apt=apt, dnf_line=dnf_line,
                  k3s_env=k3s_env_file(init, k3s.k3s_role(role)) if engine == "k3s" else None, k3s_lines=k3s_lines)


def sha(text: str | None) -> str:
    return "-" if text is None else hashlib.sha256(text.encode()).hexdigest()


def lines_sha(lines: tuple[str, ...]) -> str:
    return hashlib.sha256("".join(f"{line}\n" for line in lines).encode()).hexdigest()


def _file_sha(path: str) -> str:
    return f"if [ -f {q(path)} ]; then sha256sum < {q(path)} | cut -d' ' -f1; else echo -; fi"


def probe_script(t: NodeFiles) -> str:
    """What the node has now, as `key=value` lines: sha256 of each file dcx may own ("-": absent), the
    dnf/yum proxy line dcx marked, and the normalised proxy lines of k3s's env file."""
    # A drop-in of that name without dcx's header is the machine owner's (Docker's docs suggest the name):
    # reported as `foreign`, and left alone unless the spec gives this node a proxy.
    dropin = (f"if [ -f {DOCKER_DROPIN} ] && ! grep -q {q(DCX_HEADER)} {DOCKER_DROPIN}; then echo foreign; "
              f"else {_file_sha(DOCKER_DROPIN)}; fi")
    parts = [f"echo env=$({_file_sha(PROXY_ENV)})", f"echo dropin=$({dropin})", f"echo apt=$({_file_sha(APT_CONF)})"]
    parts.append("for f in " + " ".join(DNF_CONFS) + "; do if [ -f \"$f\" ]; then echo dnf_file=$f; "
                 f"echo dnf=$(sed -n '/^{DNF_MARK}$/{{n;p;q}}' \"$f\"); break; fi; done")
    if t.k3s_env:
        # The install script writes `KEY='value'`; dcx `KEY=value`: compared without quotes, in one order.
        parts.append(f"if [ -f {q(t.k3s_env)} ]; then echo k3s=$(grep -Ei {q(PROXY_LINES)} {q(t.k3s_env)} "
                     "| tr -d \"'\\\"\" | LC_ALL=C sort | sha256sum | cut -d' ' -f1); else echo k3s=-; fi")
    return "; ".join(parts)


def parse_probe(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def changes(t: NodeFiles, have: dict[str, str]) -> list[str]:
    """What differs: env, dropin, apt, dnf, k3s (the k3s file is only edited when it exists: the install
    script makes it, from the environment dcx gives it)."""
    out = [name for name, want in (("env", sha(t.env)), ("dropin", sha(t.dropin)), ("apt", sha(t.apt)))
           if have.get(name, "-") != want and not (name == "dropin" and want == "-" and have.get(name) == "foreign")]
    if have.get("dnf_file") and (have.get("dnf") or None) != t.dnf_line:
        out.append("dnf")
    if t.k3s_env and have.get("k3s", "-") != "-":
        want = lines_sha(t.k3s_lines) if t.k3s_lines else EMPTY_SHA
        if have["k3s"] != want:
            out.append("k3s")
    return out


def write_command(path: str, mode: str) -> str:
    """The file's content arrives on stdin (it may hold a password): never on a command line."""
    new = q(f"{path}.dcx-new")
    return f"umask 077; mkdir -p \"$(dirname {q(path)})\" && cat > {new} && chmod {mode} {new} && mv {new} {q(path)}"


def dnf_command(path: str, present: bool, secret: bool = False) -> str:
    """Drop dcx's marked line (and the marker); with `present`, put it back under [main] from stdin. A
    line that holds a password (`user:pass@`) makes the file 0600, as dnf runs as root (a user's query
    then reads no config); without one it is 0644, as the package ships it."""
    p, new = q(path), q(f"{path}.dcx-new")
    keep = f"sed '/^{DNF_MARK}$/{{N;d}}' {p}"
    if present:  # the line is read before the pipe: inside it, stdin is sed's output
        keep = (f"l=$(cat); {keep} | awk -v l=\"$l\" "
                f"'{{print}} /^\\[main\\]/ && !d {{print \"{DNF_MARK}\"; print l; d=1}}'")
    return f"umask 077; {keep} > {new} && chmod {'600' if secret else '644'} {new} && mv {new} {p}"


def k3s_env_command(path: str) -> str:
    """Replace the proxy lines of k3s's env file with those on stdin (none: removed), keeping the rest."""
    p, new = q(path), q(f"{path}.dcx-new")
    return (f"umask 077; {{ grep -Eiv {q(PROXY_LINES)} {p}; cat; }} > {new}; chmod 600 {new} && mv {new} {p}")


def apply_commands(t: NodeFiles, what: list[str], dnf_file: str) -> list[tuple[str, str]]:
    """(command, stdin) for each change."""
    out: list[tuple[str, str]] = []
    for name, path, content, mode in (("env", PROXY_ENV, t.env, "600"), ("dropin", DOCKER_DROPIN, t.dropin, "644"),
                                      ("apt", APT_CONF, t.apt, "600" if t.apt and "@" in t.apt else "644")):
        if name in what:
            out.append((write_command(path, mode) if content is not None else f"rm -f {q(path)}", content or ""))
    if "dnf" in what:
        out.append((dnf_command(dnf_file, t.dnf_line is not None, "@" in (t.dnf_line or "")), t.dnf_line or ""))
    if "k3s" in what and t.k3s_env:
        out.append((k3s_env_command(t.k3s_env), "".join(f"{line}\n" for line in t.k3s_lines)))
    return out


def restart_commands(what: list[str], *, init: str, engine: str, role: str, docker_running: bool) -> list[str]:
    """Daemons whose proxy changed, restarted only then. dockerd that dcx started itself (no init system)
    is stopped here and started again, with the new environment, by the runtime phase after this one."""
    out = []
    if init == "systemd" and "dropin" in what:
        out.append("systemctl daemon-reload")
    if engine != "k3s" and docker_running and ({"env", "dropin"} & set(what)):
        if init == "systemd":
            out.append("systemctl try-restart docker")
        elif init == "none":
            out.append(stop_dockerd_command())
    if engine == "k3s" and ({"k3s"} & set(what) or (init == "none" and "env" in what)):
        svc_role = k3s.k3s_role(role)
        out.append(f"if {k3s.running_check(init, svc_role)}; then {k3s.restart_command(init, svc_role)}; fi")
    return out


def stop_dockerd_command() -> str:
    """Stop the dockerd dcx started (TERM, up to 30 s): its pidfile names it."""
    return (f"{RUNNING_FUNCTION}; pid=$(cat {DOCKERD_PIDFILE} 2>/dev/null); if running \"$pid\" dockerd; then "
            "kill \"$pid\"; i=0; while running \"$pid\" dockerd && [ $i -lt 60 ]; do sleep 0.5; i=$((i+1)); done; "
            f"fi; rm -f {DOCKERD_PIDFILE}")


def reset_command() -> str:
    """A machine that leaves the cluster (ssh pools) keeps none of dcx's proxy settings: the files, the marked
    dnf/yum line, the drop-in when it is dcx's (k3s's env file goes with k3s's uninstall)."""
    return (f"rm -f {PROXY_ENV} {APT_CONF}; "
            f"if grep -qs {q(DCX_HEADER)} {DOCKER_DROPIN}; then rm -f {DOCKER_DROPIN}; "
            "systemctl daemon-reload 2>/dev/null; fi; "
            f"for f in {' '.join(DNF_CONFS)}; do if grep -qs '^{DNF_MARK}$' \"$f\"; then "
            f"sed -i '/^{DNF_MARK}$/{{N;d}}' \"$f\"; fi; done; true")


# --- the phase ----------------------------------------------------------------------------------


def inventory_proxies(spec: Any) -> dict[str, dict[str, Any] | None]:
    """Host name -> the proxy its inventory gives (ssh pools with an inventory), read again: never stored."""
    from pathlib import Path

    from dcx.inventory import load_inventory

    out: dict[str, dict[str, Any] | None] = {}
    for pool in spec.spec.pools:
        inventory = pool.settings.get("inventory") if pool.provider == "ssh" else None
        if not isinstance(inventory, str) or not inventory:
            continue
        path = Path(inventory).expanduser()
        group = pool.settings.get("group")
        for h in load_inventory(path if path.is_absolute() else spec.base_dir / path,
                                group if isinstance(group, str) else None):
            out[h.name] = h.proxy
    return out


class ConfigureProxy(Phase):
    title = "Configure HTTP proxy"
    # Each host goes on from its own preflight: NO_PROXY needs every host's facts, and they are all in
    # before preflight (a barrier: its duplicate checks compare hosts) starts.
    pipelined = True

    def prepare(self, ctx: RunContext) -> None:
        self.from_inventory = inventory_proxies(ctx.spec)
        self.ranges = cluster_ranges(ctx)

    def needs_run(self, ctx: RunContext, host: Host) -> bool:
        proxy = node_proxy(chosen(ctx.spec, host.node.pool, self.from_inventory.get(host.name)), self.ranges)
        host.data["proxy"] = proxy
        t = host.data["proxy_target"] = target(proxy, family=host.facts.family, init=host.facts.init,
                                               engine=ctx.spec.spec.engine.type, role=host.node.role)
        have = parse_probe(host.run(probe_script(t), timeout=60, check=True, what="reading the proxy settings").stdout)
        host.data["proxy_changes"] = changes(t, have)
        host.data["proxy_dnf_file"] = have.get("dnf_file", "")
        return bool(host.data["proxy_changes"])

    def run(self, ctx: RunContext, host: Host) -> None:
        t: NodeFiles = host.data["proxy_target"]
        what: list[str] = host.data["proxy_changes"]
        for command, stdin in apply_commands(t, what, host.data["proxy_dnf_file"]):
            host.run(command, stdin=stdin, timeout=60, check=True, what="writing the proxy settings")
        facts = host.facts
        for command in restart_commands(what, init=facts.init, engine=ctx.spec.spec.engine.type, role=host.node.role,
                                        docker_running=facts.docker_running):
            host.run(command, timeout=120, check=True, what="restarting with the new proxy settings")
        if facts.init == "none" and ctx.spec.spec.engine.type != "k3s" and facts.docker_running and \
                {"env"} & set(what):
            facts.docker_running = False  # StartRuntime starts it again, with the new environment
