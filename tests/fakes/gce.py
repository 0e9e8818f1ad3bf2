"""A local HTTP fake of the Compute Engine REST API subset dcx uses, for the real google-cloud-compute
client (pointed at it with `client_options={"api_endpoint": fake.url}`).

State lives in memory. Requests the real API would reject by shape are rejected the same way (400
with an `errors[].reason`), duplicates give 409 alreadyExists, a network still used by subnetworks,
firewalls or instances gives 400 resourceInUseByAnotherResource. Each rule names its reference beside
it: resource names (RFC 1035, at most 63), labels (charset, 63 characters, at most 64), boot disk types
per machine series (the default pd-standard is refused by C3/C3D/H3 and the 4th generation), request
ids (a UUID; replayed for 60 minutes, then forgotten: `advance()` moves the fake's clock). Mutations
return an Operation that is RUNNING and becomes DONE at its next get/wait.
`fail_next(n, status)` answers the next n requests with 429/503. `on_insert`/`on_delete`
hooks see an instance when it starts RUNNING and when it is gone (tests boot namespace hosts there).

Authentication: `credentials_file()` writes a service-account key whose token_uri is this fake's
/token; every Compute request must carry a bearer token that is either a JWT signed by that key (the
client library signs one itself) or an access token /token issued.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import itertools
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fakes.server import LoopbackServer

NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
ZONE_RE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")
REGION_RE = re.compile(r"^[a-z]+-[a-z]+[0-9]+$")
LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE_RE = re.compile(r"^[a-z0-9_-]{0,63}$")
METADATA_KEY_RE = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
IMAGE_RE = re.compile(r"^(https://www\.googleapis\.com/compute/v1/)?(projects/[a-z][-a-z0-9.:]*/)?"
                      r"global/images/(family/)?[a-z]([-a-z0-9]*[a-z0-9])?$")
PORT_RE = re.compile(r"^\d{1,5}(-\d{1,5})?$")
PROTOCOLS = {"tcp", "udp", "icmp", "esp", "ah", "sctp", "ipip", "all"}
MACHINE_TYPES = {"e2-micro", "e2-small", "e2-medium", "e2-standard-2", "e2-standard-4", "e2-standard-8",
                 "n1-standard-1", "n2-standard-2", "n2-standard-4", "n2d-standard-2", "t2d-standard-1",
                 "t2a-standard-1", "c3-standard-4", "c3d-standard-4", "h3-standard-88", "c4-standard-2",
                 "c4a-standard-1", "c4d-standard-2", "n4-standard-2", "n4a-standard-1"}
# Disk types (Compute Engine docs, "Choose a disk type"); AttachedDiskInitializeParams.diskType: "If
# not specified, the default is pd-standard".
DISK_TYPES = {"pd-standard", "pd-balanced", "pd-ssd", "pd-extreme", "hyperdisk-balanced", "hyperdisk-extreme",
              "hyperdisk-throughput", "hyperdisk-ml", "hyperdisk-balanced-high-availability"}
# Disk types a machine series refuses ("Machine series comparison", "About Hyperdisk": the 4th
# generation takes Hyperdisk only; C3, C3D and H3 take no Standard (or Extreme) Persistent Disk). Only
# the series listed here are checked: for the others the fake accepts every type (never stricter).
PERSISTENT_DISK = {"pd-standard", "pd-balanced", "pd-ssd", "pd-extreme"}
REFUSED_DISK_TYPES = {**{s: PERSISTENT_DISK for s in ("c4", "c4a", "c4d", "n4", "n4a", "n4d")},
                      **{s: {"pd-standard", "pd-extreme"} for s in ("c3", "c3d", "h3")}}
# "About Hyperdisk": Hyperdisk Extreme, Throughput and ML volumes cannot be boot disks.
NOT_BOOT = {"hyperdisk-extreme", "hyperdisk-throughput", "hyperdisk-ml"}
DEFAULT_REGIONS = ("us-central1", "us-east1", "europe-west1")
PUBLIC_POOLS = ("203.0.113.0/24", "198.51.100.0/24", "192.0.2.0/24")  # documentation ranges: never routed
BASE = "https://www.googleapis.com/compute/v1/"
REQUEST_ID_TTL = 60 * 60.0  # seconds a requestId is kept (see GceFake._replay)


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.status, "message": self.message,
                          "errors": [{"message": self.message, "domain": "global", "reason": self.reason}]}}


def bad(field: str, value: Any, why: str = "") -> ApiError:
    text = f"Invalid value for field '{field}': '{value}'." + (f" {why}" if why else "")
    return ApiError(400, "invalid", text)


def not_found(path: str) -> ApiError:
    return ApiError(404, "notFound", f"The resource '{path}' was not found")


class GceFake(LoopbackServer):
    """The fake's state and its HTTP server. Use as a context manager (or start()/close())."""

    def __init__(self, projects: tuple[str, ...] = ("dcx-test",), regions: tuple[str, ...] = DEFAULT_REGIONS,
                 instance_quota: int = 10_000) -> None:
        self.projects = set(projects)
        self.regions = set(regions)
        self.instance_quota = instance_quota
        self.lock = threading.RLock()
        self.instances: dict[tuple[str, str, str], dict[str, Any]] = {}  # (project, zone, name)
        self.networks: dict[tuple[str, str], dict[str, Any]] = {}
        self.subnetworks: dict[tuple[str, str, str], dict[str, Any]] = {}  # (project, region, name)
        self.firewalls: dict[tuple[str, str], dict[str, Any]] = {}
        self.operations: dict[tuple[str, str], dict[str, Any]] = {}  # (project, name) -> op
        self._op_actions: dict[str, Callable[[], list[tuple[str, dict[str, Any]]]]] = {}
        # (project, requestId) -> (operation name, when first seen on the fake's clock)
        self.request_ids: dict[tuple[str, str], tuple[str, float]] = {}
        self.clock_offset = 0.0  # advance(): the fake's clock runs ahead of the machine's
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, failures included
        self._failures: list[tuple[int, str, bool]] = []
        self._ids = itertools.count(int(time.time()) * 1000)
        self._public: set[str] = set()
        self._public_cursor = 0
        self.tokens: set[str] = set()
        self.on_insert: Callable[[dict[str, Any]], None] | None = None
        self.on_delete: Callable[[dict[str, Any]], None] | None = None
        self._public_key_pem: bytes | None = None
        super().__init__(_handler(self), "gce-fake")

    # --- test API --------------------------------------------------------------------------------

    def fail_next(self, n: int, status: int = 429, path_contains: str = "", after: bool = False) -> None:
        """Answer the next `n` Compute requests (whose path contains `path_contains`) with `status`.
        `after`: do the request first, then answer with the error (the reply was lost on the way)."""
        with self.lock:
            self._failures.extend([(status, path_contains, after)] * n)

    def now(self) -> float:
        return time.time() + self.clock_offset

    def advance(self, seconds: float) -> None:
        """Move the fake's clock on (request ids older than REQUEST_ID_TTL are then forgotten)."""
        with self.lock:
            self.clock_offset += seconds

    def count(self, method: str = "", contains: str = "") -> int:
        with self.lock:
            return sum(1 for m, p in self.requests if (not method or m == method) and contains in p)

    def reset_counts(self) -> None:
        with self.lock:
            self.requests.clear()

    def credentials_file(self, path: Path, project: str = "dcx-test") -> Path:
        """A service-account key file (a fresh RSA key) whose token_uri is this fake's /token."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        self._public_key_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        info = {"type": "service_account", "project_id": project, "private_key_id": secrets.token_hex(20),
                "private_key": pem, "client_email": f"dcx-test@{project}.iam.gserviceaccount.com",
                "client_id": "1234567890", "token_uri": f"{self.url}/token"}
        path.write_text(json.dumps(info))
        path.chmod(0o600)
        return path

    def add_network(self, project: str, name: str, subnets: dict[str, tuple[str, str]] | None = None) -> None:
        """Pre-existing infrastructure (a user's own VPC): subnets maps name -> (region, cidr)."""
        with self.lock:
            self._insert_network(project, {"name": name, "autoCreateSubnetworks": False})
            for sname, (region, cidr) in (subnets or {}).items():
                self._insert_subnetwork(project, region, {"name": sname, "ipCidrRange": cidr,
                                                          "network": f"global/networks/{name}"})

    def all_resources(self) -> dict[str, list[str]]:
        with self.lock:
            return {"instances": sorted(k[2] for k in self.instances),
                    "firewalls": sorted(k[1] for k in self.firewalls), "networks": sorted(k[1] for k in self.networks),
                    "subnetworks": sorted(k[2] for k in self.subnetworks)}

    # --- authentication -------------------------------------------------------------------------

    def check_auth(self, header: str) -> None:
        if not header.startswith("Bearer "):
            raise ApiError(401, "required", "Request is missing required authentication credential.")
        token = header[len("Bearer "):].strip()
        with self.lock:
            if token in self.tokens:
                return
        if self._public_key_pem is not None and token.count(".") == 2 and self._jwt_ok(token):
            return
        raise ApiError(401, "authError", "Invalid Credentials")

    def _jwt_ok(self, token: str) -> bool:
        from google.auth import jwt

        try:
            jwt.decode(token, certs=self._public_key_pem, verify=True)
        except ValueError:
            return False
        return True

    def issue_token(self, form: dict[str, list[str]]) -> dict[str, Any]:
        grant = form.get("grant_type", [""])[0]
        if grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            assertion = form.get("assertion", [""])[0]
            if not (self._public_key_pem and self._jwt_ok(assertion)):
                raise ApiError(400, "invalid_grant", "invalid JWT signature")
        elif grant != "refresh_token" or not form.get("refresh_token"):
            raise ApiError(400, "unsupported_grant_type", "unsupported grant type")
        token = "ya29.fake-" + secrets.token_urlsafe(24)
        with self.lock:
            self.tokens.add(token)
        return {"access_token": token, "expires_in": 3600, "token_type": "Bearer"}

    # --- helpers --------------------------------------------------------------------------------

    def _check_project(self, project: str) -> None:
        if project not in self.projects:
            raise not_found(f"projects/{project}")

    def _check_zone(self, zone: str) -> None:
        if not ZONE_RE.match(zone):
            raise bad("zone", zone, "Must be a zone name such as us-central1-a.")
        if zone[:-2] not in self.regions:
            raise not_found(f"zones/{zone}")

    def _check_region(self, region: str) -> None:
        if not REGION_RE.match(region):
            raise bad("region", region)
        if region not in self.regions:
            raise not_found(f"regions/{region}")

    def _new_id(self) -> str:
        return str(next(self._ids))

    def _request_id(self, project: str, query: dict[str, list[str]]) -> str | None:
        rid = query.get("requestId", [""])[0]
        if not rid:
            return None
        try:
            if uuid.UUID(rid).int == 0:
                raise ValueError
        except ValueError:
            raise bad("requestId", rid, "The request ID must be a valid UUID with the exception that zero "
                                        "UUID is not supported.") from None
        return rid

    def _operation(self, project: str, scope: str, kind: str, target: str, rid: str | None,
                   action: Callable[[], list[tuple[str, dict[str, Any]]]] | None = None) -> dict[str, Any]:
        """A RUNNING operation; `action` runs when it becomes DONE and returns hook events."""
        name = f"operation-{int(time.time() * 1000)}-{secrets.token_hex(6)}"
        op = {"kind": "compute#operation", "id": self._new_id(), "name": name, "operationType": kind,
              "targetLink": BASE + target, "status": "RUNNING", "progress": 0, "user": "dcx-test",
              "insertTime": time.strftime("%Y-%m-%dT%H:%M:%S.000-00:00", time.gmtime()),
              "selfLink": f"{BASE}projects/{project}/{scope}/operations/{name}"}
        if scope.startswith("zones/"):
            op["zone"] = BASE + f"projects/{project}/{scope}"
        elif scope.startswith("regions/"):
            op["region"] = BASE + f"projects/{project}/{scope}"
        self.operations[(project, name)] = op
        if action is not None:
            self._op_actions[name] = action
        if rid:
            self.request_ids[(project, rid)] = (name, self.now())
        return op

    def _finish(self, project: str, scope: str, name: str) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
        op = self.operations.get((project, name))
        if op is None or not op["selfLink"].endswith(f"/{scope}/operations/{name}"):
            raise not_found(f"projects/{project}/{scope}/operations/{name}")
        events: list[tuple[str, dict[str, Any]]] = []
        if op["status"] != "DONE":
            action = self._op_actions.pop(name, None)
            if action is not None:
                try:
                    events = action()
                except ApiError as exc:
                    code = re.sub(r"(?<!^)(?=[A-Z])", "_", exc.reason).upper()  # quotaExceeded -> QUOTA_EXCEEDED
                    op["error"] = {"errors": [{"code": code, "message": exc.message}]}
                    op["httpErrorStatusCode"] = exc.status
                    op["httpErrorMessage"] = {400: "BAD REQUEST", 403: "FORBIDDEN", 409: "CONFLICT"}.get(
                        exc.status, "ERROR")
            op.update(status="DONE", progress=100,
                      endTime=time.strftime("%Y-%m-%dT%H:%M:%S.000-00:00", time.gmtime()))
        return copy.deepcopy(op), events

    def _link(self, value: str, kind: str, project: str) -> tuple[str, str, str]:
        """Resolve a full or partial resource URL to (project, scope-name, name)."""
        value = value.removeprefix(BASE).removeprefix("https://compute.googleapis.com/compute/v1/")
        m = re.match(r"^(?:projects/([^/]+)/)?(?:(global)|regions/([^/]+))/" + kind + r"/([^/]+)$", value)
        if not m:
            raise bad(kind, value)
        return m.group(1) or project, m.group(3) or "global", m.group(4)

    # --- networks -------------------------------------------------------------------------------

    def _insert_network(self, project: str, body: dict[str, Any]) -> dict[str, Any]:
        name = _name(body)
        if "IPv4Range" in body:
            raise bad("resource.IPv4Range", body["IPv4Range"], "Legacy networks are not supported.")
        if (project, name) in self.networks:
            raise ApiError(409, "alreadyExists", f"The resource 'projects/{project}/global/networks/{name}' "
                                                 "already exists")
        auto = bool(body.get("autoCreateSubnetworks", False))
        net = {**body, "kind": "compute#network", "id": self._new_id(), "name": name,
               "autoCreateSubnetworks": auto, "selfLink": f"{BASE}projects/{project}/global/networks/{name}",
               "subnetworks": [], "routingConfig": body.get("routingConfig", {"routingMode": "REGIONAL"})}
        self.networks[(project, name)] = net
        if auto:  # auto mode: one subnetwork per region, named after the network
            for i, region in enumerate(sorted(self.regions)):
                self._insert_subnetwork(project, region, {"name": name, "ipCidrRange": f"10.{128 + i}.0.0/20",
                                                          "network": net["selfLink"]}, auto=True)
        return net

    def _network_users(self, project: str, name: str) -> list[str]:
        link = f"{BASE}projects/{project}/global/networks/{name}"
        users = [s["selfLink"] for s in self.subnetworks.values() if s["network"] == link and not s.get("_auto")]
        users += [f["selfLink"] for f in self.firewalls.values() if f["network"] == link]
        users += [i["selfLink"] for i in self.instances.values()
                  if any(n["network"] == link for n in i["networkInterfaces"])]
        return users

    def _insert_subnetwork(self, project: str, region: str, body: dict[str, Any], auto: bool = False,
                           ) -> dict[str, Any]:
        name = _name(body)
        if (project, region, name) in self.subnetworks:
            raise ApiError(409, "alreadyExists",
                           f"The resource 'projects/{project}/regions/{region}/subnetworks/{name}' already exists")
        if "network" not in body:
            raise bad("resource.network", "", "Required field 'resource.network' not specified")
        nproject, _, nname = self._link(body["network"], "networks", project)
        net = self.networks.get((nproject, nname))
        if net is None:
            raise not_found(f"projects/{nproject}/global/networks/{nname}")
        try:
            cidr = ipaddress.ip_network(body.get("ipCidrRange", ""), strict=True)
        except ValueError:
            raise bad("resource.ipCidrRange", body.get("ipCidrRange", "")) from None
        if cidr.version != 4 or cidr.prefixlen > 29 or not cidr.is_private:
            raise bad("resource.ipCidrRange", str(cidr), "Must be a private IPv4 range of /29 or larger.")
        for other in self.subnetworks.values():
            if other["network"] == net["selfLink"] and ipaddress.ip_network(other["ipCidrRange"]).overlaps(cidr):
                raise bad("resource.ipCidrRange", str(cidr),
                          f"Conflicts with existing subnetwork '{other['name']}' in region '{other['region']}'.")
        hosts = list(cidr.hosts())
        sub = {**body, "kind": "compute#subnetwork", "id": self._new_id(), "name": name,
               "network": net["selfLink"], "ipCidrRange": str(cidr), "gatewayAddress": str(hosts[0]),
               "region": f"{BASE}projects/{project}/regions/{region}",
               "selfLink": f"{BASE}projects/{project}/regions/{region}/subnetworks/{name}",
               # GCP keeps the first two and the last two addresses of a range.
               "_free": [str(h) for h in hosts[1:-1]]}
        if auto:
            sub["_auto"] = True
        self.subnetworks[(project, region, name)] = sub
        net["subnetworks"].append(sub["selfLink"])
        return sub

    # --- firewalls ------------------------------------------------------------------------------

    def _check_firewall(self, project: str, fw: dict[str, Any]) -> None:
        _name(fw)
        direction = fw.setdefault("direction", "INGRESS")
        if direction not in ("INGRESS", "EGRESS"):
            raise bad("resource.direction", direction)
        if bool(fw.get("allowed")) == bool(fw.get("denied")):
            raise bad("resource.allowed", "", "Exactly one of 'allowed' or 'denied' must be specified.")
        for i, rule in enumerate(fw.get("allowed") or fw.get("denied")):
            proto = str(rule.get("IPProtocol", ""))
            if proto not in PROTOCOLS and not (proto.isdigit() and 0 <= int(proto) <= 255):
                raise bad(f"resource.allowed[{i}].IPProtocol", proto)
            ports = rule.get("ports", [])
            if ports and proto not in ("tcp", "udp", "sctp", "all"):
                raise bad(f"resource.allowed[{i}].ports", ports, "Ports may only be given for tcp, udp or sctp.")
            for port in ports:
                if not PORT_RE.match(str(port)) or any(int(p) > 65535 for p in str(port).split("-")):
                    raise bad(f"resource.allowed[{i}].ports", port)
        for cidr in fw.get("sourceRanges", []) + fw.get("destinationRanges", []):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise bad("resource.sourceRanges", cidr) from None
        for tag in fw.get("sourceTags", []) + fw.get("targetTags", []):
            if not NAME_RE.match(tag):
                raise bad("resource.targetTags", tag)
        if direction == "INGRESS" and not (fw.get("sourceRanges") or fw.get("sourceTags")
                                           or fw.get("sourceServiceAccounts")):
            fw["sourceRanges"] = ["0.0.0.0/0"]  # as the real API: no source means everyone
        priority = int(fw.setdefault("priority", 1000))
        if not 0 <= priority <= 65535:
            raise bad("resource.priority", priority)
        nproject, _, nname = self._link(fw.get("network") or "global/networks/default", "networks", project)
        if (nproject, nname) not in self.networks:
            raise not_found(f"projects/{nproject}/global/networks/{nname}")
        fw["network"] = f"{BASE}projects/{nproject}/global/networks/{nname}"

    # --- instances ------------------------------------------------------------------------------

    def _check_instance(self, project: str, zone: str, props: dict[str, Any], bulk: bool) -> dict[str, Any]:
        """Validate instance properties; return them resolved (network, subnetwork links)."""
        region = zone[:-2]
        mt = props.get("machineType", "")
        if not mt:
            raise bad("resource.machineType", "", "Required field 'resource.machineType' not specified")
        if bulk:
            if "/" in mt:  # the real API documents an error for URLs here: names only
                raise bad("resource.instanceProperties.machineType", mt, "Only machine type names are accepted.")
            mt_name = mt
        else:
            m = re.match(r"^(?:.*/)?zones/([^/]+)/machineTypes/([^/]+)$", mt)
            if not m or m.group(1) != zone:
                raise bad("resource.machineType", mt)
            mt_name = m.group(2)
        if mt_name not in MACHINE_TYPES:
            raise not_found(f"projects/{project}/zones/{zone}/machineTypes/{mt_name}")
        disks = props.get("disks") or []
        if not any(d.get("boot") for d in disks):
            raise bad("resource.disks", "", "A boot disk is required.")
        for i, d in enumerate(disks):
            init = d.get("initializeParams") or {}
            if d.get("boot") and not d.get("source"):
                if not IMAGE_RE.match(init.get("sourceImage", "")):
                    raise bad(f"resource.disks[{i}].initializeParams.sourceImage", init.get("sourceImage", ""))
            dtype = init.get("diskType") or "pd-standard"
            m = re.fullmatch(r"(?:.*/)?zones/([^/]+)/diskTypes/([^/]+)", dtype)
            if m and m.group(1) != zone:
                raise bad(f"resource.disks[{i}].initializeParams.diskType", dtype, "Must be in the instance's zone.")
            dname = m.group(2) if m else dtype
            if "/" in dname or dname not in DISK_TYPES:
                raise not_found(f"projects/{project}/zones/{zone}/diskTypes/{dname}")
            if d.get("boot") and dname in NOT_BOOT:
                raise bad(f"resource.disks[{i}].initializeParams.diskType", dname, "This disk type cannot be a "
                                                                                   "boot disk.")
            if dname in REFUSED_DISK_TYPES.get(mt_name.split("-", 1)[0], set()):
                raise bad(f"resource.disks[{i}].initializeParams.diskType", dname,
                          f"[{dname}] disk type cannot be used by [{mt_name}] machine type.")
            size = init.get("diskSizeGb")
            if size is not None and not (10 <= int(size) <= 65536):
                raise bad(f"resource.disks[{i}].initializeParams.diskSizeGb", size,
                          "Requested disk size cannot be smaller than the image size (10 GB).")
        nics = props.get("networkInterfaces") or []
        if not nics:
            raise bad("resource.networkInterfaces", "", "At least one network interface is required.")
        resolved = []
        for i, nic in enumerate(nics):
            nproject, _, nname = self._link(nic.get("network") or "global/networks/default", "networks", project)
            net = self.networks.get((nproject, nname))
            if net is None:
                raise not_found(f"projects/{nproject}/global/networks/{nname}")
            if nic.get("subnetwork"):
                sproject, sregion, sname = self._link(nic["subnetwork"], "subnetworks", project)
                if sregion != region:
                    raise bad(f"resource.networkInterfaces[{i}].subnetwork", nic["subnetwork"],
                              f"Subnetwork must be in region {region}.")
            elif net["autoCreateSubnetworks"]:
                sproject, sregion, sname = nproject, region, nname
            else:
                raise bad(f"resource.networkInterfaces[{i}].subnetwork", "",
                          "Subnetwork should be specified for custom subnetmode network")
            sub = self.subnetworks.get((sproject, sregion, sname))
            if sub is None:
                raise not_found(f"projects/{sproject}/regions/{sregion}/subnetworks/{sname}")
            if sub["network"] != net["selfLink"]:
                raise bad(f"resource.networkInterfaces[{i}].subnetwork", sname, "Not in the given network.")
            for ac in nic.get("accessConfigs", []):
                if ac.get("type", "ONE_TO_ONE_NAT") != "ONE_TO_ONE_NAT":
                    raise bad(f"resource.networkInterfaces[{i}].accessConfigs.type", ac.get("type"))
            resolved.append({"network": net["selfLink"], "subnetwork": sub["selfLink"], "key": (sproject, sregion,
                                                                                             sname),
                             "accessConfigs": nic.get("accessConfigs", [])})
        labels = props.get("labels") or {}
        if len(labels) > 64:
            raise bad("resource.labels", len(labels), "At most 64 labels.")
        for k, v in labels.items():
            if not LABEL_KEY_RE.match(k):
                raise bad("resource.labels", k, "Label keys must start with a lowercase letter and contain only "
                                                "lowercase letters, digits, '_' and '-' (at most 63).")
            if not LABEL_VALUE_RE.match(str(v)):
                raise bad("resource.labels", v, "Label values may contain only lowercase letters, digits, '_' "
                                                "and '-' (at most 63).")
        items = (props.get("metadata") or {}).get("items", [])
        keys = [it.get("key", "") for it in items]
        for k in keys:
            if not METADATA_KEY_RE.match(k):
                raise bad("resource.metadata.items.key", k)
        if len(set(keys)) != len(keys):
            raise bad("resource.metadata", "", "Duplicate metadata keys.")
        if sum(len(it.get("value", "")) for it in items) > 512 * 1024:
            raise bad("resource.metadata", "", "Metadata is larger than 512 KB.")
        scheduling = props.get("scheduling") or {}
        if scheduling.get("preemptible") and (scheduling.get("automaticRestart", True)
                                              or scheduling.get("onHostMaintenance", "MIGRATE") != "TERMINATE"):
            raise bad("resource.scheduling", scheduling, "Preemptible instances need automaticRestart: false and "
                                                         "onHostMaintenance: TERMINATE.")
        for tag in (props.get("tags") or {}).get("items", []):
            if not NAME_RE.match(tag):
                raise bad("resource.tags.items", tag)
        return {"nics": resolved, "machineType": mt_name}

    def _allocate(self, project: str, zone: str, name: str, props: dict[str, Any], checked: dict[str, Any],
                  ) -> dict[str, Any]:
        nics = []
        for i, nic in enumerate(checked["nics"]):
            sub = self.subnetworks[nic["key"]]
            if not sub["_free"]:
                raise ApiError(400, "ipSpaceExhausted", f"IP space of '{sub['selfLink']}' is exhausted")
            entry: dict[str, Any] = {"kind": "compute#networkInterface", "name": f"nic{i}",
                                     "network": nic["network"], "subnetwork": nic["subnetwork"],
                                     "networkIP": sub["_free"].pop(0)}
            if nic["accessConfigs"]:
                entry["accessConfigs"] = [{"kind": "compute#accessConfig", "type": "ONE_TO_ONE_NAT",
                                           "name": ac.get("name", "External NAT"), "natIP": self._public_ip(),
                                           "networkTier": ac.get("networkTier", "PREMIUM")}
                                          for ac in nic["accessConfigs"]]
            nics.append(entry)
        inst = {k: copy.deepcopy(v) for k, v in props.items() if k not in ("networkInterfaces", "name")}
        inst.update({"kind": "compute#instance", "id": self._new_id(), "name": name, "status": "PROVISIONING",
                     "machineType": f"{BASE}projects/{project}/zones/{zone}/machineTypes/{checked['machineType']}",
                     "zone": f"{BASE}projects/{project}/zones/{zone}", "networkInterfaces": nics,
                     "labels": dict(props.get("labels") or {}),
                     "selfLink": f"{BASE}projects/{project}/zones/{zone}/instances/{name}",
                     "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000-00:00", time.gmtime())})
        for d in inst.get("disks", []):
            if "initializeParams" in d and "diskSizeGb" in d["initializeParams"]:
                d["initializeParams"]["diskSizeGb"] = str(d["initializeParams"]["diskSizeGb"])
        self.instances[(project, zone, name)] = inst
        return inst

    def _release(self, inst: dict[str, Any]) -> None:
        for nic in inst["networkInterfaces"]:
            for sub in self.subnetworks.values():
                if sub["selfLink"] == nic["subnetwork"]:
                    sub["_free"].append(nic["networkIP"])
            for ac in nic.get("accessConfigs", []):
                self._public.discard(ac.get("natIP", ""))

    def _public_ip(self) -> str:
        # Round robin, as ephemeral addresses go: a released address is not handed out again at once.
        candidates = [str(ip) for pool in PUBLIC_POOLS for ip in ipaddress.ip_network(pool).hosts()]
        for i in range(len(candidates)):
            ip = candidates[(self._public_cursor + i) % len(candidates)]
            if ip not in self._public:
                self._public.add(ip)
                self._public_cursor = (self._public_cursor + i + 1) % len(candidates)
                return ip
        raise ApiError(403, "quotaExceeded", "Quota 'IN_USE_ADDRESSES' exceeded.")

    def _running(self, keys: list[tuple[str, str, str]]) -> Callable[[], list[tuple[str, dict[str, Any]]]]:
        def action() -> list[tuple[str, dict[str, Any]]]:
            events = []
            for key in keys:
                inst = self.instances.get(key)
                if inst is not None and inst["status"] == "PROVISIONING":
                    inst["status"] = "RUNNING"
                    events.append(("insert", copy.deepcopy(inst)))
            return events
        return action

    # --- request dispatch -----------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: dict[str, Any],
               ) -> tuple[int, dict[str, Any], list[tuple[str, dict[str, Any]]]]:
        """One Compute request -> (status, JSON body, hook events to run after the lock is released)."""
        m = re.match(r"^/compute/v1/projects/([^/]+)/(.*)$", path)
        if not m:
            raise ApiError(404, "notFound", f"no such API path: {path}")
        project, rest = m.group(1), m.group(2)
        self._check_project(project)
        for pattern, fn in self._routes():
            mm = re.match(pattern, rest)
            if mm:
                return fn(method, project, query, body, *mm.groups())
        raise ApiError(404, "notFound", f"no such API path: {path}")

    def _routes(self) -> list[tuple[str, Callable[..., Any]]]:
        return [
            (r"^aggregated/(instances|subnetworks)$", self._aggregated),
            (r"^zones/([^/]+)/instances/bulkInsert$", self._bulk_insert),
            (r"^zones/([^/]+)/instances/([^/]+)/start$", self._start),
            (r"^zones/([^/]+)/instances(?:/([^/]+))?$", self._instances),
            (r"^(zones/[^/]+|regions/[^/]+|global)/operations/([^/]+?)(/wait)?$", self._operations),
            (r"^global/firewalls(?:/([^/]+))?$", self._firewalls),
            (r"^global/networks(?:/([^/]+))?$", self._networks),
            (r"^regions/([^/]+)/subnetworks(?:/([^/]+))?$", self._subnetworks),
        ]

    def _replay(self, project: str, rid: str | None) -> dict[str, Any] | None:
        """A request id seen within REQUEST_ID_TTL answers the first request's operation, whatever the
        new request asks (Compute API reference, `requestId`: "the server will know to ignore the
        request if it has already been completed. The server guarantees that for at least 60 minutes
        after the first request"); an older one is forgotten, and the request is a new one."""
        seen = self.request_ids.get((project, rid)) if rid else None
        if seen is None:
            return None
        if self.now() - seen[1] >= REQUEST_ID_TTL:
            del self.request_ids[(project, rid or "")]
            return None
        return copy.deepcopy(self.operations[(project, seen[0])])

    def _operations(self, method: str, project: str, query: Any, body: Any, scope: str, name: str,
                    wait: str | None) -> tuple[int, dict[str, Any], list[Any]]:
        if scope.startswith("zones/"):
            self._check_zone(scope[6:])
        elif scope.startswith("regions/"):
            self._check_region(scope[8:])
        if (method, bool(wait)) not in (("GET", False), ("POST", True)):
            raise ApiError(405, "methodNotAllowed", "method not allowed")
        op, events = self._finish(project, scope, name)
        return 200, op, events

    def _instances(self, method: str, project: str, query: dict[str, list[str]], body: dict[str, Any],
                   zone: str, name: str | None) -> tuple[int, dict[str, Any], list[Any]]:
        self._check_zone(zone)
        scope = f"zones/{zone}"
        if name is None and method == "GET":
            items = [i for (p, z, _), i in sorted(self.instances.items()) if p == project and z == zone]
            return 200, _page(items, query, "compute#instanceList",
                              f"{BASE}projects/{project}/zones/{zone}/instances"), []
        if name is None and method == "POST":
            rid = self._request_id(project, query)
            replay = self._replay(project, rid)
            if replay:
                return 200, replay, []
            iname = _name(body)
            checked = self._check_instance(project, zone, body, bulk=False)
            if (project, zone, iname) in self.instances:
                raise ApiError(409, "alreadyExists",
                               f"The resource 'projects/{project}/zones/{zone}/instances/{iname}' already exists")
            self._quota(project, 1)
            self._allocate(project, zone, iname, body, checked)
            target = f"projects/{project}/zones/{zone}/instances/{iname}"
            return 200, self._operation(project, scope, "insert", target, rid,
                                        self._running([(project, zone, iname)])), []
        if name is None:
            raise ApiError(405, "methodNotAllowed", "method not allowed")
        key = (project, zone, name)
        target = f"projects/{project}/zones/{zone}/instances/{name}"
        if method == "GET":
            if key not in self.instances:
                raise not_found(target)
            return 200, copy.deepcopy(self.instances[key]), []
        if method == "DELETE":
            rid = self._request_id(project, query)
            replay = self._replay(project, rid)
            if replay:
                return 200, replay, []
            inst = self.instances.get(key)
            if inst is None or inst["status"] == "STOPPING":
                raise not_found(target)
            inst["status"] = "STOPPING"

            def gone() -> list[tuple[str, dict[str, Any]]]:
                removed = self.instances.pop(key, None)
                if removed is None:
                    return []
                self._release(removed)
                return [("delete", copy.deepcopy(removed))]
            return 200, self._operation(project, scope, "delete", target, rid, gone), []
        raise ApiError(405, "methodNotAllowed", "method not allowed")

    def _aggregated(self, method: str, project: str, query: dict[str, list[str]], body: dict[str, Any],
                    kind: str) -> tuple[int, dict[str, Any], list[Any]]:
        if method != "GET":
            raise ApiError(405, "methodNotAllowed", "method not allowed")
        if kind == "instances":
            scoped = [(f"zones/{z}", i) for (p, z, _), i in sorted(self.instances.items()) if p == project]
        else:
            scoped = [(f"regions/{r}", s) for (p, r, _), s in sorted(self.subnetworks.items()) if p == project]
        # Page over the flat list (filter applied), then group each page's items by scope.
        index = {id(r): scope for scope, r in scoped}
        page = _page([r for _, r in scoped], query, f"compute#{kind[:-1]}AggregatedList",
                     f"{BASE}projects/{project}/aggregated/{kind}", raw=True)
        groups: dict[str, dict[str, Any]] = {}
        for r in page.pop("items", []):
            groups.setdefault(index[id(r)], {kind: []})[kind].append(_public(r))
        if groups:
            page["items"] = groups
        return 200, page, []

    def _start(self, method: str, project: str, query: dict[str, list[str]], body: dict[str, Any],
               zone: str, name: str) -> tuple[int, dict[str, Any], list[Any]]:
        self._check_zone(zone)
        if method != "POST":
            raise ApiError(405, "methodNotAllowed", "method not allowed")
        rid = self._request_id(project, query)
        replay = self._replay(project, rid)
        if replay:
            return 200, replay, []
        key = (project, zone, name)
        target = f"projects/{project}/zones/{zone}/instances/{name}"
        inst = self.instances.get(key)
        if inst is None:
            raise not_found(target)
        if inst["status"] not in ("TERMINATED", "STOPPED", "RUNNING"):
            raise ApiError(400, "resourceNotReady", f"The resource '{target}' is not ready")
        if inst["status"] != "RUNNING":
            inst["status"] = "PROVISIONING"
            for nic in inst["networkInterfaces"]:  # a new ephemeral address
                for ac in nic.get("accessConfigs", []):
                    ac["natIP"] = self._public_ip()
        return 200, self._operation(project, f"zones/{zone}", "start", target, rid, self._running([key])), []

    def preempt(self, project: str, zone: str, name: str) -> None:
        """What Compute Engine does to a preemptible instance: stop it; its ephemeral address goes."""
        with self.lock:
            inst = self.instances[(project, zone, name)]
            inst["status"] = "TERMINATED"
            for nic in inst["networkInterfaces"]:
                for ac in nic.get("accessConfigs", []):
                    self._public.discard(ac.pop("natIP", ""))

    def _quota(self, project: str, n: int) -> None:
        used = sum(1 for k in self.instances if k[0] == project)
        if used + n > self.instance_quota:
            raise ApiError(403, "quotaExceeded", f"Quota 'INSTANCES' exceeded. Limit: {self.instance_quota}.")

    def _bulk_insert(self, method: str, project: str, query: dict[str, list[str]], body: dict[str, Any],
                     zone: str) -> tuple[int, dict[str, Any], list[Any]]:
        self._check_zone(zone)
        if method != "POST":
            raise ApiError(405, "methodNotAllowed", "method not allowed")
        rid = self._request_id(project, query)
        replay = self._replay(project, rid)
        if replay:
            return 200, replay, []
        count = int(body.get("count", 0))
        min_count = int(body.get("minCount", count))
        per = body.get("perInstanceProperties") or {}
        pattern = body.get("namePattern", "")
        if count < 1 or count > 1000:
            raise bad("resource.count", count, "Must be between 1 and 1000.")
        if not 1 <= min_count <= count:
            raise bad("resource.minCount", min_count)
        if not per and not pattern:
            raise bad("resource.namePattern", "", "Either namePattern or perInstanceProperties must be set.")
        if per and len(per) != count:
            raise bad("resource.perInstanceProperties", len(per), "Must name exactly 'count' instances.")
        if pattern and not re.fullmatch(r"[a-z][-a-z0-9]*#{1,18}[-a-z0-9]*", pattern):
            raise bad("resource.namePattern", pattern)
        if body.get("sourceInstanceTemplate"):
            raise bad("resource.sourceInstanceTemplate", body["sourceInstanceTemplate"], "Not supported by the fake.")
        props = body.get("instanceProperties")
        if not props:
            raise bad("resource.instanceProperties", "", "Required if sourceInstanceTemplate is not provided.")
        names = sorted(per) if per else _pattern_names(pattern, count, {k[2] for k in self.instances
                                                                      if k[:2] == (project, zone)})
        for n in names:
            if not NAME_RE.match(n):
                raise bad("resource.perInstanceProperties", n, "Instance names must match "
                                                               "[a-z]([-a-z0-9]*[a-z0-9])? (at most 63).")
        checked = self._check_instance(project, zone, props, bulk=True)
        target = f"projects/{project}/zones/{zone}"

        def create() -> list[tuple[str, dict[str, Any]]]:
            # All or nothing (minCount == count): the names must be free and the quota must hold.
            taken = [n for n in names if (project, zone, n) in self.instances]
            if taken:
                raise ApiError(409, "alreadyExists", f"The resource '{target}/instances/{taken[0]}' already exists")
            self._quota(project, len(names))
            made = []
            try:
                for n in names:
                    made.append(self._allocate(project, zone, n, props, checked))
            except ApiError:
                for inst in made:
                    self._release(self.instances.pop((project, zone, inst["name"])))
                raise
            return self._running([(project, zone, n) for n in names])()
        return 200, self._operation(project, f"zones/{zone}", "bulkInsert", target, rid, create), []

    def _firewalls(self, method: str, project: str, query: dict[str, list[str]], body: dict[str, Any],
                   name: str | None) -> tuple[int, dict[str, Any], list[Any]]:
        base = f"projects/{project}/global/firewalls"
        rid = self._request_id(project, query) if method in ("POST", "PATCH", "DELETE") else None
        replay = self._replay(project, rid)
        if replay:
            return 200, replay, []
        if name is None and method == "GET":
            items = [f for (p, _), f in sorted(self.firewalls.items()) if p == project]
            return 200, _page(items, query, "compute#firewallList", BASE + base), []
        if name is None and method == "POST":
            fw = copy.deepcopy(body)
            self._check_firewall(project, fw)
            if (project, fw["name"]) in self.firewalls:
                raise ApiError(409, "alreadyExists", f"The resource '{base}/{fw['name']}' already exists")
            fw.update(kind="compute#firewall", id=self._new_id(), selfLink=f"{BASE}{base}/{fw['name']}")
            self.firewalls[(project, fw["name"])] = fw
            return 200, self._operation(project, "global", "insert", f"{base}/{fw['name']}", rid), []
        key = (project, name or "")
        if key not in self.firewalls:
            raise not_found(f"{base}/{name}")
        if method == "GET":
            return 200, copy.deepcopy(self.firewalls[key]), []
        if method == "PATCH":
            merged = {**copy.deepcopy(self.firewalls[key]), **copy.deepcopy(body)}
            if merged.get("name") != name:
                raise bad("resource.name", merged.get("name"), "The name of a firewall cannot change.")
            if body.get("allowed"):
                merged.pop("denied", None)
            self._check_firewall(project, merged)
            self.firewalls[key] = merged
            return 200, self._operation(project, "global", "patch", f"{base}/{name}", rid), []
        if method == "DELETE":
            del self.firewalls[key]
            return 200, self._operation(project, "global", "delete", f"{base}/{name}", rid), []
        raise ApiError(405, "methodNotAllowed", "method not allowed")

    def _networks(self, method: str, project: str, query: dict[str, list[str]], body: dict[str, Any],
                  name: str | None) -> tuple[int, dict[str, Any], list[Any]]:
        base = f"projects/{project}/global/networks"
        rid = self._request_id(project, query) if method in ("POST", "DELETE") else None
        replay = self._replay(project, rid)
        if replay:
            return 200, replay, []
        if name is None and method == "GET":
            items = [n for (p, _), n in sorted(self.networks.items()) if p == project]
            return 200, _page(items, query, "compute#networkList", BASE + base), []
        if name is None and method == "POST":
            net = self._insert_network(project, copy.deepcopy(body))
            return 200, self._operation(project, "global", "insert", f"{base}/{net['name']}", rid), []
        key = (project, name or "")
        if key not in self.networks:
            raise not_found(f"{base}/{name}")
        if method == "GET":
            return 200, _public(self.networks[key]), []
        if method == "DELETE":
            users = self._network_users(project, name or "")
            if users:
                raise ApiError(400, "resourceInUseByAnotherResource",
                               f"The network resource '{base}/{name}' is already being used by '{users[0]}'")
            net = self.networks.pop(key)
            for skey in [k for k, s in self.subnetworks.items() if s["network"] == net["selfLink"]]:
                del self.subnetworks[skey]  # auto-mode subnetworks go with their network
            return 200, self._operation(project, "global", "delete", f"{base}/{name}", rid), []
        raise ApiError(405, "methodNotAllowed", "method not allowed")

    def _subnetworks(self, method: str, project: str, query: dict[str, list[str]], body: dict[str, Any],
                     region: str, name: str | None) -> tuple[int, dict[str, Any], list[Any]]:
        self._check_region(region)
        base = f"projects/{project}/regions/{region}/subnetworks"
        scope = f"regions/{region}"
        rid = self._request_id(project, query) if method in ("POST", "DELETE") else None
        replay = self._replay(project, rid)
        if replay:
            return 200, replay, []
        if name is None and method == "GET":
            items = [_public(s) for (p, r, _), s in sorted(self.subnetworks.items()) if p == project and r == region]
            return 200, _page(items, query, "compute#subnetworkList", BASE + base), []
        if name is None and method == "POST":
            sub = self._insert_subnetwork(project, region, copy.deepcopy(body))
            return 200, self._operation(project, scope, "insert", f"{base}/{sub['name']}", rid), []
        key = (project, region, name or "")
        if key not in self.subnetworks:
            raise not_found(f"{base}/{name}")
        sub = self.subnetworks[key]
        if method == "GET":
            return 200, _public(sub), []
        if method == "DELETE":
            users = [i["selfLink"] for i in self.instances.values()
                     if any(n["subnetwork"] == sub["selfLink"] for n in i["networkInterfaces"])]
            if users:
                raise ApiError(400, "resourceInUseByAnotherResource",
                               f"The subnetwork resource '{base}/{name}' is already being used by '{users[0]}'")
            if sub.get("_auto"):
                raise bad("subnetwork", name, "Auto-created subnetworks cannot be deleted.")
            del self.subnetworks[key]
            for net in self.networks.values():
                if sub["selfLink"] in net["subnetworks"]:
                    net["subnetworks"].remove(sub["selfLink"])
            return 200, self._operation(project, scope, "delete", f"{base}/{name}", rid), []
        raise ApiError(405, "methodNotAllowed", "method not allowed")


