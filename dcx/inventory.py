"""Inventories of existing machines: Ansible INI, Ansible YAML, and dcx's own YAML.

Read as Ansible reads them: groups, `[group:children]`, `[group:vars]`, `all` vars, host ranges
(`node[01:20].dc1`, `10.0.0.[1:9]`, `[a:f]`, `[1:9:2]`), `host:port`, and variable precedence
host > child group > parent group > all (groups of equal depth by ansible_group_priority, then
name). Inline host values in INI are Python literals where they parse; `[g:vars]` values are
strings. Unknown variables are kept and ignored. Errors are one located line (exit 2).
"""

from __future__ import annotations

import ast
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dcx import grammar
from dcx.errors import SpecError
from dcx.log import register_secret
from dcx.yamlsrc import Locator, load_yaml_text, read_text_file

SECRET_VARS = ("ansible_become_pass", "ansible_become_password", "ansible_password", "ansible_ssh_pass")
TRUE = {"yes", "true", "on", "1", "y", "t"}
FALSE = {"no", "false", "off", "0", "n", "f"}
# More hosts than any pool takes (a pool has at most 5000 nodes): a range such as node[1:1000000] is
# refused before it is expanded.
MAX_HOSTS = 10_000


@dataclass
class InventoryHost:
    name: str
    address: str
    port: int = 22
    user: str = ""
    private_key_file: str = ""
    become: bool = False
    become_user: str = "root"
    become_password: str | None = field(default=None, repr=False)
    ssh_common_args: str = ""
    proxy_jump: str = ""
    mesh_endpoint: str = ""
    private_address: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)
    vars: dict[str, Any] = field(default_factory=dict, repr=False)
    # From proxy_env / environment (http_proxy, https_proxy, no_proxy): a spec.ProxySpec's fields, or None.
    proxy: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def become_password_var(self) -> bool:
        return self.become_password is not None


# --- the group model shared by both Ansible formats ----------------------------------------------


@dataclass
class _Group:
    name: str
    vars: dict[str, Any] = field(default_factory=dict)
    children: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)
    line: int | None = None
    host_set: set[str] = field(default_factory=set)  # membership of `hosts` in O(1)


