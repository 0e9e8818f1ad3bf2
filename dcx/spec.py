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

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from dcx import grammar
from dcx.errors import SpecError
from dcx.log import register_secret
from dcx.yamlsrc import Locator, load_yaml

API_VERSION = "dcx/v1"
PROVIDER_SECTIONS = ("local", "ssh", "aws", "gcp", "azure")
DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


class _Model(BaseModel):
    # Unknown fields are errors: a typo in a spec must not be silently ignored.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _checked(problem: str) -> None:
    if problem:
        raise ValueError(problem)


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

    # These reach the install script's environment, the certificate and the kubeconfig: each must be
    # what its place takes, never a shell word.
    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        _checked(grammar.version_problem(value) if value else "")
        return value

    @field_validator("tlsSAN")
    @classmethod
    def _sans(cls, value: list[str]) -> list[str]:
        for san in value:
            problem = grammar.address_problem(san)
            if problem:
                raise ValueError(f"'{san}' {problem}")
        return value

    @field_validator("loadBalancer")
    @classmethod
    def _load_balancer(cls, value: str) -> str:
        if value:
            _checked(grammar.host_port_problem(value.removeprefix("https://").rstrip("/")))
        return value


class SSHSpec(_Model):
    user: str = Field(default="root", min_length=1)
    port: int = Field(default=22, ge=1, le=65535, strict=True)
    privateKey: str = ""

    @field_validator("user")
    @classmethod
    def _user(cls, value: str) -> str:
        _checked(grammar.user_problem(value))
        return value


MASKED_PASSWORD = ":***@"  # how a proxy URL's password is recorded in state.json


class ProxySpec(_Model):
    """An HTTP(S) proxy for what the nodes download (packages, Docker's image pulls, k3s, dcx's own
    fetches). dcx adds the cluster's own ranges to noProxy itself (dcx.bootstrap.proxy)."""

    http: str = ""
    https: str = ""
    noProxy: list[str] = Field(default_factory=list)

    @field_validator("http", "https")
    @classmethod
    def _url(cls, value: str) -> str:
        value = value.strip()
        if value:
            _checked(grammar.proxy_url_problem(value))
            userinfo = grammar.proxy_userinfo(value)
            if ":" in userinfo:
                # The password is a secret: never in a log line or an error (the user name is no secret,
                # and redacting it would hide that word everywhere).
                register_secret(userinfo.partition(":")[2])
        return value

    @field_validator("noProxy", mode="before")
    @classmethod
    def _no_proxy(cls, value: Any) -> Any:
        if isinstance(value, str):  # NO_PROXY's own spelling: one comma-separated string
            value = [v.strip() for v in value.split(",") if v.strip()]
        for entry in value if isinstance(value, list) else []:
            if isinstance(entry, str):
                _checked(grammar.no_proxy_problem(entry))
        return value

    @field_serializer("http", "https")
    def _stored(self, value: str) -> str:
        # The spec is recorded in state.json, which holds no secret: the password is masked there.
        userinfo = grammar.proxy_userinfo(value)
        if ":" in userinfo:
            return value.replace(userinfo + "@", userinfo.partition(":")[0] + MASKED_PASSWORD, 1)
        return value

    @property
    def password_masked(self) -> bool:
        """Read back from state.json: the password is gone (writing it to nodes would write the mask)."""
        return any(MASKED_PASSWORD in url for url in (self.http, self.https))


class NetworkSpec(_Model):
    mesh: Literal["auto", "wireguard", "none"] = "auto"
    meshCIDR: str = "100.96.0.0/16"
    meshPort: int = Field(default=51820, ge=1, le=65535, strict=True)
    # Mesh pairs with no direct path go through a node both reach: any (auto), never (none), or only
    # the nodes named (see README, Relays).
    relays: Literal["auto", "none"] | list[str] = "auto"
    sshCIDR: str = ""
    # Where the Kubernetes API (6443, engine k3s) is opened from on cloud firewalls; "" = sshCIDR.
    apiCIDR: str = ""
    proxy: ProxySpec | None = None  # see README, Proxies

    @field_validator("meshCIDR")
    @classmethod
    def _mesh_cidr(cls, value: str) -> str:
        net = ipaddress.ip_network(value, strict=True)
        if net.version != 4 or net.prefixlen > 24:
            raise ValueError("must be an IPv4 network of /24 or larger")
        return value

    @field_validator("relays", mode="before")
    @classmethod
    def _relays(cls, value: Any) -> Any:
        if not isinstance(value, list) and value not in ("auto", "none"):
            raise ValueError("must be auto, none or a list of node names")
        if isinstance(value, list):
            if not value:
                raise ValueError("must name at least one node (or be auto or none)")
            for name in value:
                problem = grammar.hostname_problem(name) if isinstance(name, str) else "is not a node name"
                if problem:
                    raise ValueError(f"'{name}' {problem}")
            if len(set(value)) != len(value):
                raise ValueError("names a node twice")
        return value

    @field_validator("sshCIDR", "apiCIDR")
    @classmethod
    def _ssh_cidr(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(","))):
            ipaddress.ip_network(part, strict=False)
        return value