# --- list filters and paging ----------------------------------------------------------------------


def _public(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in resource.items() if not k.startswith("_")}


def _page(items: list[dict[str, Any]], query: dict[str, list[str]], kind: str, link: str, raw: bool = False,
          ) -> dict[str, Any]:
    flt = query.get("filter", [""])[0]
    if flt:
        test = parse_filter(flt)
        items = [i for i in items if test(i)]
    size = int(query.get("maxResults", ["500"])[0])
    if not 0 <= size <= 500:
        raise bad("maxResults", size, "Must be less than or equal to 500.")
    size = size or 500
    token = query.get("pageToken", [""])[0]
    try:
        start = int(base64.urlsafe_b64decode(token.encode()).decode()) if token else 0
    except ValueError:
        raise bad("pageToken", token) from None
    out: dict[str, Any] = {"kind": kind, "id": link, "selfLink": link}
    chunk = items[start:start + size]
    if chunk:
        out["items"] = chunk if raw else [_public(i) for i in chunk]
    if start + size < len(items):
        out["nextPageToken"] = base64.urlsafe_b64encode(str(start + size).encode()).decode()
    return out


_TOKEN_RE = re.compile(r'\s*(\(|\)|AND\b|OR\b|[A-Za-z_][\w.-]*\s*(?:!=|=|:|\beq\b|\bne\b)\s*(?:"[^"]*"|[^\s()]+))')


