"""The grammars of the places user values end up in: hostnames, addresses, login names, container and
Kubernetes labels, taints, versions. Each check returns "" when the value fits, else the reason in words
(the caller adds file, line and field). Nothing here imports pydantic or a provider.
"""

from __future__ import annotations

import ipaddress
import re

# RFC 1123 host names (what `hostname`, DNS and ssh accept), plus '_' that inventories use (Linux takes it).
_HOST_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
# Kubernetes label names (also fine as Docker labels): https://kubernetes.io/docs/concepts/overview/
# working-with-objects/labels/#syntax-and-character-set
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# Taint effects: https://kubernetes.io/docs/concepts/scheduling-eviction/taint-and-toleration/
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
# POSIX portable user names (useradd's default NAME_REGEX, with upper case allowed as sshd does).
_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?$")
# Release versions: 1.31.4, v1.31.4+k3s1, 24.0.7, 5:24.0.7-1~debian.12~bookworm (Debian epochs).
_VERSION = re.compile(r"^([0-9]+:)?v?[0-9]+(\.[0-9]+){0,3}([-+~][0-9A-Za-z.+~-]+)?$")


def hostname_problem(value: str) -> str:
    if not value:
        return "is empty"
    if len(value) > 253:
        return f"is {len(value)} characters long; a host name has at most 253"
    if not all(_HOST_LABEL.match(part) for part in value.rstrip(".").split(".")):
        return "is not a host name (letters, digits, '-' and '.'; at most 63 between dots)"
    return ""


def address_problem(value: str) -> str:
    """A host name or an IP address (IPv6 bare or in brackets)."""
    bare = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        ipaddress.ip_address(bare)
        return ""
    except ValueError:
        pass
    return hostname_problem(value).replace("a host name", "a host name or an IP address", 1)


def host_port_problem(value: str) -> str:
    """HOST, HOST:PORT, [V6]:PORT."""
    host, port = split_host_port(value)
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        return f"port '{port}' is not a number from 1 to 65535"
    return address_problem(host)


def split_host_port(value: str) -> tuple[str, str | None]:
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, (rest[1:] if rest.startswith(":") else None)
    if value.count(":") == 1:
        host, port = value.split(":")
        return host, port
    return value, None


def user_problem(value: str) -> str:
    if not _USER.match(value):
        return "is not a login name (letters, digits, '_', '.', '-'; not starting with '-' or a digit)"
    return ""


def version_problem(value: str) -> str:
    if len(value) > 100 or not _VERSION.match(value):
        return "is not a version (such as v1.31.4+k3s1 or 24.0.7)"
    return ""


def label_key_problem(key: str) -> str:
    """`[prefix/]name`: a DNS subdomain prefix of at most 253 characters, a name of at most 63."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return "is not a label key: the prefix before '/' must be a DNS subdomain (such as example.com)"
    if not _LABEL_NAME.match(name):
        return ("is not a label key: at most 63 letters, digits, '-', '_' and '.', starting and ending with a "
                "letter or digit (after an optional DNS prefix and '/')")
    return ""


def label_value_problem(value: str) -> str:
    """A Kubernetes label value."""
    if value and not _LABEL_NAME.match(value):
        return ("value must be empty or at most 63 letters, digits, '-', '_' and '.', starting and ending with a "
                "letter or digit")
    return ""


def text_value_problem(value: str) -> str:
    """A Docker label value: free text, but one line (it is shown in tables and passed as one argument)."""
    if len(value) > 1024 or not value.isprintable():
        return "value must be one line of printable text (at most 1024 characters)"
    return ""


def labels_problem(labels: dict[str, str], kubernetes: bool = True) -> str:
    value_problem = label_value_problem if kubernetes else text_value_problem
    for key, value in labels.items():
        problem = label_key_problem(str(key)) or value_problem(str(value))
        if problem:
            return f"label '{key}' {problem}" if problem.startswith("is ") else f"label '{key}': {problem}"
    return ""


def taint_problem(taint: str) -> str:
    """`key[=value]:Effect`, as `kubectl taint` takes it."""
    body, colon, effect = taint.rpartition(":")
    if not colon or effect not in TAINT_EFFECTS:
        return f"taint '{taint}' must be key[=value]:Effect with Effect one of {', '.join(TAINT_EFFECTS)}"
    key, _, value = body.partition("=")
    problem = label_key_problem(key) or label_value_problem(value)
    return f"taint '{taint}': key '{key}' {problem}" if problem.startswith("is ") else \
        (f"taint '{taint}': {problem}" if problem else "")


# Proxy URLs reach shell-sourced env files and systemd EnvironmentFile lines unquoted: only characters that
# mean nothing to either. Userinfo (a secret) is percent-encoded per RFC 3986; '*' is allowed for the
# redacted form dcx stores (`http://user:***@host`).
_PROXY_URL = re.compile(r"^(?P<scheme>https?)://(?:(?P<userinfo>[A-Za-z0-9._~%+*!-]+(?::[A-Za-z0-9._~%+*!-]*)?)@)?"
                        r"(?P<hostport>[^/@?#]+)/?$")
_NO_PROXY_ENTRY = re.compile(r"^[A-Za-z0-9.*:/_\[\]-]+$")


def proxy_url_problem(value: str) -> str:
    """http(s)://[user[:password]@]host[:port][/], nothing else (no path, query or fragment)."""
    m = _PROXY_URL.match(value)
    if not m:
        if not value.lower().startswith(("http://", "https://")):
            return "must be an http:// or https:// URL (http://host:port)"
        # Worded without "://user:password@", which the output's URL-password redaction would mask.
        return ("must be http(s)://host[:port] with no path, a user and password going before the host as "
                "user:password@; percent-encode other characters of the user and password")
    host, port = split_host_port(m.group("hostport"))
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        return f"port '{port}' is not a number from 1 to 65535"
    problem = address_problem(host)
    return f"host '{host}' {problem}" if problem else ""


def proxy_userinfo(value: str) -> str:
    """The user[:password] of a proxy URL ("" without one): a secret."""
    m = _PROXY_URL.match(value)
    return (m.group("userinfo") or "") if m else ""


def no_proxy_problem(entry: str) -> str:
    """One NO_PROXY entry: a host, .domain, *.domain, an address, a CIDR, or '*'."""
    if not entry or not _NO_PROXY_ENTRY.match(entry):
        return f"'{entry}' is not a host, domain, address or CIDR"
    return ""
