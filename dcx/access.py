"""Operator access to a cluster from this machine.

- `ssh/known_hosts`: OpenSSH-format host keys, one per node, keyed by node name (HostKeyAlias), so
  `ssh`, `scp` and docker's SSH transport verify what dcx recorded on first use.
- `ssh/config`: a Host entry per node plus `dcx-NAME` for the first manager, with the cluster key.
- `~/.ssh/config` gets one `Include` line for every dcx cluster's ssh/config (added once, after a
  backup; `DCX_NO_SSH_CONFIG=1` skips it), because docker's SSH transport can only use the user's
  ssh configuration. One line per store: DCX_HOME/clusters/*, a `--state` directory's clusters/*, or
  a bucket store's working directory on this machine (DCX_HOME/cache/STORE/clusters/*, where its
  clusters' ssh settings, key and known_hosts live). It goes when the last cluster of that store here
  is destroyed, and is never added for a directory that other users can write to (their files would
  become the user's ssh settings).
- a docker context `dcx-NAME` (`host=ssh://dcx-NAME`), so `docker --context dcx-NAME service ls` works.
- k3s: the kubeconfig the engine fetched (kept 0600 in the cluster directory) merged into the user's
  kubeconfig under the context `dcx-NAME`, without switching the current context (`DCX_NO_KUBECONFIG=1`
  skips the merge; `dcx cluster kubeconfig NAME` prints it either way).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from dcx.log import log
from dcx.state import ClusterDir, ClusterState, StateStore, atomic_write, dcx_home, ensure_private_dir

INCLUDE_MARK = "# added by dcx: per-cluster ssh settings"  # written above the Include by earlier versions


def context_name(cluster: str) -> str:
    return f"dcx-{cluster}"


def write_known_hosts(cdir: ClusterDir, host_keys: dict[str, dict[str, str]]) -> None:
    ensure_private_dir(cdir.ssh_dir)
    lines = [f"{name} {k['type']} {k['key']}\n" for name, k in sorted(host_keys.items())]
    atomic_write(cdir.known_hosts, "".join(lines))


def ssh_config_text(cdir: ClusterDir, state: ClusterState, manager: str | None) -> str:
    blocks = []
    nodes = sorted(state.nodes.values(), key=lambda n: n["name"])
    entries = [(n["name"], n) for n in nodes]
    if manager:
        m = state.nodes.get(manager)
        if m:
            entries.insert(0, (context_name(state.name), m))
    jump_blocks: dict[str, str] = {}
    for alias, n in entries:
        endpoint = (n.get("extra") or {}).get("endpoint")
        if endpoint:  # a machine dcx was given: its inventory's settings, keys and jump hosts
            host, port, user = endpoint["host"], endpoint["port"], endpoint["user"]
            keys = endpoint["key_files"]
            jumps = ",".join(f"{j['user']}@{j['host']}:{j['port']}" for j in endpoint["jumps"])
        else:
            host, port, user = n["ssh_address"], n.get("ssh_port", 22), n.get("ssh_user", "root")
            keys, jumps = [n.get("ssh_key") or str(cdir.private_key)], ""
        lines = [f"Host {alias}", f"  HostName {host}", f"  User {user}", f"  Port {port}"]
        lines += [f"  IdentityFile {k}" for k in keys]
        if keys and not endpoint:
            lines.append("  IdentitiesOnly yes")
        if jumps:
            lines.append(f"  ProxyJump {jumps}")
        lines += [f"  HostKeyAlias {n['name']}", f"  UserKnownHostsFile {cdir.known_hosts}",
                  "  StrictHostKeyChecking yes"]
        blocks.append("\n".join(lines) + "\n")
        for j in (endpoint or {}).get("jumps", []):
            jump_blocks.setdefault(j["host"], "\n".join(
                [f"Host {j['host']}", f"  Port {j['port']}"] + [f"  IdentityFile {k}" for k in j["key_files"] + keys]
                + [f"  HostKeyAlias jump-{j['host']}-{j['port']}", f"  UserKnownHostsFile {cdir.known_hosts}",
                   "  StrictHostKeyChecking yes"]) + "\n")
    blocks += jump_blocks.values()
    return f"# dcx cluster {state.name} (written by dcx; rewritten on every run)\n" + "\n".join(blocks)


def user_ssh_config() -> Path:
    """The user's ssh config (DCX_SSH_CONFIG names another, as for reading it in dcx.sshconfig)."""
    if os.environ.get("DCX_SSH_CONFIG"):
        return Path(os.environ["DCX_SSH_CONFIG"])
    # ssh reads the home directory from the password database, not $HOME; so do we.
    import pwd

    return Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ssh" / "config"


