"""OpenSSH client settings as OpenSSH users expect them: ~/.ssh/config Host patterns with HostName,
User, Port, IdentityFile and ProxyJump (chained). Explicit values (inventory, spec) win over the
config file, as command-line options do for `ssh`."""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")


def user_ssh_dir() -> Path:
    return Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ssh"


_parsed: dict[tuple[str, int, int], paramiko.SSHConfig] = {}


def load_user_config(path: Path | None = None) -> paramiko.SSHConfig:
    """~/.ssh/config (or DCX_SSH_CONFIG), parsed once per version of the file: resolving a thousand
    hosts must not read it a thousand times."""
    path = path or Path(os.environ.get("DCX_SSH_CONFIG", str(user_ssh_dir() / "config")))
    try:
        st = path.stat()
    except OSError:
        return paramiko.SSHConfig()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _parsed:
        _parsed.clear()
        _parsed[key] = paramiko.SSHConfig.from_text(expand_includes(path))
    return _parsed[key]


MAX_INCLUDE_DEPTH = 16  # OpenSSH readconf.c READCONF_MAX_DEPTH


def expand_includes(path: Path, depth: int = 0) -> str:
    """The file's text with its `Include` lines replaced by the files they name, as OpenSSH reads them
    (ssh_config(5) Include: glob patterns, in sorted order, relative paths under ~/.ssh; a pattern that
    matches nothing is not an error). paramiko does not follow Include, and dcx's own per-cluster
    settings (dcx-NAME, nodes of clusters in any store) reach ~/.ssh/config only that way. An Include
    inside a Host or Match block applies under that block's condition: the block's line is repeated
    after the included text, so what follows the Include stays under it."""
    import glob

    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    out: list[str] = []
    block = ""  # the Host/Match line in force ("" before any)
    for line in lines:
        words = line.strip().replace("=", " ", 1).split()
        keyword = words[0].lower() if words else ""
        if keyword in ("host", "match"):
            block = line.strip()
        if keyword != "include" or depth >= MAX_INCLUDE_DEPTH:
            out.append(line)
            continue
        for pattern in words[1:]:
            pattern = os.path.expanduser(pattern)
            if not os.path.isabs(pattern):
                pattern = str(user_ssh_dir() / pattern)
            for name in sorted(glob.glob(pattern)):
                out.append(expand_includes(Path(name), depth + 1))
        out.append(block or "Host *")  # back under the block the Include stood in
    return "\n".join(out) + "\n"


@dataclass
class Endpoint:
    alias: str  # what the user wrote (inventory name or address)
    host: str
    port: int = 22
    user: str = ""
    key_files: list[str] = field(default_factory=list)
    jumps: list[Endpoint] = field(default_factory=list)  # outermost first

    def to_dict(self) -> dict[str, object]:
        return {"alias": self.alias, "host": self.host, "port": self.port, "user": self.user,
                "key_files": self.key_files, "jumps": [j.to_dict() for j in self.jumps]}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Endpoint:
        return cls(alias=str(data["alias"]), host=str(data["host"]), port=int(data.get("port", 22)),  # type: ignore[arg-type]
                   user=str(data.get("user", "")), key_files=list(data.get("key_files", [])),  # type: ignore[arg-type]
                   jumps=[cls.from_dict(j) for j in data.get("jumps", [])])  # type: ignore[union-attr]


def parse_jump(spec: str) -> tuple[str, str, int | None]:
    """`[user@]host[:port]` -> (user, host, port)."""
    user, _, rest = spec.rpartition("@")
    host, port = rest, None
    if rest.startswith("["):  # [v6]:port
        host, _, tail = rest[1:].partition("]")
        port = int(tail[1:]) if tail.startswith(":") else None
    elif rest.count(":") == 1:
        host, p = rest.split(":")
        port = int(p)
    return user, host, port


def resolve(alias: str, *, host: str = "", port: int | None = None, user: str = "", key_file: str = "",
            proxy_jump: str = "", config: paramiko.SSHConfig | None = None, default_user: str = "root",
            _depth: int = 0) -> Endpoint:
    """Resolve one destination: explicit values, then ~/.ssh/config, then defaults."""
    if _depth > 8:
        raise ValueError(f"ProxyJump chain through {alias} is too deep (a loop?)")
    config = config if config is not None else load_user_config()
    # As `ssh ADDRESS` does (Ansible calls ssh with ansible_host, else the inventory name): the address
    # is looked up in the config, and a matching block's HostName replaces it.
    lookup = host or alias
    found = config.lookup(lookup)
    hostname = found.get("hostname", lookup)
    keys = [os.path.expanduser(k) for k in ([key_file] if key_file else found.get("identityfile", []))]
    jump_spec = proxy_jump or found.get("proxyjump", "")
    jumps: list[Endpoint] = []
    if jump_spec and jump_spec.lower() != "none":
        for hop in jump_spec.split(","):
            j_user, j_host, j_port = parse_jump(hop.strip())
            hop_ep = resolve(j_host, port=j_port, user=j_user, config=config, default_user=default_user,
                             _depth=_depth + 1)
            jumps.extend(hop_ep.jumps)
            hop_ep.jumps = []
            jumps.append(hop_ep)
    return Endpoint(alias=alias, host=hostname, port=int(port or found.get("port", 22)),
                    user=user or found.get("user", default_user), key_files=keys, jumps=jumps)


def default_identities() -> list[str]:
    d = user_ssh_dir()
    return [str(d / name) for name in DEFAULT_IDENTITIES if (d / name).exists()]