def parse_filter(text: str) -> Callable[[dict[str, Any]], bool]:
    """Compute list filters: `field = "v"`, `!=`, `:` (has; `:*` present), `eq`/`ne` (RE2 full match),
    combined with parentheses, AND, OR (juxtaposition means AND)."""
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN_RE.match(text, pos)
        if not m:
            raise bad("filter", text, "Invalid list filter expression.")
        tokens.append(m.group(1).strip())
        pos = m.end()
    it = iter(tokens + [""])
    look = [next(it)]

    def advance() -> str:
        cur = look[0]
        look[0] = next(it)
        return cur

    def expr_or() -> Callable[[dict[str, Any]], bool]:
        parts = [expr_and()]
        while look[0] == "OR":
            advance()
            parts.append(expr_and())
        return lambda r: any(p(r) for p in parts)

    def expr_and() -> Callable[[dict[str, Any]], bool]:
        parts = [term()]
        while look[0] not in ("", ")", "OR"):
            if look[0] == "AND":
                advance()
            parts.append(term())
        return lambda r: all(p(r) for p in parts)

    def term() -> Callable[[dict[str, Any]], bool]:
        tok = advance()
        if tok == "(":
            inner = expr_or()
            if advance() != ")":
                raise bad("filter", text, "Unbalanced parentheses.")
            return inner
        if tok in ("", ")", "AND", "OR"):
            raise bad("filter", text, "Invalid list filter expression.")
        return _comparison(tok, text)

    result = expr_or()
    if look[0] != "":
        raise bad("filter", text, "Invalid list filter expression.")
    return result


