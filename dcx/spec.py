"""The declarative cluster spec (`cluster.yaml`): typed models and a loader with located errors.

The shape is Kubernetes-style (apiVersion/kind/metadata/spec). Provider sections of a pool
(`local:`, `ssh:`, `aws:`, ...) are kept as plain dicts here and validated by the provider's own
`settings_model`, so this module imports no provider and no cloud SDK.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dcx.errors import SpecError
from dcx.yamlsrc import Locator, load_yaml

API_VERSION = "dcx/v1"
PROVIDER_SECTIONS = ("local", "ssh", "aws", "gcp", "azure")
DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


class _Model(BaseModel):
    # Unknown fields are errors: a typo in a spec must not be silently ignored.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Metadata(_Model):
    name: str = Field(pattern=DNS_LABEL, max_length=24)
    labels: dict[str, str] = Field(default_factory=dict)


class AirgapSpec(_Model):
    """k3s without internet: files on this machine that dcx uploads (paths relative to the spec file)."""

    binary: str
    binarySha256: str = ""
    images: str = ""
    imagesSha256: str = ""
    installScript: str = ""  # k3s's install.sh (https://get.k3s.io), saved beforehand: it writes the services

    @field_validator("binarySha256", "imagesSha256")
    @classmethod
    def _sha256(cls, value: str) -> str:
        value = value.strip().lower()
        if value and not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("must be a SHA-256 digest (64 hex digits)")
        return value


class EngineSpec(_Model):
    type: Literal["swarm", "k3s"] = "swarm"
    version: str = ""
    airgap: AirgapSpec | None = None
    tlsSAN: list[str] = Field(default_factory=list)
    # k3s: a name or address (optionally :port) in front of the servers' API: added to the certificate
    # and used in the kubeconfig dcx writes.
    loadBalancer: str = ""


class SSHSpec(_Model):
    user: str = Field(default="root", min_length=1)
    port: int = Field(default=22, ge=1, le=65535)
    privateKey: str = ""


class NetworkSpec(_Model):
    mesh: Literal["auto", "wireguard", "none"] = "auto"
    meshCIDR: str = "100.96.0.0/16"
    meshPort: int = Field(default=51820, ge=1, le=65535)
    sshCIDR: str = ""

    @field_validator("meshCIDR")
    @classmethod
    def _mesh_cidr(cls, value: str) -> str:
        net = ipaddress.ip_network(value, strict=True)
        if net.version != 4 or net.prefixlen > 24:
            raise ValueError("must be an IPv4 network of /24 or larger")
        return value

    @field_validator("sshCIDR")
    @classmethod
    def _ssh_cidr(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(","))):
            ipaddress.ip_network(part, strict=False)
        return value


class PoolSpec(_Model):
    name: str = Field(pattern=DNS_LABEL, max_length=20)
    role: Literal["control", "worker"]
    count: int | None = Field(default=None, ge=1, le=5000)
    provider: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    labels: dict[str, str] = Field(default_factory=dict)
    taints: list[str] = Field(default_factory=list)
    local: dict[str, Any] | None = None
    ssh: dict[str, Any] | None = None
    aws: dict[str, Any] | None = None
    gcp: dict[str, Any] | None = None
    azure: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _sections_match_provider(self) -> PoolSpec:
        for section in PROVIDER_SECTIONS:
            if getattr(self, section) is not None and section != self.provider:
                raise ValueError(f"has a '{section}' section but provider is '{self.provider}'")
        if self.count is None and self.provider != "ssh":
            raise ValueError("count is required")
        return self

    @property
    def settings(self) -> dict[str, Any]:
        return dict(getattr(self, self.provider, None) or {}) if self.provider in PROVIDER_SECTIONS else {}


class ClusterBody(_Model):
    engine: EngineSpec = Field(default_factory=EngineSpec)
    ssh: SSHSpec = Field(default_factory=SSHSpec)
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    pools: list[PoolSpec] = Field(min_length=1)

    @field_validator("pools")
    @classmethod
    def _pools(cls, pools: list[PoolSpec]) -> list[PoolSpec]:
        names = [p.name for p in pools]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"pool names must be unique; repeated: {', '.join(dupes)}")
        if not any(p.role == "control" for p in pools):
            raise ValueError("at least one pool must have role: control")
        return pools


class ClusterSpec(_Model):
    apiVersion: Literal["dcx/v1"]
    kind: Literal["Cluster"]
    metadata: Metadata
    spec: ClusterBody

    # Set by load(): where the spec came from, for messages and for resolving relative paths.
    _file: str = ""
    _locator: Locator | None = None

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def file(self) -> str:
        return self._file

    @property
    def base_dir(self) -> Path:
        return Path(self._file).resolve().parent if self._file else Path.cwd()

    def error(self, path: tuple[str | int, ...], problem: str, hint: str | None = None) -> SpecError:
        """A located error for a field of this spec (used by providers validating their sections)."""
        if self._locator is None:
            return SpecError(self._file or "<spec>", None, ".".join(map(str, path)), problem, hint)
        return self._locator.error(path, problem, hint)

    def pool(self, name: str) -> PoolSpec:
        for p in self.spec.pools:
            if p.name == name:
                return p
        raise KeyError(name)


_MESSAGES = {
    "missing": lambda e: "is required",
    "extra_forbidden": lambda e: "unknown field",
    "greater_than_equal": lambda e: f"must be >= {e['ctx']['ge']}",
    "less_than_equal": lambda e: f"must be <= {e['ctx']['le']}",
    "too_short": lambda e: f"must have at least {e['ctx'].get('min_length', 1)} item(s)",
    "string_too_short": lambda e: f"must be at least {e['ctx']['min_length']} character(s)",
    "string_too_long": lambda e: f"must be at most {e['ctx']['max_length']} characters",
    "int_parsing": lambda e: "must be an integer",
    "int_type": lambda e: "must be an integer",
    "int_from_float": lambda e: "must be an integer",
    "string_type": lambda e: "must be a string",
    "bool_type": lambda e: "must be true or false",
    "bool_parsing": lambda e: "must be true or false",
    "dict_type": lambda e: "must be a mapping",
    "model_type": lambda e: "must be a mapping",
    "model_attributes_type": lambda e: "must be a mapping",
    "list_type": lambda e: "must be a list",
    "literal_error": lambda e: "must be one of: " + e["ctx"]["expected"].replace("'", "").replace(" or ", ", "),
    "string_pattern_mismatch": lambda e: "must be lowercase letters, digits and '-', starting with a letter",
}


def describe_validation_error(err: dict[str, Any]) -> str:
    """Turn one pydantic error into the short phrase users see after the field name."""
    make = _MESSAGES.get(err["type"])
    if make is not None:
        try:
            return make(err)
        except (KeyError, TypeError):
            pass
    msg = str(err.get("msg", "is invalid"))
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg[:1].lower() + msg[1:]


def raise_located(exc: ValidationError, locator: Locator, prefix: tuple[str | int, ...] = ()) -> None:
    """Raise a SpecError for the first error of a pydantic ValidationError, located in the file."""
    err = exc.errors()[0]
    # Model-level validators report at the model path; pydantic appends no field there.
    path = prefix + tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
    raise locator.error(path, describe_validation_error(err)) from None


def _first_yaml_problem(data: Any) -> str | None:
    if not isinstance(data, dict):
        return "the file must be a YAML mapping with apiVersion, kind, metadata and spec"
    return None


def load(path: str | Path) -> ClusterSpec:
    """Load and validate a cluster spec; raise SpecError with `file:line: field: problem`."""
    data, locator = load_yaml(path)
    problem = _first_yaml_problem(data)
    if problem:
        raise SpecError(str(path), 1, "", problem)
    try:
        spec = ClusterSpec.model_validate(data)
    except ValidationError as exc:
        raise_located(exc, locator)
    spec._file = str(path)
    spec._locator = locator
    return spec


def json_schema() -> dict[str, Any]:
    schema = ClusterSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "dcx Cluster"
    return schema


NODE_NAME_RE = re.compile(DNS_LABEL)


def node_name(cluster: str, pool: str, index: int) -> str:
    """Stable node names: cluster-pool-N (1-based). Hostnames and provider names derive from it."""
    return f"{cluster}-{pool}-{index}"