class PoolSpec(_Model):
    name: str = Field(pattern=DNS_LABEL, max_length=20)
    role: Literal["control", "worker"]
    count: int | None = Field(default=None, ge=1, le=5000, strict=True)  # strict: `count: true` is no 1
    provider: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    labels: dict[str, str] = Field(default_factory=dict)
    taints: list[str] = Field(default_factory=list)
    proxy: ProxySpec | None = None  # this pool's nodes use it instead of network.proxy ({} = none)
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
    """Raise a SpecError for the first error of a pydantic ValidationError, located in the file. An
    unknown field that is a near miss of a known one (`metdata:`) is named first, with the known name."""
    errors = exc.errors()
    err = errors[0]
    typo = _near_miss(errors, exc_model(exc))
    if typo is not None:
        err, known = typo
        path = prefix + tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
        raise locator.error(path, f"unknown field; did you mean '{known}'?") from None
    # Model-level validators report at the model path; pydantic appends no field there.
    path = prefix + tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
    raise locator.error(path, describe_validation_error(err)) from None


def exc_model(exc: ValidationError) -> type[BaseModel] | None:
    """The model a ValidationError came from (pydantic names it in `title`)."""
    for model in (ClusterSpec, ClusterBody, PoolSpec, EngineSpec, NetworkSpec, ProxySpec, SSHSpec, Metadata):
        if model.__name__ == exc.title:
            return model
    return None


def _near_miss(errors: list[Any], model: type[BaseModel] | None = None) -> tuple[Any, str] | None:
    """An unknown field that is a near miss of a known one: (the unknown field's error, the known name).
    A near miss of a missing field (`metdata:`) comes first: that is what the user meant to write."""
    import difflib

    missing: dict[tuple[Any, ...], list[str]] = {}
    for e in errors:
        if e["type"] == "missing" and e["loc"]:
            missing.setdefault(tuple(e["loc"][:-1]), []).append(str(e["loc"][-1]))
    extras = [e for e in errors if e["type"] == "extra_forbidden" and e["loc"]]
    for e in extras:
        close = difflib.get_close_matches(str(e["loc"][-1]), missing.get(tuple(e["loc"][:-1]), []), n=1, cutoff=0.6)
        if close:
            return e, close[0]
    if model is not None and extras and errors[0] is extras[0]:
        e = extras[0]
        close = difflib.get_close_matches(str(e["loc"][-1]), _fields_at(model, e["loc"][:-1]), n=1, cutoff=0.7)
        if close:
            return e, close[0]
    return None


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the model found at `loc` below `model` ([] when it is not a model)."""
    import typing

    node: Any = model
    for item in loc:
        if isinstance(item, str) and isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(item)
            node = field.annotation if field is not None else None
        elif isinstance(item, int):
            node = next(iter(typing.get_args(node)), None)  # list[X] -> X
        else:
            return []
        args = [a for a in typing.get_args(node) if a is not type(None)]
        if node is not None and typing.get_origin(node) is not list and len(args) == 1:
            node = args[0]  # X | None -> X
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    return []


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
    check_networks(spec)
    check_labels(spec)
    control = check_inventories(spec)
    check_control_count(spec, control)
    return spec


def check_labels(spec: ClusterSpec) -> None:
    """Label keys to Kubernetes' grammar (Docker takes those too); values to the engine's: Kubernetes'
    for k3s, any one-line text for swarm (Docker labels are free text). Taints as `kubectl taint` takes
    them. Located at the label or taint itself."""
    k3s = spec.spec.engine.type == "k3s"
    where: list[tuple[tuple[str | int, ...], dict[str, str]]] = [(("metadata", "labels"), spec.metadata.labels)]
    where += [(("spec", "pools", i, "labels"), p.labels) for i, p in enumerate(spec.spec.pools)]
    for path, labels in where:
        for key, value in labels.items():
            problem = grammar.label_key_problem(key) or (
                grammar.label_value_problem(value) if k3s else grammar.text_value_problem(value))
            if problem:
                raise spec.error((*path, key), problem)
    for i, pool in enumerate(spec.spec.pools):
        for j, taint in enumerate(pool.taints):
            problem = grammar.taint_problem(taint)
            if problem:
                raise spec.error(("spec", "pools", i, "taints", j), problem)


# Where each provider's section names a network of its own (pool settings are plain dicts here).
SUBNET_KEYS = ("subnet", "vpcCIDR", "subnetCIDR", "vnetCIDR")


def check_networks(spec: ClusterSpec) -> None:
    """The mesh range must not contain (or sit inside) a pool's network: routes to it would go to dcx0."""
    mesh = ipaddress.ip_network(spec.spec.network.meshCIDR)
    for i, pool in enumerate(spec.spec.pools):
        for key, value in pool.settings.items():
            if key not in SUBNET_KEYS or not isinstance(value, str):
                continue
            try:
                net = ipaddress.ip_network(value, strict=False)
            except ValueError:
                continue  # the provider's own validation names it
            if net.version == mesh.version and net.overlaps(mesh):
                raise spec.error(("spec", "network", "meshCIDR"),
                                 f"{mesh} overlaps pool {pool.name}'s {key} {net} (spec.pools[{i}].{pool.provider}"
                                 f".{key}); choose a mesh range apart from every pool's network")