def _comparison(tok: str, text: str) -> Callable[[dict[str, Any]], bool]:
    m = re.match(r'^([A-Za-z_][\w.-]*)\s*(!=|=|:|eq|ne)\s*(.*)$', tok)
    if not m:
        raise bad("filter", text)
    field, op, raw = m.groups()
    value = raw[1:-1] if raw.startswith('"') and raw.endswith('"') else raw

    def get(resource: dict[str, Any]) -> Any:
        cur: Any = resource
        for part in field.split("."):
            if not isinstance(cur, dict) or part not in cur:
                return None
            cur = cur[part]
        return cur

    def test(resource: dict[str, Any]) -> bool:
        got = get(resource)
        text_value = "" if got is None else str(got).lower() if isinstance(got, bool) else str(got)
        if op == "=":
            return got is not None and text_value == value
        if op == "!=":
            return got is None or text_value != value
        if op == ":":
            return got is not None and (value == "*" or value in text_value)
        matched = got is not None and re.fullmatch(value, text_value) is not None
        return matched if op == "eq" else not matched
    return test


def _name(body: dict[str, Any]) -> str:
    name = body.get("name")
    if not name:
        raise bad("resource.name", "", "Required field 'resource.name' not specified")
    if not NAME_RE.match(name):
        raise bad("resource.name", name, "Must be a match of regex '(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'")
    return name


