"""Kubeconfig handling for k3s clusters: rename what k3s writes, merge it into the user's file.

k3s writes /etc/rancher/k3s/k3s.yaml on every server with one cluster, user and context, all named
`default`, and the server at https://127.0.0.1:6443. dcx renames all three to `dcx-NAME`, points the
server at an address this machine reaches, and merges the result into the user's kubeconfig (the
first path of $KUBECONFIG, else ~/.kube/config) without touching the other entries or switching the
current context (unless the file has none). The file is backed up first and written 0600.

A kubeconfig holds client keys: its text is never logged; its key material is registered with the
redactor the moment it is read.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Any

from dcx.errors import OperationFailed
from dcx.log import register_secret

SECTIONS = ("clusters", "users", "contexts")
SECRET_FIELDS = ("client-key-data", "token", "password", "client-certificate-data")


def _yaml() -> Any:
    from ruamel.yaml import YAML

    y = YAML(typ="rt")  # round trip: the user's comments and ordering survive a merge
    y.default_flow_style = False
    y.preserve_quotes = True  # the user's quoted URLs in flow mappings must stay quoted for YAML 1.1 readers
    return y


def loads(text: str) -> dict[str, Any]:
    data = _yaml().load(text) if text.strip() else None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OperationFailed("the kubeconfig is not a YAML mapping")
    return data


def dumps(data: dict[str, Any]) -> str:
    buf = io.StringIO()
    _yaml().dump(data, buf)
    return buf.getvalue()


def register_secrets(data: dict[str, Any]) -> None:
    """Every key and token of the kubeconfig goes to the redactor before anything can print it."""
    for entry in data.get("users") or []:
        user = (entry or {}).get("user") or {}
        for name in SECRET_FIELDS:
            if user.get(name):
                register_secret(str(user[name]))


def server_url(address: str, port: int = 6443) -> str:
    """https://ADDRESS:PORT (IPv6 in brackets); an address with its own port keeps it."""
    if address.startswith("https://"):
        return address
    if address.count(":") == 1 or (address.startswith("[") and "]:" in address):  # host:port, [v6]:port
        return f"https://{address}"
    if ":" in address and not address.startswith("["):
        return f"https://[{address}]:{port}"
    return f"https://{address}:{port}"


def rename(k3s_yaml: str, context: str, server: str) -> dict[str, Any]:
    """k3s's kubeconfig with its single cluster, user and context renamed to `context` and the server
    set to `server` (a URL)."""
    data = loads(k3s_yaml)
    register_secrets(data)
    for section in SECTIONS:
        if len(data.get(section) or []) != 1:
            raise OperationFailed(f"the kubeconfig k3s wrote has {len(data.get(section) or [])} {section}, "
                                  "expected 1")
    data["clusters"][0]["name"] = context
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    # Quoted: k3s's kubeconfig may hold the cluster as a flow mapping, where YAML 1.1 parsers
    # (PyYAML, libyaml: kubectl's client libraries) refuse an unquoted URL with ':' in it.
    data["clusters"][0]["cluster"]["server"] = DoubleQuotedScalarString(server)
    data["users"][0]["name"] = context
    data["contexts"][0]["name"] = context
    data["contexts"][0]["context"]["cluster"] = context
    data["contexts"][0]["context"]["user"] = context
    data["current-context"] = context
    return data


def merge(existing: dict[str, Any], new: dict[str, Any], switch: bool = False) -> dict[str, Any]:
    """`existing` with every cluster, user and context of `new` added or replaced by name. The current
    context changes only when asked or when there is none."""
    out = existing if existing else {"apiVersion": "v1", "kind": "Config", "preferences": {}}
    out.setdefault("apiVersion", "v1")
    out.setdefault("kind", "Config")
    for section in SECTIONS:
        incoming = list(new.get(section) or [])
        names = {e["name"] for e in incoming}
        kept = [e for e in (out.get(section) or []) if (e or {}).get("name") not in names]
        out[section] = kept + incoming
    if switch or not out.get("current-context"):
        out["current-context"] = new.get("current-context", "")
    return out


def remove(existing: dict[str, Any], context: str) -> tuple[dict[str, Any], bool]:
    """`existing` without the cluster, user and context named `context`; (data, whether anything went)."""
    changed = False
    for section in SECTIONS:
        entries = existing.get(section) or []
        kept = [e for e in entries if (e or {}).get("name") != context]
        if len(kept) != len(entries):
            existing[section] = kept
            changed = True
    if existing.get("current-context") == context:
        existing["current-context"] = ""
        changed = True
    return existing, changed


def user_kubeconfig_path() -> Path:
    """The file kubectl writes to: the first path of $KUBECONFIG, else ~/.kube/config."""
    env = os.environ.get("KUBECONFIG", "")
    first = next((p for p in env.split(os.pathsep) if p), "")
    return Path(first).expanduser() if first else Path.home() / ".kube" / "config"


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + ".dcx-backup")


def _write(path: Path, data: dict[str, Any]) -> None:
    from dcx.state import atomic_write, ensure_private_dir

    if not path.parent.exists():
        ensure_private_dir(path.parent)
    if path.exists():
        # The backup holds the user's keys too: it is as private as the file.
        shutil.copy2(path, backup_path(path))
        os.chmod(backup_path(path), 0o600)
    atomic_write(path, dumps(data), 0o600)


def merge_into_file(path: Path, new: dict[str, Any], switch: bool = False) -> None:
    existing = loads(path.read_text()) if path.exists() else {}
    register_secrets(existing)
    _write(path, merge(existing, new, switch))


def remove_from_file(path: Path, context: str) -> bool:
    """Drop `context` (and its cluster and user) from the file at `path`; True when it was there."""
    if not path.exists():
        return False
    existing = loads(path.read_text())
    data, changed = remove(existing, context)
    if changed:
        _write(path, data)
    return changed