def check_inventories(spec: ClusterSpec) -> int | None:
    """Read each ssh pool's inventory now, so that a bad one is refused before anything is written,
    with the spec's line as well as the inventory's. Returns the number of control nodes (None when
    unknown)."""
    from dcx.inventory import load_inventory

    control: int | None = 0
    for i, pool in enumerate(spec.spec.pools):
        inventory = pool.settings.get("inventory") if pool.provider == "ssh" else None
        inline = pool.settings.get("hosts") if pool.provider == "ssh" else None
        if isinstance(inline, list):
            names = [h.get("name") for h in inline if isinstance(h, dict)]
            dupes = sorted({str(n) for n in names if names.count(n) > 1})
            if dupes:
                raise spec.error(("spec", "pools", i, "ssh", "hosts"), f"hosts listed twice: {', '.join(dupes)}")
            if pool.count is not None and pool.count != len(inline):
                raise spec.error(("spec", "pools", i, "count"),
                                 f"is {pool.count} but the pool lists {len(inline)} hosts")
        if not isinstance(inventory, str) or not inventory:
            if pool.role == "control":
                if pool.count is not None and control is not None:
                    control += pool.count
                elif pool.provider == "ssh" and isinstance(pool.settings.get("hosts"), list):
                    control = None if control is None else control + len(pool.settings["hosts"])
                else:
                    control = None
            continue
        path = Path(inventory).expanduser()
        group = pool.settings.get("group")
        try:
            hosts = load_inventory(path if path.is_absolute() else spec.base_dir / path,
                                   group if isinstance(group, str) else None)
        except SpecError as exc:
            raise spec.error(("spec", "pools", i, "ssh", "inventory"), exc.message) from None
        if pool.count is not None and pool.count != len(hosts):  # as the ssh provider says it, but now
            raise spec.error(("spec", "pools", i, "count"),
                             f"is {pool.count} but the pool's inventory has {len(hosts)} hosts")
        if pool.role == "control" and control is not None:
            control += len(hosts)
        for h in hosts if spec.spec.engine.type == "k3s" else []:
            problem = grammar.labels_problem(h.labels)  # Kubernetes' grammar for k3s node labels
            if problem:
                raise spec.error(("spec", "pools", i, "ssh", "inventory"), f"host {h.name}: dcx_labels: {problem}")
    return control


def check_control_count(spec: ClusterSpec, control: int | None) -> None:
    """k3s keeps its state in embedded etcd: an even number of servers tolerates no more failures than
    one fewer, and two lose quorum when either stops (https://etcd.io/docs/v3.5/faq/)."""
    if spec.spec.engine.type != "k3s" or control is None or control % 2 == 1:
        return
    index = next(i for i, p in enumerate(spec.spec.pools) if p.role == "control")
    raise spec.error(("spec", "pools", index, "count"),
                     f"k3s needs an odd number of control nodes (1, 3, 5, ...): {control} would lose etcd "
                     f"quorum when any one of them stops")


def json_schema() -> dict[str, Any]:
    schema = ClusterSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "dcx Cluster"
    return schema


NODE_NAME_RE = re.compile(DNS_LABEL)


def node_name(cluster: str, pool: str, index: int) -> str:
    """Stable node names: cluster-pool-N (1-based). Hostnames and provider names derive from it."""
    return f"{cluster}-{pool}-{index}"