def _pattern_names(pattern: str, count: int, existing: set[str]) -> list[str]:
    m = re.search(r"#+", pattern)
    assert m is not None
    width = len(m.group(0))
    rx = re.compile(re.escape(pattern[:m.start()]) + r"(\d{" + str(width) + "})" + re.escape(pattern[m.end():]))
    used = [int(mm.group(1)) for n in existing if (mm := rx.fullmatch(n))]
    start = max(used, default=0) + 1
    return [pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():] for i in range(start, start + count)]


# --- HTTP ----------------------------------------------------------------------------------------


def _handler(fake: GceFake) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # keep-alive without Nagle's 40 ms per exchange

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: tokens travel here
            pass

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            query = parse_qs(parts.query, keep_blank_values=True)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            with fake.lock:
                fake.requests.append((self.command, parts.path))
            try:
                if parts.path == "/token":
                    if self.command != "POST":
                        raise ApiError(405, "methodNotAllowed", "method not allowed")
                    self._send(200, fake.issue_token(parse_qs(raw.decode())))
                    return
                with fake.lock:
                    failure = next((f for f in fake._failures if f[1] in parts.path), None)
                    if failure is not None:
                        fake._failures.remove(failure)
                injected = None
                if failure is not None:
                    reason = "rateLimitExceeded" if failure[0] == 429 else "backendError"
                    injected = ApiError(failure[0], reason, "Rate Limit Exceeded" if failure[0] == 429 else
                                        "Backend Error")
                    if not failure[2]:
                        raise injected
                fake.check_auth(self.headers.get("Authorization", ""))
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    raise ApiError(400, "parseError", "Invalid JSON payload received.") from None
                with fake.lock:
                    status, out, events = fake.handle(self.command, parts.path, query, body)
                # Hooks run outside the lock but before the answer: whoever sees the operation DONE
                # knows the hooks ran (a test's on_delete has stopped the machine's host).
                for kind, inst in events:
                    hook = fake.on_insert if kind == "insert" else fake.on_delete
                    if hook is not None:
                        hook(inst)
                if injected is not None:
                    raise injected
                self._send(status, out)
            except ApiError as exc:
                self._send(exc.status, exc.body())

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _serve

    return Handler