class _Model:
    """Groups and hosts as Ansible builds them, before variables are resolved."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.groups: dict[str, _Group] = {"all": _Group("all"), "ungrouped": _Group("ungrouped")}
        self.host_order: list[str] = []
        self.host_vars: dict[str, dict[str, Any]] = {}
        self.host_lines: dict[str, int | None] = {}

    def group(self, name: str, line: int | None) -> _Group:
        if name not in self.groups:
            self.groups[name] = _Group(name, line=line)
        return self.groups[name]

    def add_host(self, group: str, name: str, values: dict[str, Any], line: int | None) -> None:
        g = self.group(group, line)
        if name not in g.host_set:
            g.host_set.add(name)
            g.hosts.append(name)
        if name not in self.host_vars:
            if len(self.host_order) >= MAX_HOSTS:
                raise SpecError(self.file, line, f"host {name}", f"more than {MAX_HOSTS} hosts in one inventory")
            self.host_order.append(name)
            self.host_vars[name] = {}
            self.host_lines[name] = line
        self.host_vars[name].update(values)

    def parents(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {name: set() for name in self.groups}
        for g in self.groups.values():
            for child in g.children:
                out.setdefault(child, set()).add(g.name)
        return out

    def check_cycles(self) -> None:
        done: set[str] = set()  # groups whose descendants were all visited: each is walked once

        def visit(name: str, path: list[str]) -> None:
            for child in self.groups[name].children:
                if child in path:
                    cycle = " -> ".join(path[path.index(child):] + [child])
                    raise SpecError(self.file, self.groups[name].line, f"group {name}",
                                    f"children form a cycle: {cycle}")
                if child not in done:
                    visit(child, path + [child])
            done.add(name)

        for name in self.groups:
            if name not in done:
                visit(name, [name])

    def depth(self, name: str, parents: dict[str, set[str]]) -> int:
        cache = self.__dict__.setdefault("_depths", {})
        if name not in cache:
            ps = parents.get(name) or {"all"}
            cache[name] = 0 if name == "all" else 1 + max(self.depth(p, parents) for p in ps)
        return cache[name]

    def resolve(self, group: str | None) -> list[InventoryHost]:
        self.check_cycles()
        # Every group not below another one is a child of all; ungrouped holds hosts of no other group.
        parents = self.parents()
        for name in self.groups:
            if name != "all" and not parents.get(name) and name not in self.groups["all"].children:
                self.groups["all"].children.append(name)
        parents = self.parents()
        self.__dict__.pop("_depths", None)
        direct: dict[str, list[str]] = {}
        for g in self.groups.values():
            for h in g.hosts:
                direct.setdefault(h, []).append(g.name)
        if group is not None and group not in self.groups:
            known = ", ".join(sorted(n for n in self.groups if n not in ("ungrouped",)))
            raise SpecError(self.file, None, f"group {group}", f"no such group (groups: {known})")
        members = self._members(group or "all")
        out = []
        for name in self.host_order:
            if name not in members:
                continue
            ancestors: set[str] = set()
            todo = list(direct.get(name, []))
            while todo:
                g = todo.pop()
                if g not in ancestors:
                    ancestors.add(g)
                    todo.extend(parents.get(g, ()))
            ancestors.add("all")
            ordered = sorted(ancestors, key=lambda g: (self.depth(g, parents),
                                                        _priority(self.groups[g].vars), g))
            merged: dict[str, Any] = {}
            for g in ordered:
                merged.update(self.groups[g].vars)
            merged.update(self.host_vars[name])
            out.append(_make_host(name, merged, ordered, self.file, self.host_lines.get(name)))
        return out

    def _members(self, group: str) -> set[str]:
        seen: set[str] = set()
        hosts: set[str] = set()
        todo = [group]
        while todo:
            g = todo.pop()
            if g in seen:
                continue
            seen.add(g)
            hosts.update(self.groups[g].hosts)
            todo.extend(self.groups[g].children)
        if group == "all":
            hosts.update(self.host_order)
        return hosts


def _priority(values: dict[str, Any]) -> int:
    try:
        return int(values.get("ansible_group_priority", 1))
    except (TypeError, ValueError):
        return 1


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise ValueError(f"'{value}' is not a boolean")


def proxy_jump_from_args(args: str) -> str:
    """ProxyJump from ssh arguments: -J X, -o ProxyJump=X, or -o ProxyCommand="ssh -W %h:%p [-p P] [u@]X"."""
    try:
        tokens = shlex.split(args)
    except ValueError:
        return ""
    options: list[str] = []
    for i, tok in enumerate(tokens):
        if tok == "-J" and i + 1 < len(tokens):
            return tokens[i + 1]
        if tok.startswith("-J") and len(tok) > 2:
            return tok[2:]
        if tok == "-o" and i + 1 < len(tokens):
            options.append(tokens[i + 1])
        elif tok.startswith("-o") and len(tok) > 2:
            options.append(tok[2:])
    for opt in options:
        key, _, value = opt.partition("=") if "=" in opt else opt.partition(" ")
        key = key.strip().lower()
        if key == "proxyjump":
            return value.strip()
        if key == "proxycommand":
            cmd = shlex.split(value)
            if cmd and os.path.basename(cmd[0]) == "ssh" and "-W" in cmd:
                port = ""
                dest = ""
                skip = False
                for j, part in enumerate(cmd[1:], start=1):
                    if skip:
                        skip = False
                        continue
                    if part == "-p" and j + 1 < len(cmd):
                        port, skip = cmd[j + 1], True
                    elif part in ("-W", "-i", "-l", "-F", "-o"):
                        skip = True
                    elif not part.startswith("-"):
                        dest = part
                return f"{dest}:{port}" if port and dest else dest
    return ""


def _make_host(name: str, values: dict[str, Any], groups: list[str], file: str, line: int | None) -> InventoryHost:
    def text(*keys: str) -> str:
        for k in keys:
            if values.get(k) not in (None, ""):
                return str(values[k])
        return ""

    host_name, _, inline_port = name.partition(":") if name.count(":") == 1 else (name, "", "")
    port_text = text("ansible_port", "ansible_ssh_port") or inline_port or "22"
    try:
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise SpecError(file, line, f"host {host_name}: ansible_port",
                        f"'{port_text}' is not a port (1-65535)") from None
    try:
        become = _bool(values.get("ansible_become", False))
    except ValueError as exc:
        raise SpecError(file, line, f"host {host_name}: ansible_become", str(exc)) from None
    common = " ".join(filter(None, [text("ansible_ssh_common_args"), text("ansible_ssh_extra_args")]))
    password = next((str(values[k]) for k in ("ansible_become_password", "ansible_become_pass") if k in values), None)
    if password is not None and (password.lstrip().startswith("$ANSIBLE_VAULT") or "{{" in password):
        # Vault ciphertext or a Jinja expression: sending either to sudo would only fail later, obscurely.
        raise SpecError(file, line, f"host {host_name}: ansible_become_password",
                        "is vault-encrypted or templated, which dcx cannot read",
                        hint="leave it out and pass -K/--ask-become-pass (or DCX_BECOME_PASSWORD)")
    labels = values.get("dcx_labels") if isinstance(values.get("dcx_labels"), dict) else {}
    proxy = proxy_from_vars(values, file, line, host_name)
    host = InventoryHost(
        name=host_name, address=text("ansible_host", "ansible_ssh_host") or host_name, port=port,
        user=text("ansible_user", "ansible_ssh_user"),
        private_key_file=os.path.expanduser(text("ansible_ssh_private_key_file", "ansible_private_key_file")),
        become=become, become_user=text("ansible_become_user") or "root", become_password=password,
        ssh_common_args=common, proxy_jump=text("dcx_proxy_jump") or proxy_jump_from_args(common),
        mesh_endpoint=text("dcx_mesh_endpoint"), private_address=text("dcx_private_address"),
        labels={str(k): str(v) for k, v in labels.items()}, groups=[g for g in groups if g != "ungrouped"],
        vars={k: v for k, v in values.items()}, proxy=proxy)
    problem = host_problem(host)
    if problem:
        field_name, why = problem
        raise SpecError(file, line, f"host {_shown(host_name)}{': ' + field_name if field_name else ''}", why)
    return host


PROXY_VARS = ("proxy_env", "environment")  # as k3s-ansible's group_vars and plays' `environment:` set them
PROXY_KEYS = {"http_proxy": "http", "https_proxy": "https", "no_proxy": "noProxy"}


def proxy_from_vars(values: dict[str, Any], file: str, line: int | None, host: str) -> dict[str, Any] | None:
    """The proxy an Ansible inventory gives a host: `proxy_env` (or `environment`) as a mapping of
    http_proxy / https_proxy / no_proxy, either case (other variables there are not dcx's). In `[g:vars]`
    the mapping arrives as text (`{'http_proxy': '...'}`). None when the host has neither."""
    for var in PROXY_VARS:
        raw = values.get(var)
        if raw in (None, ""):
            continue
        where = f"host {_shown(host)}: {var}"
        if isinstance(raw, str):
            if "{{" in raw:
                raise SpecError(file, line, where, "is templated (Jinja), which dcx cannot read",
                                hint="give the values themselves (http_proxy, https_proxy, no_proxy)")
            raw = _literal(raw.strip())
        if not isinstance(raw, dict):
            raise SpecError(file, line, where, "must be a mapping of http_proxy, https_proxy and no_proxy")
        out: dict[str, Any] = {}
        for key, value in raw.items():
            name = PROXY_KEYS.get(str(key).lower())
            if name is None:
                continue
            text = "" if value is None else str(value).strip()
            if "{{" in text:
                raise SpecError(file, line, f"{where}.{key}", "is templated (Jinja), which dcx cannot read")
            if name == "noProxy":
                entries = [e.strip() for e in text.split(",") if e.strip()]
                bad = next((grammar.no_proxy_problem(e) for e in entries if grammar.no_proxy_problem(e)), "")
                if bad:
                    raise SpecError(file, line, f"{where}.{key}", bad)
                out[name] = entries
            elif text:
                problem = grammar.proxy_url_problem(text)
                if problem:
                    raise SpecError(file, line, f"{where}.{key}", problem)
                out[name] = text
        for url in (out.get("http", ""), out.get("https", "")):
            userinfo = grammar.proxy_userinfo(url)
            if ":" in userinfo:  # the password is a secret: never in a log line or an error
                register_secret(userinfo.partition(":")[2])
        return out
    return None


def _shown(name: str) -> str:
    return name if len(name) <= 60 and name.isprintable() else repr(name[:60])[1:-1] + "..."


def host_problem(h: InventoryHost) -> tuple[str, str] | None:
    """(field, why) for a host whose values could not be what they claim. Names become node names,
    hostnames and lines of an ssh config file; none of them may carry a shell word or a newline."""
    checks = [("", grammar.hostname_problem(h.name))]
    checks.append(("ansible_host", grammar.address_problem(h.address) if h.address != h.name else ""))
    checks.append(("ansible_user", grammar.user_problem(h.user) if h.user else ""))
    checks.append(("ansible_become_user", grammar.user_problem(h.become_user)))
    checks.append(("ansible_ssh_private_key_file",
                   "must be a path on one line" if not h.private_key_file.isprintable() else ""))
    for hop in filter(None, h.proxy_jump.split(",")):
        user, _, rest = hop.strip().rpartition("@")
        why = (grammar.user_problem(user) if user else "") or grammar.host_port_problem(rest)
        checks.append(("ProxyJump", f"'{_shown(hop)}' {why}" if why else ""))
    checks.append(("dcx_mesh_endpoint", grammar.host_port_problem(h.mesh_endpoint) if h.mesh_endpoint else ""))
    checks.append(("dcx_private_address", grammar.address_problem(h.private_address) if h.private_address else ""))
    checks.append(("dcx_labels", grammar.labels_problem(h.labels, kubernetes=False)))  # k3s: checked by the spec
    for field_name, why in checks:
        if why:
            if field_name == "":
                why = f"is not a usable node name: it {why}" if not why.startswith("is ") else \
                    f"is not a usable node name: {why.removeprefix('is ')}"
            return field_name, why
    return None


# --- host ranges -----------------------------------------------------------------------------------

_RANGE = re.compile(r"\[([^\]\[]*)\]")


def expand_range(pattern: str, file: str, line: int | None) -> list[str]:
    """`node[01:03]` -> node01 node02 node03; `[a:c]`; `[1:9:2]`; several ranges multiply (at most
    MAX_HOSTS names in all: the size is worked out before anything is expanded)."""
    total = 1
    for m in _RANGE.finditer(pattern):
        total *= _range_size(m.group(1))
        if total > MAX_HOSTS:
            raise SpecError(file, line, f"host {_shown(pattern)}",
                            f"the range makes more than {MAX_HOSTS} hosts (at most {MAX_HOSTS} in one inventory)")
    return _expand(pattern, file, line)


def _range_size(body: str) -> int:
    """How many names [body] makes; 1 when it is malformed (_expand then says what is wrong)."""
    parts = body.split(":")
    try:
        step = int(parts[2]) if len(parts) == 3 and parts[2] else 1
        start, end = parts[0], parts[1]
        if start.isdigit() and end.isdigit() and step >= 1:
            return max(0, (int(end) - int(start)) // step + 1)
        if len(start) == 1 and len(end) == 1 and step >= 1:
            return max(0, (ord(end) - ord(start)) // step + 1)
    except (ValueError, IndexError):
        pass
    return 1


def _expand(pattern: str, file: str, line: int | None) -> list[str]:
    m = _RANGE.search(pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    parts = body.split(":")
    if len(parts) not in (2, 3):
        raise SpecError(file, line, f"host {pattern}", f"range [{body}] must be [start:end] or [start:end:step]")
    start, end = parts[0], parts[1]
    try:
        step = int(parts[2]) if len(parts) == 3 and parts[2] else 1
    except ValueError:
        raise SpecError(file, line, f"host {pattern}", f"range step '{parts[2]}' is not a number") from None
    if step < 1:
        raise SpecError(file, line, f"host {pattern}", "range step must be >= 1")
    values: list[str]
    if start.isdigit() and end.isdigit():
        if int(start) > int(end):
            raise SpecError(file, line, f"host {pattern}", f"range [{body}] starts after it ends")
        width = len(start) if start.startswith("0") and len(start) > 1 else 0
        values = [str(i).zfill(width) for i in range(int(start), int(end) + 1, step)]
    elif len(start) == 1 and len(end) == 1 and start.isalpha() and end.isalpha():
        if start > end:
            raise SpecError(file, line, f"host {pattern}", f"range [{body}] starts after it ends")
        values = [chr(c) for c in range(ord(start), ord(end) + 1, step)]
    else:
        raise SpecError(file, line, f"host {pattern}", f"range [{body}] must be numbers or single letters of one kind")
    out = []
    for v in values:
        out.extend(_expand(head + v + tail, file, line))
    return out


# --- Ansible INI -----------------------------------------------------------------------------------

_SECTION = re.compile(r"^\[([^\[\]:]+)(?::([^\[\]]+))?\]$")


def _literal(value: str) -> Any:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def parse_ini(text: str, file: str) -> _Model:
    model = _Model(file)
    section, kind = "ungrouped", "hosts"
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            m = _SECTION.match(line)
            if not m:
                raise SpecError(file, lineno, "section", f"'{line}' is not a section header ([group], [group:vars], "
                                                          "[group:children])")
            section, suffix = m.group(1).strip(), (m.group(2) or "").strip()
            if suffix not in ("", "vars", "children"):
                raise SpecError(file, lineno, f"[{section}:{suffix}]",
                                f"unknown section kind '{suffix}' (use :vars or :children)")
            kind = suffix or "hosts"
            model.group(section, lineno)
            continue
        if kind == "vars":
            key, sep, value = line.partition("=")
            if not sep or not key.strip():
                raise SpecError(file, lineno, f"[{section}:vars]", f"'{line}' is not key=value")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            model.groups[section].vars[key.strip()] = value
        elif kind == "children":
            child = line.split()[0]
            if child == section:
                raise SpecError(file, lineno, f"[{section}:children]", "a group cannot be its own child")
            model.group(child, lineno)
            if child not in model.groups[section].children:
                model.groups[section].children.append(child)
        else:
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError as exc:
                raise SpecError(file, lineno, f"[{section}]", f"cannot parse '{line}': {exc}") from None
            if not tokens:
                continue
            values: dict[str, Any] = {}
            for tok in tokens[1:]:
                key, sep, value = tok.partition("=")
                if not sep or not key:
                    raise SpecError(file, lineno, f"host {tokens[0]}", f"'{tok}' is not key=value")
                values[key] = _literal(value)
            pattern, port = tokens[0], None
            if _RANGE.sub("", pattern).count(":") == 1:  # host:port (colons inside [a:b] are a range)
                pattern, port = pattern.rsplit(":", 1)
                if not port.isdigit():
                    raise SpecError(file, lineno, f"host {tokens[0]}", f"'{port}' is not a port")
            for name in expand_range(pattern, file, lineno):
                host_values = dict(values)
                if port and "ansible_port" not in host_values:
                    host_values["ansible_port"] = port
                model.add_host(section, name, host_values, lineno)
    return model


# --- Ansible YAML ----------------------------------------------------------------------------------

GROUP_KEYS = {"hosts", "vars", "children"}


def parse_ansible_yaml(data: dict[str, Any], locator: Locator) -> _Model:
    model = _Model(locator.file)

    def walk(name: str, body: Any, path: tuple[str | int, ...], parent: str | None) -> None:
        group = model.group(name, locator.line(path))
        if parent is not None and name not in model.groups[parent].children:
            if name == parent:
                raise locator.error(path, "a group cannot be its own child")
            model.groups[parent].children.append(name)
        if body is None:
            return
        if not isinstance(body, dict):
            raise locator.error(path, "a group must be a mapping with hosts, vars and children")
        for key in body:
            if key not in GROUP_KEYS:
                raise locator.error(path + (key,), "unknown group key (use hosts, vars, children)")
        hosts = body.get("hosts")
        if hosts is not None:
            if not isinstance(hosts, dict):
                raise locator.error(path + ("hosts",), "must be a mapping of host names to their variables")
            for host, values in hosts.items():
                if values is not None and not isinstance(values, dict):
                    raise locator.error(path + ("hosts", host), "host variables must be a mapping")
                for expanded in expand_range(str(host), locator.file, locator.line(path + ("hosts", host))):
                    model.add_host(name, expanded, dict(values or {}), locator.line(path + ("hosts", host)))
        if body.get("vars") is not None:
            if not isinstance(body["vars"], dict):
                raise locator.error(path + ("vars",), "must be a mapping")
            group.vars.update(body["vars"])
        children = body.get("children")
        if children is not None:
            if not isinstance(children, dict):
                raise locator.error(path + ("children",), "must be a mapping of group names")
            for child, child_body in children.items():
                walk(str(child), child_body, path + ("children", child), name)

    for top, body in data.items():
        walk(str(top), body, (top,), None)
    return model


# --- dcx's own YAML --------------------------------------------------------------------------------


class DcxHost(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    address: str = ""
    port: int = Field(default=22, ge=1, le=65535)
    user: str = ""
    privateKey: str = ""
    become: bool = False
    becomeUser: str = "root"
    proxyJump: str = ""
    meshEndpoint: str = ""
    privateAddress: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    groups: list[str] = Field(default_factory=list)


class DcxInventory(BaseModel):
    model_config = ConfigDict(extra="forbid")
    apiVersion: str
    kind: str
    hosts: list[DcxHost] = Field(min_length=1)


def parse_dcx(data: dict[str, Any], locator: Locator, group: str | None) -> list[InventoryHost]:
    from dcx.spec import raise_located

    try:
        inv = DcxInventory.model_validate(data)
    except ValidationError as exc:
        raise_located(exc, locator)
    if inv.apiVersion != "dcx/v1":
        raise locator.error(("apiVersion",), "must be dcx/v1")
    if len(inv.hosts) > MAX_HOSTS:
        raise locator.error(("hosts",), f"more than {MAX_HOSTS} hosts in one inventory")
    seen: set[str] = set()
    out = []
    all_groups = {g for h in inv.hosts for g in h.groups}
    if group is not None and group != "all" and group not in all_groups:
        known = ", ".join(sorted(all_groups))
        raise SpecError(locator.file, None, f"group {group}", f"no such group (groups: {known})")
    for i, h in enumerate(inv.hosts):
        if h.name in seen:
            raise locator.error(("hosts", i, "name"), f"host '{h.name}' is listed twice")
        seen.add(h.name)
        if group not in (None, "all") and group not in h.groups:
            continue
        host = InventoryHost(
            name=h.name, address=h.address or h.name, port=h.port, user=h.user,
            private_key_file=os.path.expanduser(h.privateKey), become=h.become, become_user=h.becomeUser,
            proxy_jump=h.proxyJump, mesh_endpoint=h.meshEndpoint, private_address=h.privateAddress,
            labels=h.labels, groups=["all", *h.groups], vars={})
        problem = host_problem(host)
        if problem:
            field_name, why = problem
            names = {"": "name", "ansible_host": "address", "ansible_user": "user", "ansible_become_user": "becomeUser",
                     "ansible_ssh_private_key_file": "privateKey", "ProxyJump": "proxyJump",
                     "dcx_mesh_endpoint": "meshEndpoint", "dcx_private_address": "privateAddress",
                     "dcx_labels": "labels"}
            raise locator.error(("hosts", i, names[field_name]), why)
        out.append(host)
    return out


# --- entry points ----------------------------------------------------------------------------------


def parse_inventory_text(text: str, file: str, group: str | None = None) -> list[InventoryHost]:
    data: Any = None
    locator: Locator | None = None
    looks_ini = any(line.strip().startswith("[") and line.strip().endswith("]")
                    for line in text.splitlines()[:50] if line.strip() and not line.lstrip().startswith("#"))
    if not looks_ini:
        try:
            data, locator = load_yaml_text(text, file)
        except SpecError:
            if text.lstrip().startswith(("all:", "apiVersion:")):
                raise
            data = None
    if isinstance(data, dict) and locator is not None:
        if data.get("kind") == "Inventory" or "apiVersion" in data:
            hosts = parse_dcx(data, locator, group)
        else:
            hosts = parse_ansible_yaml(data, locator).resolve(group)
    else:
        hosts = parse_ini(text, file).resolve(group)
    if not hosts:
        where = f"group {group}" if group else "inventory"
        raise SpecError(file, None, where, "has no hosts")
    return hosts


def load_inventory(path: str | Path, group: str | None = None) -> list[InventoryHost]:
    return parse_inventory_text(read_text_file(Path(path), "inventory file"), str(path), group)