def include_line(home: Path | None = None) -> str:
    return f"Include {home or dcx_home()}/clusters/*/ssh/config"


def _others_writable(root: Path) -> str:
    """Why files under the store's root could be someone else's doing ("" when only we can write there):
    the root and its clusters/, and for a bucket store's working directory DCX_HOME and DCX_HOME/cache too."""
    home = dcx_home()
    unsafe = StateStore(root).others_writable()
    if not unsafe and home in root.parents:
        unsafe = StateStore(home).others_writable() or StateStore(home / "cache").others_writable()
    return unsafe


def ensure_include(warn: Any = None, root: Path | None = None) -> bool:
    """Add `Include <ROOT>/clusters/*/ssh/config` at the top of ~/.ssh/config: one line, once. ROOT is
    the store's directory on this machine (DCX_HOME, a --state directory, a bucket store's working
    directory). Refused (with a warning through `warn`) when others can write there."""
    if os.environ.get("DCX_NO_SSH_CONFIG"):
        return False
    root = root or dcx_home()
    unsafe = _others_writable(root)
    if unsafe:
        if warn is not None:
            warn(f"warning: not adding an Include of {root} to {user_ssh_config()}: {unsafe}, so its "
                 f"files could set your ssh options; use `ssh -F` with the cluster's ssh/config instead")
        return False
    config = user_ssh_config()
    include = include_line(root)
    text = config.read_text() if config.exists() else ""
    if include in text.splitlines():
        return True
    ensure_private_dir(config.parent)
    if config.exists():
        shutil.copy2(config, config.with_name(config.name + ".dcx-backup"))
    # At the top: an Include after a Host block would only apply inside that block.
    atomic_write(config, f"{include}\n{text}", 0o600)
    return True


def remove_include(home: Path) -> None:
    """Take this DCX_HOME's Include line (and the comment earlier versions put above it) out of the
    user's ssh config; nothing else in the file changes."""
    config = user_ssh_config()
    try:
        lines = config.read_text().splitlines(keepends=True)
    except (FileNotFoundError, UnicodeDecodeError):
        return
    include = include_line(home)
    out: list[str] = []
    for i, line in enumerate(lines):
        if line.rstrip("\n") == include:
            if out and out[-1].rstrip("\n") == INCLUDE_MARK:
                out.pop()
                if i + 1 < len(lines) and not lines[i + 1].strip():
                    lines[i + 1] = ""  # the blank line that followed the old two-line form
            continue
        out.append(line)
    if len(out) != len(lines) or "".join(out) != "".join(lines):
        atomic_write(config, "".join(out), 0o600)


def first_manager(state: ClusterState) -> str | None:
    """The node `dcx-NAME` names when no run has said which manager: the first control node, in the
    order runs list hosts (pool, then name)."""
    control = sorted((n.get("pool", ""), n["name"]) for n in state.nodes.values() if n.get("role") == "control")
    return control[0][1] if control else None


def write_ssh_files(cdir: ClusterDir, state: ClusterState, manager: str | None = None) -> Path:
    """known_hosts and ssh/config from the state: what `ssh -F`, `docker --context` and the Include use."""
    write_known_hosts(cdir, state.host_keys)
    config = cdir.ssh_dir / "config"
    atomic_write(config, ssh_config_text(cdir, state, manager or first_manager(state)), 0o600)
    return config


