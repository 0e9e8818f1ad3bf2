"""The provider interface.

A provider makes machines (or adopts existing ones) and returns plain `Node` records. It never talks
SSH: bootstrap does that. Cloud SDKs are imported inside methods, never at module import, so that
`dcx --help` and local-only runs stay fast.

Every resource a provider makes carries the cluster's name and id (tags, labels, names) so that
`sweep` can find it again even when the local state is gone. Before an API call that creates
something, the provider records its intent through `ctx.record` (write-ahead), so a killed run can be
resumed and destroyed.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel

from dcx.errors import ProviderError


@dataclass
class Node:
    """A reachable machine, as bootstrap needs it."""

    name: str
    pool: str
    provider: str
    role: str  # "control" | "worker"
    ssh_address: str  # the address dcx connects to
    private_address: str = ""  # the address other nodes reach it on inside its network
    public_address: str = ""
    ssh_user: str = "root"
    ssh_port: int = 22
    ssh_key: str = ""  # path of the private key file; "" means the cluster key
    provider_ids: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    network: str = ""  # nodes with the same non-empty network reach each other's private addresses
    mesh_endpoint: str = ""  # host:port other sites use to reach this node's WireGuard port
    # The hostname bootstrap gives the machine, for clouds whose own names are not unique or useful
    # (EC2's ip-10-0-0-5 repeats across regions); "" leaves the machine's hostname as it is.
    hostname: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Node:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class FoundCluster:
    """A cluster a provider sees in the account by its tags/labels (sweep safety: destroy without
    state lists these when several clusters share a name, so one is chosen by id)."""

    id: str
    name: str
    provider: str
    where: str  # region / project / resource group / host: where the provider found it
    created: str = ""  # ISO time the provider recorded at creation, "" when unknown
    created_by: str = ""  # the caller identity the cloud reported at creation, "" when unknown


@dataclass
class NodeRequest:
    """One machine the plan wants: its name is final and stable (cluster-pool-index)."""

    name: str
    pool: str
    role: str
    index: int


@dataclass
class ProviderContext:
    cluster_name: str
    cluster_id: str
    ssh_public_key: str
    ssh_private_key_path: Path
    workdir: Path  # per-cluster, per-provider directory for the provider's own files (0700)
    journal: Callable[[str, Any], None]  # write-ahead journal: persists resources[key] = value (None deletes)
    resources: dict[str, Any]  # what was recorded so far (the cluster state's `resources`)
    log: logging.Logger
    network: Any = None  # the spec's NetworkSpec (sshCIDR, mesh settings)
    spec: Any = None  # the ClusterSpec being applied (None when destroying from state alone)
    ssh_user: str = "root"  # the spec's ssh.user: the login user on machines dcx makes

    def record(self, key: str, value: Any) -> None:
        """Record a resource (or the intent to make one) before/after the API call that makes it."""
        self.journal(key, value)

    def recorded(self, key: str) -> Any:
        return self.resources.get(key)

    def recorded_keys(self, prefix: str) -> list[str]:
        return [k for k in self.resources if k.startswith(prefix)]


class Provider(ABC):
    """Base class of every provider. Subclasses set `name` and `settings_model`."""

    name: ClassVar[str]
    # The pydantic model of the pool's provider section (e.g. `local: {subnet: ...}`).
    settings_model: ClassVar[type[BaseModel]]

    def __init__(self, ctx: ProviderContext) -> None:
        self.ctx = ctx

    def check_prerequisites(self) -> None:  # noqa: B027 - optional hook
        """Raise PrerequisiteMissing/ProviderError when this machine or account cannot work."""

    @abstractmethod
    def create_nodes(self, pool: Any, requests: list[NodeRequest]) -> list[Node]:
        """Make (or find, when they exist already) the machines for `requests`. Idempotent."""

    @abstractmethod
    def list_nodes(self, pools: list[Any]) -> list[Node]:
        """The cluster's machines that exist now, found by tag/label/name (not from state)."""

    @abstractmethod
    def delete_nodes(self, pools: list[Any], nodes: list[Node]) -> None:
        """Remove these machines. Idempotent: a node already gone is not an error."""

    @abstractmethod
    def sweep(self, pools: list[Any]) -> list[str]:
        """Delete every remaining resource carrying the cluster's identity; return what was deleted."""

    def find_clusters(self, pools: list[Any]) -> list[FoundCluster]:
        """Clusters named ctx.cluster_name that this provider can see (by tags/labels/registry), one
        entry per cluster id and place. Used by destroy when the local state is gone. Default: none."""
        return []

    # True for providers of machines dcx did not make (ssh): destroy resets them instead of deleting.
    resets_machines: ClassVar[bool] = False

    def node_requests(self, pool: Any) -> list[NodeRequest] | None:
        """The pool's nodes by name, when the provider decides them (an inventory); None: count-based."""
        return None

    def repair_nodes(self, pools: list[Any], nodes: list[Node]) -> list[Node]:
        """Bring existing machines back to a reachable state (restart what stopped). Default: as they are."""
        return nodes

    def become_password(self, node: Node) -> str | None:
        """A sudo password this provider knows for the node (an inventory's); None: use -K's, if any."""
        return None

    def allow_mesh_peers(self, pools: list[Any], peers: list[str], port: int) -> None:  # noqa: B027
        """Open the mesh UDP `port` to exactly these public addresses (the cluster's nodes in other
        networks), and to no others; called after every provisioning, with no peers when the cluster
        spans no networks. Idempotent: addresses no longer listed lose their rule. Default: nothing to
        open (no provider firewall)."""


def peer_cidrs(peers: list[str], firewall: str) -> list[str]:
    """The /32s a firewall rule for mesh peers lists: IPv4 addresses as they are, names (an ssh host's
    address may be one) resolved here. `firewall` names the rule's home for the error."""
    out = set()
    for peer in peers:
        try:
            out.add(f"{ipaddress.IPv4Address(peer)}/32")
            continue
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(peer, None, socket.AF_INET, socket.SOCK_DGRAM)
        except OSError:
            raise ProviderError(f"cannot resolve mesh peer '{peer}' to an IPv4 address for {firewall}",
                                hint="give the host an IPv4 address (or a mesh endpoint) in its pool") from None
        out |= {f"{info[4][0]}/32" for info in infos}
    return sorted(out)