def ensure_ssh_access(cdir: ClusterDir, state: ClusterState, warn: Any = None) -> Path:
    """This machine's ssh settings for a recorded cluster, (re)written from the state, and the Include
    for its store. A bucket store's clusters need this on each machine (the settings name this
    machine's paths and never go to the store; known_hosts follows host keys other runs shared)."""
    config = write_ssh_files(cdir, state)
    ensure_include(warn, cdir.root)
    return config


def setup(cdir: ClusterDir, spec: Any, ctx: Any, state: ClusterState) -> dict[str, str]:
    """Write ssh settings and (for swarm) the docker context. Returns what to tell the user."""
    manager = ctx.shared.get("swarm_manager") or (ctx.control_hosts[0].name if ctx.control_hosts else None)
    write_ssh_files(cdir, state, manager)
    info = {"ssh_config": str(cdir.ssh_dir / "config")}
    included = ensure_include(getattr(getattr(ctx, "reporter", None), "note", None), cdir.root)
    if spec.spec.engine.type == "swarm" and manager:
        name = context_name(state.name)
        info["docker_context"] = name if included and _docker_context(name) else ""
        info["docker_host"] = f"ssh://{name}"
    if spec.spec.engine.type == "k3s":
        info.update(merge_kubeconfig(cdir, state.name))
    return info


def kubeconfig_file(cdir: ClusterDir) -> Path:
    """The cluster's own kubeconfig (client keys: 0600), written by the k3s engine."""
    return cdir.path / "secrets" / "kubeconfig"


def merge_kubeconfig(cdir: ClusterDir, cluster: str) -> dict[str, str]:
    from dcx.bootstrap import kubeconfig

    own = kubeconfig_file(cdir)
    if not own.exists():
        return {}
    info = {"kubeconfig_file": str(own), "kube_context": context_name(cluster)}
    if os.environ.get("DCX_NO_KUBECONFIG"):
        return info
    target = kubeconfig.user_kubeconfig_path()
    kubeconfig.merge_into_file(target, kubeconfig.loads(own.read_text()))
    # Remembered so that destroy removes the context from the file it went into.
    atomic_write(cdir.path / "kubeconfig-merged-into", str(target) + "\n", 0o600)
    info["kubeconfig"] = str(target)
    return info


def remove_kubeconfig(cdir: ClusterDir, cluster: str) -> None:
    """Take `dcx-NAME` out of the user's kubeconfig (the file it was merged into, and the current one)."""
    from dcx.bootstrap import kubeconfig

    paths = {kubeconfig.user_kubeconfig_path()}
    recorded = cdir.path / "kubeconfig-merged-into"
    if recorded.exists():
        paths.add(Path(recorded.read_text().strip()))
    for path in paths:
        try:
            kubeconfig.remove_from_file(path, context_name(cluster))
        except Exception as exc:  # noqa: BLE001 - a broken user file must not stop a destroy
            log.warning("could not remove %s from %s: %s", context_name(cluster), path, exc)


def _docker_context(name: str) -> bool:
    docker = shutil.which("docker")
    if not docker:
        return False
    host = f"host=ssh://{name}"
    exists = subprocess.run([docker, "context", "inspect", name], capture_output=True, check=False).returncode == 0
    verb = "update" if exists else "create"
    proc = subprocess.run([docker, "context", verb, name, "--description", f"dcx cluster {name[4:]}",
                           "--docker", host], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        log.warning("docker context %s failed: %s", verb, proc.stderr.strip())
        return False
    return True


def teardown(cdir: ClusterDir, cluster: str) -> None:
    docker = shutil.which("docker")
    if docker:
        with contextlib.suppress(OSError):
            subprocess.run([docker, "context", "rm", "-f", context_name(cluster)], capture_output=True, check=False)
    (cdir.ssh_dir / "config").unlink(missing_ok=True)
    if not os.environ.get("DCX_NO_KUBECONFIG"):
        remove_kubeconfig(cdir, cluster)
    if not [n for n in StateStore(cdir.root).names() if n != cluster]:
        remove_include(cdir.root)  # the last cluster of this DCX_HOME: nothing left to include
