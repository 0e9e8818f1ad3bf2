"""A local fake of the Azure Resource Manager REST API subset dcx uses, for the real azure-mgmt-* clients
and the real azure-identity/msal credential flow, served over TLS on 127.0.0.1.

- TLS: `make_test_pki(dir)` makes a throw-away CA and a server certificate for 127.0.0.1 (azure-core
  refuses bearer tokens over plain http); clients trust the CA through `connection_verify`.
- Authentication: the fake is also the Microsoft Entra authority. msal asks for
  `/TENANT/v2.0/.well-known/openid-configuration`, then POSTs a client-credentials grant to
  `/TENANT/oauth2/v2.0/token`; the fake checks the client id and secret and issues an opaque token,
  and every ARM request must carry one of its tokens.
- Resources: resource groups (PUT/GET/HEAD/DELETE, list with a tag $filter), Microsoft.Network
  virtualNetworks (+subnets), networkSecurityGroups (+securityRules), publicIPAddresses,
  networkInterfaces (a private address allocated from the subnet), Microsoft.Compute virtualMachines
  (customData is taken, base64, and never returned, as Azure does) and disks (a VM's OS disk is made
  with it, untagged, and deleted with it when its deleteOption is Delete).
- Long-running operations: PUT answers 201/200 with provisioningState Creating/Updating and an
  Azure-AsyncOperation header whose status is InProgress at the first poll and Succeeded at the
  next; DELETE answers 202 with a Location that answers 202, then 200. A missing resource is 404
  (ResourceNotFound / ResourceGroupNotFound), except DELETE of a missing resource, which is 204 as in
  ARM; deleting something still in use is refused as Azure does (400 NicInUse,
  PublicIPAddressCannotBeDeleted, InUseNetworkSecurityGroupCannotBeDeleted, InUseSubnetCannotBeDeleted;
  409 OperationNotAllowed for an attached disk).
- Reference rules, each named beside its code: resource names per type (length, characters, first and
  last character), tags (at most 50; names up to 512 characters without < > % & backslash ? /, values up
  to 256), a Linux computerName; a NIC left by its deleted VM (deleteOption Detach, the default) is
  reserved for it for 180 s (400 NicReservedForAnotherVm; `nic_reservation` shortens it in tests),
  while deleteOption Delete removes the NIC (and its public IP when that says Delete) with the VM;
  a namespace the subscription has not registered answers 409 MissingSubscriptionRegistration until
  `POST /subscriptions/S/providers/NS/register` (`unregister()`, `may_register`). Tokens are
  JWT-shaped with `appid`, `oid` and `tid` claims, as Entra's are.
- Test controls: `throttle_next(n)` answers the next n requests with 429 + Retry-After;
  `gate_vm_creates(n)` keeps VM creations InProgress until n VM PUTs have arrived (a client that waits
  for each VM before starting the next gets its VM operation Failed instead); `events` lists VM
  PUTs and completions in order; hooks `on_vm_created(vm, private_ip, custom_data)` and
  `on_vm_deleted(vm)` (tests boot namespace hosts there).
"""

from __future__ import annotations

import base64
import binascii
import copy
import datetime
import ipaddress
import itertools
import json
import re
import secrets
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from tests.fakes.server import LoopbackServer

PUBLIC_POOL = "203.0.113.0/24"  # documentation range: never routed
RESERVED_ADMIN_NAMES = {"administrator", "admin", "user", "user1", "test", "user2", "test1", "user3", "admin1",
                        "1", "123", "a", "actuser", "adm", "admin2", "aspnet", "backup", "console", "guest", "owner",
                        "root", "server", "sql", "support", "sys", "test2", "test3", "user4", "user5"}
NSG_PROTOCOLS = {"Tcp", "Udp", "Icmp", "Esp", "Ah", "*"}
TYPES = {  # lowercase "namespace/type" -> (canonical type, child collection or "")
    "microsoft.network/virtualnetworks": ("Microsoft.Network/virtualNetworks", "subnets"),
    "microsoft.network/networksecuritygroups": ("Microsoft.Network/networkSecurityGroups", "securityRules"),
    "microsoft.network/publicipaddresses": ("Microsoft.Network/publicIPAddresses", ""),
    "microsoft.network/networkinterfaces": ("Microsoft.Network/networkInterfaces", ""),
    "microsoft.compute/virtualmachines": ("Microsoft.Compute/virtualMachines", ""),
    "microsoft.compute/disks": ("Microsoft.Compute/disks", ""),
}
VM = "Microsoft.Compute/virtualMachines"
NIC = "Microsoft.Network/networkInterfaces"
PIP = "Microsoft.Network/publicIPAddresses"
NSG = "Microsoft.Network/networkSecurityGroups"
VNET = "Microsoft.Network/virtualNetworks"
DISK = "Microsoft.Compute/disks"
RG_TYPE = "Microsoft.Resources/resourceGroups"
# "Naming rules and restrictions for Azure resources" (Azure Resource Manager docs), per type: length,
# characters (alphanumerics, '_', '.', '-'), first and last character.
_NET_NAME = r"[A-Za-z0-9]([\w.-]*\w)?"
_VM_BAD = r"\s~!@#$%^&*()=+_\[\]{}\\|;:'\",<>/?"
NAME_RULES: dict[str, tuple[str, int, int]] = {  # type -> (full-match regex, min, max length)
    "resourceGroups": (r"[-\w.()]*[-\w()]", 1, 90),  # may not end with '.'
    "Microsoft.Network/virtualNetworks": (_NET_NAME, 2, 64),
    "subnets": (_NET_NAME, 1, 80),
    "Microsoft.Network/networkSecurityGroups": (_NET_NAME, 1, 80),
    "securityRules": (_NET_NAME, 1, 80),
    "Microsoft.Network/networkInterfaces": (_NET_NAME, 1, 80),
    "Microsoft.Network/publicIPAddresses": (_NET_NAME, 1, 80),
    "Microsoft.Compute/disks": (_NET_NAME, 1, 80),
    # A VM's name: no spaces nor ~!@#$%^&*()=+_[]{}\|;:'",<>/? ; a Linux VM's may not end with '.' or '-'
    # (the list also names '.', but the Linux rule implies it inside a name: the fake allows it there).
    "Microsoft.Compute/virtualMachines": (f"[^{_VM_BAD}]*[^{_VM_BAD}.-]", 1, 64),
}


def check_name(kind: str, name: str) -> None:
    rx, low, high = NAME_RULES[kind]
    if not low <= len(name) <= high or not re.fullmatch(rx, name):
        raise ArmError(400, "InvalidResourceName", f"Resource name {name} is invalid. The name can be up to "
                       f"{high} characters long. It can contain alphanumeric characters, underscores, periods and "
                       "hyphens and must begin with an alphanumeric character (see the naming rules of "
                       f"{kind.rsplit('/', 1)[-1]}).")


# "Troubleshoot NicReservedForAnotherVm" (Azure virtual network docs): after its VM is deleted, a NIC
# that was not deleted with it (deleteOption Detach, the default) stays reserved for that VM for 180 s;
# deleting or attaching it meanwhile answers 400 NicReservedForAnotherVm.
NIC_RESERVATION_SECONDS = 180.0
# "Resolve errors for resource provider registration": a request to a namespace the subscription has
# not registered answers 409 MissingSubscriptionRegistration until `register` has been called.
PROVIDER_NAMESPACES = ("Microsoft.Compute", "Microsoft.Network")


class ArmError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


def bad(message: str, code: str = "InvalidParameter") -> ArmError:
    return ArmError(400, code, message)


def make_test_pki(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, server.pem, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dcx test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


class Operation:
    """An asynchronous operation: InProgress at its first poll, done (its action run) at the next."""

    def __init__(self, action: Callable[[], None], kind: str = "", name: str = "") -> None:
        self.id = uuid.uuid4().hex
        self.action = action
        self.kind = kind
        self.name = name
        self.polls = 0
        self.status = "InProgress"
        self.error: ArmError | None = None


class ArmFake(LoopbackServer):
    """The fake's state and its HTTPS server. Use as a context manager (or start()/close())."""

    def __init__(self, pki: tuple[Path, Path, Path], subscriptions: tuple[str, ...], tenant: str, client_id: str,
                 client_secret: str) -> None:
        self.ca_file, cert_file, key_file = pki
        self.subscriptions = {s.lower() for s in subscriptions}
        self.nic_reservation = NIC_RESERVATION_SECONDS  # tests shorten it; the shape stays the real one
        # (subscription, namespace) lowercased -> "Registered" | "Registering"; every namespace is
        # registered unless a test calls unregister().
        self.registration: dict[tuple[str, str], str] = {(sub, ns.lower()): "Registered"
                                                         for sub in self.subscriptions for ns in PROVIDER_NAMESPACES}
        self.may_register = True  # False: the identity lacks Microsoft.*/register/action (403)
        self.tenant = tenant
        self.client_id = client_id
        self.client_secret = client_secret
        self.lock = threading.RLock()
        self.resource_groups: dict[str, dict[str, Any]] = {}  # "/subscriptions/s/resourcegroups/rg" (lower)
        self.resources: dict[str, dict[str, Any]] = {}  # lowercased id -> resource JSON (as GET shows it)
        self.custom_data: dict[str, str] = {}  # VM id (lower) -> decoded customData (never returned by GET)
        self.operations: dict[str, Operation] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, auth included
        self.token_requests = 0
        self.events: list[tuple[str, str]] = []  # ("vm-put" | "vm-created" | "vm-deleted", name)
        self.page_size = 100
        self.on_vm_created: Callable[[dict[str, Any], str, str], None] | None = None
        self.on_vm_deleted: Callable[[dict[str, Any]], None] | None = None
        self._tokens: set[str] = set()
        self._throttles: list[str] = []  # path fragments of requests to answer with 429
        self._gate: int = 0  # VM creations stay InProgress until this many VM PUTs arrived
        self._gate_max_polls = 400
        self._vm_puts = 0
        self._public = itertools.islice(ipaddress.ip_network(PUBLIC_POOL).hosts(), 10, None)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert_file, key_file)
        super().__init__(_handler(self), "arm-fake", tls)

    # --- test API --------------------------------------------------------------------------------

    def throttle_next(self, n: int, path_contains: str = "/subscriptions/") -> None:
        """Answer the next n ARM requests whose path contains `path_contains` with 429 + Retry-After: 1."""
        with self.lock:
            self._throttles.extend([path_contains.lower()] * n)

    def throttles_left(self) -> int:
        with self.lock:
            return len(self._throttles)

    def gate_vm_creates(self, n: int) -> None:
        """Keep VM creations InProgress until n VM PUTs have arrived (counted from now). An operation
        polled many times while the gate is shut fails: its client waits for it before sending the
        other PUTs, which is what the gate detects."""
        with self.lock:
            self._gate = n
            self._vm_puts = 0

    def unregister(self, subscription: str, namespace: str) -> None:
        with self.lock:
            self.registration.pop((subscription.lower(), namespace.lower()), None)

    def check_registered(self, sub: str, namespace: str) -> None:
        if self.registration.get((sub.lower(), namespace.lower())) != "Registered":
            raise ArmError(409, "MissingSubscriptionRegistration", f"The subscription is not registered to use "
                           f"namespace '{namespace}'. See https://aka.ms/rps-not-found for how to register "
                           "subscriptions.")

    def provider_registration(self, method: str, sub: str, namespace: str,
                              action: str) -> tuple[int, Any, dict[str, str]]:
        """GET /subscriptions/S/providers/NS and POST .../NS/register (Resources API, Providers)."""
        key = (sub.lower(), namespace.lower())
        canonical = next((ns for ns in PROVIDER_NAMESPACES if ns.lower() == key[1]), namespace)
        if action == "register" and method == "POST":
            if not self.may_register:
                raise ArmError(403, "AuthorizationFailed", f"The client does not have authorization to perform "
                               f"action '{canonical}/register/action' over scope '/subscriptions/{sub}'.")
            if self.registration.get(key) != "Registered":
                self.registration[key] = "Registering"
        elif action or method != "GET":
            raise ArmError(405, "MethodNotAllowed", "method not allowed")
        elif self.registration.get(key) == "Registering":  # registration completes after a while
            self.registration[key] = "Registered"
        state = "Registering" if action else self.registration.get(key, "NotRegistered")
        return 200, {"id": f"/subscriptions/{sub}/providers/{canonical}", "namespace": canonical,
                     "registrationState": state, "resourceTypes": []}, {}

    def count(self, method: str = "", contains: str = "") -> int:
        with self.lock:
            return sum(1 for m, p in self.requests if (not method or m == method) and contains.lower() in p.lower())

    def reset_counts(self) -> None:
        with self.lock:
            self.requests.clear()
            self.events.clear()

    def mutations(self) -> list[tuple[str, str]]:
        """PUT/PATCH/POST/DELETE requests to ARM (not token requests)."""
        with self.lock:
            return [(m, p) for m, p in self.requests if m in ("PUT", "PATCH", "POST", "DELETE")
                    and p.lower().startswith("/subscriptions/")]

    def of_type(self, rtype: str) -> list[dict[str, Any]]:
        with self.lock:
            return [copy.deepcopy(r) for r in self.resources.values() if r["type"] == rtype]

    def get(self, rid: str) -> dict[str, Any] | None:
        with self.lock:
            r = self.resources.get(rid.lower()) or self.resource_groups.get(rid.lower())
            return copy.deepcopy(r) if r else None

    def inventory(self) -> dict[str, list[str]]:
        """Every resource's name by type (resource groups as "resourceGroups"), sorted."""
        with self.lock:
            out: dict[str, list[str]] = {"resourceGroups": sorted(g["name"] for g in self.resource_groups.values())}
            for r in self.resources.values():
                out.setdefault(r["type"].split("/")[1], []).append(r["name"])
        return {k: sorted(v) for k, v in out.items() if v}

    def add_resource_group(self, subscription: str, name: str, location: str,
                           tags: dict[str, str] | None = None) -> str:
        """Pre-existing infrastructure (a user's own resource group)."""
        with self.lock:
            rid = f"/subscriptions/{subscription}/resourceGroups/{name}"
            self.resource_groups[rid.lower()] = {"id": rid, "name": name, "type": RG_TYPE, "location": location,
                                                 "tags": dict(tags or {}),
                                                 "properties": {"provisioningState": "Succeeded"}}
            return rid

    # --- authentication -------------------------------------------------------------------------

    def openid_configuration(self, tenant: str) -> dict[str, Any]:
        if tenant != self.tenant:
            raise ArmError(400, "invalid_tenant", f"AADSTS90002: Tenant '{tenant}' not found.")
        base = f"{self.url}/{tenant}"
        return {"issuer": f"{base}/v2.0", "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "token_endpoint": f"{base}/oauth2/v2.0/token", "tenant_region_scope": "WW",
                "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
                "response_types_supported": ["code", "id_token", "token"], "scopes_supported": ["openid"]}

    def issue_token(self, tenant: str, form: dict[str, list[str]]) -> dict[str, Any]:
        with self.lock:
            self.token_requests += 1
        if tenant != self.tenant:
            raise ArmError(400, "invalid_request", f"AADSTS90002: Tenant '{tenant}' not found.")
        if form.get("grant_type", [""])[0] != "client_credentials":
            raise ArmError(400, "unsupported_grant_type", "AADSTS70003: unsupported grant type")
        if form.get("client_id", [""])[0] != self.client_id:
            raise ArmError(400, "unauthorized_client", "AADSTS700016: Application not found in the directory.")
        if not secrets.compare_digest(form.get("client_secret", [""])[0], self.client_secret):
            raise ArmError(401, "invalid_client", "AADSTS7000215: Invalid client secret provided.")
        if not form.get("scope", [""])[0].endswith("/.default"):
            raise ArmError(400, "invalid_scope", "AADSTS70011: The provided scope is not valid.")
        # Entra access tokens are JWTs (header.claims.signature); an application's carry `appid`, `oid`
        # and `tid`. The signature is random bytes: clients do not check it, the fake checks the token
        # by its presence in its set.
        claims = {"aud": form["scope"][0][:-len("/.default")], "iss": f"{self.url}/{tenant}/v2.0",
                  "appid": self.client_id, "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, self.client_id)),
                  "tid": tenant, "ver": "1.0"}
        token = ".".join(base64.urlsafe_b64encode(json.dumps(part).encode()).decode().rstrip("=") for part in
                         ({"typ": "JWT", "alg": "RS256"}, claims)) + "." + secrets.token_urlsafe(32)
        with self.lock:
            self._tokens.add(token)
        return {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": token}

    def check_auth(self, header: str) -> None:
        token = header[len("Bearer "):].strip() if header.startswith("Bearer ") else ""
        with self.lock:
            if token in self._tokens:
                return
        raise ArmError(401, "AuthenticationFailed" if token else "AuthenticationFailedMissingToken",
                       "Authentication failed." if token else "Authentication failed. The 'Authorization' header is "
                       "missing.")

    # --- request dispatch -----------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any,
               url: str) -> tuple[int, Any, dict[str, str]]:
        """(status, JSON body or None, headers) of one ARM request (auth already checked)."""
        lower = path.lower()
        with self.lock:
            for i, fragment in enumerate(self._throttles):
                if fragment in lower:
                    del self._throttles[i]
                    raise ArmError(429, "TooManyRequests", "The request is being throttled.", {"Retry-After": "1"})
        if lower.startswith("/fake/operations/") or lower.startswith("/fake/locations/"):
            return self.poll(lower.split("/")[2], lower.split("/")[3])
        if not query.get("api-version", [""])[0]:
            raise ArmError(400, "MissingApiVersionParameter",
                           "The api-version query parameter (?api-version=) is required for all requests.")
        parts = [p for p in path.split("/") if p]
        if len(parts) < 2 or parts[0].lower() != "subscriptions":
            raise ArmError(404, "InvalidResourceType", f"no route for {path}")
        sub = parts[1]
        if sub.lower() not in self.subscriptions:
            raise ArmError(404, "SubscriptionNotFound", f"The subscription '{sub}' could not be found.")
        rest = parts[2:]
        with self.lock:
            if len(rest) in (2, 3) and rest[0].lower() == "providers" and "/" not in rest[1] and (
                    len(rest) == 3 and rest[2].lower() == "register" or len(rest) == 2):
                return self.provider_registration(method, sub, rest[1], rest[2].lower() if len(rest) == 3 else "")
            namespace = rest[1] if len(rest) >= 2 and rest[0].lower() == "providers" else (
                rest[3] if len(rest) >= 4 and rest[0].lower() == "resourcegroups" and rest[2].lower() == "providers"
                else "")
            if namespace:
                self.check_registered(sub, namespace)
            if rest and rest[0].lower() == "resourcegroups":
                if len(rest) == 1:
                    if method != "GET":
                        raise ArmError(405, "MethodNotAllowed", "method not allowed")
                    return 200, self.page([g for g in self.resource_groups.values()
                                           if g["id"].lower().startswith(f"/subscriptions/{sub.lower()}/")
                                           and _tag_filter(query)(g)], query, url), {}
                rg = rest[1]
                if len(rest) == 2:
                    return self.resource_group(method, sub, rg, body)
                if len(rest) >= 5 and rest[2].lower() == "providers":
                    return self.resource(method, sub, rg, rest[3], rest[4], rest[5:], query, body, url)
            if rest and rest[0].lower() == "providers" and len(rest) == 3 and method == "GET":
                rtype = TYPES.get(f"{rest[1]}/{rest[2]}".lower())
                if rtype:
                    prefix = f"/subscriptions/{sub.lower()}/"
                    return 200, self.page([self.view(r) for r in self.resources.values() if r["type"] == rtype[0]
                                           and r["id"].lower().startswith(prefix)], query, url), {}
        raise ArmError(404, "InvalidResourceType", f"no route for {path}")

    def page(self, items: list[dict[str, Any]], query: dict[str, list[str]], url: str) -> dict[str, Any]:
        start = int(query.get("$skiptoken", ["0"])[0])
        out: dict[str, Any] = {"value": copy.deepcopy(items[start:start + self.page_size])}
        if start + self.page_size < len(items):
            base = re.sub(r"[&?]\$skiptoken=\d+", "", url)
            out["nextLink"] = f"{base}{'&' if '?' in base else '?'}$skiptoken={start + self.page_size}"
        return out

    def new_operation(self, action: Callable[[], None], kind: str = "", name: str = "") -> Operation:
        op = Operation(action, kind, name)
        self.operations[op.id] = op
        return op

    def async_headers(self, op: Operation) -> dict[str, str]:
        return {"Azure-AsyncOperation": f"{self.url}/fake/operations/{op.id}?api-version=2024-01-01"}

    def location_headers(self, op: Operation) -> dict[str, str]:
        return {"Location": f"{self.url}/fake/locations/{op.id}?api-version=2024-01-01", "Retry-After": "0"}

    def poll(self, kind: str, op_id: str) -> tuple[int, Any, dict[str, str]]:
        with self.lock:
            op = self.operations.get(op_id)
            if op is None:
                raise ArmError(404, "OperationNotFound", f"operation {op_id} not found")
            op.polls += 1
            if op.status == "InProgress":
                gated = op.kind == "vm-create" and self._gate and self._vm_puts < self._gate
                if gated and op.polls > self._gate_max_polls:
                    op.status = "Failed"
                    op.error = ArmError(409, "TestGateNotMet",
                                        f"VM {op.name} was waited on before the other VM PUTs were sent "
                                        f"({self._vm_puts} of {self._gate})")
                elif op.polls >= 2 and not gated:
                    try:
                        op.action()
                        op.status = "Succeeded"
                    except ArmError as exc:
                        op.status, op.error = "Failed", exc
        if kind == "locations":
            if op.status == "InProgress":
                return 202, None, {"Location": f"{self.url}/fake/locations/{op.id}?api-version=2024-01-01",
                                   "Retry-After": "0"}
            if op.error:
                raise op.error
            return 200, None, {}
        body: dict[str, Any] = {"id": op.id, "name": op.id, "status": op.status}
        if op.error:
            body["error"] = {"code": op.error.code, "message": op.error.message}
        return 200, body, {}

    # --- resource groups ------------------------------------------------------------------------

    def resource_group(self, method: str, sub: str, name: str, body: Any) -> tuple[int, Any, dict[str, str]]:
        rid = f"/subscriptions/{sub}/resourceGroups/{name}"
        key = rid.lower()
        current = self.resource_groups.get(key)
        if method in ("GET", "HEAD"):
            if current is None:
                raise ArmError(404, "ResourceGroupNotFound", f"Resource group '{name}' could not be found.")
            return (204 if method == "HEAD" else 200), (None if method == "HEAD" else copy.deepcopy(current)), {}
        if method == "PUT":
            check_name("resourceGroups", name)
            if not isinstance(body, dict) or not body.get("location"):
                raise bad("The 'location' property is required.", "LocationRequired")
            if current is not None and current["properties"]["provisioningState"] == "Deleting":
                raise ArmError(409, "ResourceGroupBeingDeleted", f"The resource group '{name}' is in deprovisioning "
                               "state and cannot perform this operation.")
            if current is not None and current["location"] != body["location"]:
                raise ArmError(409, "InvalidResourceGroupLocation", f"Invalid resource group location "
                               f"'{body['location']}'. The Resource group already exists in location "
                               f"'{current['location']}'.")
            group = {"id": rid, "name": name, "type": RG_TYPE, "location": body["location"],
                     "tags": _tags(body), "properties": {"provisioningState": "Succeeded"}}
            self.resource_groups[key] = group
            return (200 if current else 201), copy.deepcopy(group), {}
        if method == "DELETE":
            if current is None:
                raise ArmError(404, "ResourceGroupNotFound", f"Resource group '{name}' could not be found.")
            current["properties"]["provisioningState"] = "Deleting"

            def delete_group() -> None:
                for rkey in [k for k in self.resources if k.startswith(key + "/")]:
                    gone = self.resources.pop(rkey, None)
                    if gone and gone["type"] == VM:
                        self._vm_gone(gone)
                self.resource_groups.pop(key, None)

            return 202, None, self.location_headers(self.new_operation(delete_group, "rg-delete", name))
        raise ArmError(405, "MethodNotAllowed", f"{method} not allowed on a resource group")

    # --- resources ------------------------------------------------------------------------------

    def resource(self, method: str, sub: str, rg: str, namespace: str, rtype: str, rest: list[str],
                 query: dict[str, list[str]], body: Any, url: str) -> tuple[int, Any, dict[str, str]]:
        kind = TYPES.get(f"{namespace}/{rtype}".lower())
        if kind is None:
            raise ArmError(404, "InvalidResourceType", f"The resource type '{rtype}' could not be found in the "
                           f"namespace '{namespace}'.")
        canonical, child = kind
        group = self.resource_groups.get(f"/subscriptions/{sub}/resourcegroups/{rg}".lower())
        if group is None:
            raise ArmError(404, "ResourceGroupNotFound", f"Resource group '{rg}' could not be found.")
        base = f"{group['id']}/providers/{canonical}"
        if not rest:  # the collection
            if method != "GET":
                raise ArmError(405, "MethodNotAllowed", "method not allowed")
            expand = "instanceview" in query.get("$expand", [""])[0].lower()
            return 200, self.page([self.view(r, expand) for r in self.resources.values() if r["type"] == canonical
                                   and r["id"].lower().startswith(base.lower() + "/")], query, url), {}
        rid = f"{base}/{rest[0]}"
        if len(rest) == 1:
            return self.top_level(method, canonical, rid, rest[0], query, body)
        if len(rest) == 2 and rest[1].lower() == "start" and canonical == VM and method == "POST":
            return self.start_vm(rid)
        if len(rest) in (2, 3) and child and rest[1].lower() == child.lower():
            parent = self.resources.get(rid.lower())
            if parent is None:
                raise self.not_found(canonical, rest[0], rg)
            if len(rest) == 2:
                if method != "GET":
                    raise ArmError(405, "MethodNotAllowed", "method not allowed")
                return 200, self.page(copy.deepcopy(parent["properties"].get(child, [])), query, url), {}
            return self.child(method, parent, child, rest[2], body)
        raise ArmError(404, "InvalidResourceType", f"no route for {rid}/{'/'.join(rest[1:])}")

    def not_found(self, rtype: str, name: str, rg: str) -> ArmError:
        return ArmError(404, "ResourceNotFound", f"The Resource '{rtype}/{name}' under resource group '{rg}' "
                        "was not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix")

    def view(self, r: dict[str, Any], instance_view: bool = False) -> dict[str, Any]:
        out = copy.deepcopy(r)
        power = out.pop("_power", None)  # the fake's own field: instanceView shows it
        out.pop("_reserved_until", None)
        if instance_view and r["type"] == VM:
            out["properties"]["instanceView"] = {"statuses": [
                {"code": f"ProvisioningState/{r['properties']['provisioningState'].lower()}"},
                {"code": f"PowerState/{power}"}]}
        return out

    def top_level(self, method: str, rtype: str, rid: str, name: str, query: dict[str, list[str]],
                  body: Any) -> tuple[int, Any, dict[str, str]]:
        key = rid.lower()
        current = self.resources.get(key)
        rg = rid.split("/")[4]
        if method == "GET":
            if current is None:
                raise self.not_found(rtype, name, rg)
            return 200, self.view(current, "instanceview" in query.get("$expand", [""])[0].lower()), {}
        if method == "DELETE":
            if current is None:
                return 204, None, {}
            self.check_deletable(current)
            current["properties"]["provisioningState"] = "Deleting"
            op = self.new_operation(lambda: self.delete_resource(key), f"{rtype}-delete", name)
            return 202, None, {**self.location_headers(op), **self.async_headers(op)}
        if method == "PATCH" and rtype == DISK:
            if current is None:
                raise self.not_found(rtype, name, rg)
            if isinstance(body, dict) and "tags" in body:
                current["tags"] = _tags(body)
            return 200, self.view(current), self.async_headers(self.new_operation(lambda: None, "disk-update", name))
        if method != "PUT":
            raise ArmError(405, "MethodNotAllowed", f"{method} not allowed")
        if not isinstance(body, dict):
            raise bad("The request content was invalid and could not be deserialized.", "InvalidRequestContent")
        check_name(rtype, name)
        if not body.get("location"):
            raise bad("The 'location' property is required.", "LocationRequired")
        if current is not None and current["properties"].get("provisioningState") == "Deleting":
            raise ArmError(409, "OperationNotAllowed", f"{rtype}/{name} is being deleted")
        if current is not None and current["location"].lower() != body["location"].lower():
            raise ArmError(409, "InvalidResourceLocation", f"The resource '{name}' already exists in location "
                           f"'{current['location']}' in resource group '{rg}'.")
        made = {"id": rid, "name": name, "type": rtype, "location": body["location"], "tags": _tags(body)}
        builder = {VNET: self.put_vnet, NSG: self.put_nsg, PIP: self.put_pip, NIC: self.put_nic, VM: self.put_vm,
                   DISK: self.put_disk}[rtype]
        properties, action = builder(rid, body, current)
        made.update({k: v for k, v in body.items() if k in ("sku", "zones")})
        made["properties"] = {**properties, "provisioningState": "Updating" if current else
                              ("Creating" if rtype == VM else "Updating")}
        if rtype == VM:
            made["_power"] = current["_power"] if current else "starting"
        self.resources[key] = made

        def finish() -> None:
            r = self.resources.get(key)
            if r is not None:
                r["properties"]["provisioningState"] = "Succeeded"
                action()

        op = self.new_operation(finish, "vm-create" if rtype == VM and current is None else f"{rtype}-put", name)
        return (200 if current else 201), self.view(made), self.async_headers(op)

    def child(self, method: str, parent: dict[str, Any], collection: str, name: str,
              body: Any) -> tuple[int, Any, dict[str, str]]:
        items = parent["properties"].setdefault(collection, [])
        found = next((c for c in items if c["name"].lower() == name.lower()), None)
        cid = f"{parent['id']}/{collection}/{name}"
        if method == "GET":
            if found is None:
                raise ArmError(404, "NotFound", f"Resource {cid} not found.")
            return 200, copy.deepcopy(found), {}
        if method == "DELETE":
            if found is None:
                return 204, None, {}
            if collection == "subnets" and found["properties"].get("ipConfigurations"):
                raise ArmError(409, "InUseSubnetCannotBeDeleted", f"Subnet {name} is in use and cannot be deleted.")
            op = self.new_operation(lambda: items.remove(found) if found in items else None, "child-delete", name)
            return 202, None, {**self.location_headers(op), **self.async_headers(op)}
        if method != "PUT" or not isinstance(body, dict):
            raise ArmError(405, "MethodNotAllowed", f"{method} not allowed")
        check_name(collection, name)
        entry = {"name": name, "properties": copy.deepcopy(body.get("properties") or {})}
        if collection == "securityRules":
            others = [c for c in items if c is not found]
            entry = _check_rule(entry, others, parent["id"])
        else:
            _check_subnet(entry, parent)
            if found is not None:
                entry["properties"]["ipConfigurations"] = found["properties"].get("ipConfigurations", [])
        entry["id"] = cid
        entry["properties"]["provisioningState"] = "Succeeded"
        if found is not None:
            items[items.index(found)] = entry
        else:
            items.append(entry)
        return (200 if found else 201), copy.deepcopy(entry), self.async_headers(self.new_operation(lambda: None))

    # --- per-type validation and effects ----------------------------------------------------------

    def put_vnet(self, rid: str, body: dict[str, Any], current: Any) -> tuple[dict[str, Any], Callable[[], None]]:
        props = body.get("properties") or {}
        prefixes = (props.get("addressSpace") or {}).get("addressPrefixes") or []
        if not prefixes:
            raise bad("addressSpace.addressPrefixes is required", "InvalidAddressSpace")
        try:
            nets = [ipaddress.ip_network(p) for p in prefixes]
        except ValueError as exc:
            raise bad(f"Invalid address prefix: {exc}", "InvalidAddressPrefixFormat") from None
        subnets = []
        old = {s["name"].lower(): s for s in (current["properties"].get("subnets", []) if current else [])}
        for s in props.get("subnets") or []:
            entry = {"name": s.get("name", ""), "properties": copy.deepcopy(s.get("properties") or {})}
            check_name("subnets", entry["name"])
            _check_subnet(entry, {"properties": {"addressSpace": {"addressPrefixes": [str(n) for n in nets]}}})
            entry["id"] = f"{rid}/subnets/{entry['name']}"
            entry["properties"]["provisioningState"] = "Succeeded"
            prior = old.pop(entry["name"].lower(), None)
            entry["properties"]["ipConfigurations"] = prior["properties"].get("ipConfigurations", []) if prior else []
            subnets.append(entry)
        for gone in old.values():
            if gone["properties"].get("ipConfigurations"):
                raise ArmError(400, "InUseSubnetCannotBeDeleted", f"Subnet {gone['name']} is in use and cannot be "
                               "deleted.")
        return {"addressSpace": {"addressPrefixes": [str(n) for n in nets]}, "subnets": subnets}, lambda: None

    def put_nsg(self, rid: str, body: dict[str, Any], current: Any) -> tuple[dict[str, Any], Callable[[], None]]:
        rules: list[dict[str, Any]] = []
        for r in (body.get("properties") or {}).get("securityRules") or []:
            entry = _check_rule({"name": r.get("name", ""), "properties": copy.deepcopy(r.get("properties") or {})},
                                rules, rid)
            entry["id"] = f"{rid}/securityRules/{entry['name']}"
            entry["properties"]["provisioningState"] = "Succeeded"
            rules.append(entry)
        defaults = [{"name": n, "properties": {"priority": p, "access": a, "direction": "Inbound", "protocol": "*",
                                               "sourceAddressPrefix": s, "destinationAddressPrefix": "*",
                                               "sourcePortRange": "*", "destinationPortRange": "*"}}
                    for n, p, a, s in (("AllowVnetInBound", 65000, "Allow", "VirtualNetwork"),
                                       ("AllowAzureLoadBalancerInBound", 65001, "Allow", "AzureLoadBalancer"),
                                       ("DenyAllInBound", 65500, "Deny", "*"))]
        props: dict[str, Any] = {"securityRules": rules, "defaultSecurityRules": defaults}
        if current and current["properties"].get("networkInterfaces"):
            props["networkInterfaces"] = current["properties"]["networkInterfaces"]
        return props, lambda: None

    def put_pip(self, rid: str, body: dict[str, Any], current: Any) -> tuple[dict[str, Any], Callable[[], None]]:
        props = copy.deepcopy(body.get("properties") or {})
        sku = (body.get("sku") or {}).get("name", "Basic")
        if sku == "Standard" and props.get("publicIPAllocationMethod", "Dynamic") != "Static":
            raise bad("Standard sku public IP addresses must have publicIPAllocationMethod Static.",
                      "StandardSkuPublicIPAddressesCanOnlyHaveStaticAllocationMethod")
        props["ipAddress"] = current["properties"]["ipAddress"] if current else str(next(self._public))
        if current and current["properties"].get("ipConfiguration"):
            props["ipConfiguration"] = current["properties"]["ipConfiguration"]
        return props, lambda: None

    def put_nic(self, rid: str, body: dict[str, Any], current: Any) -> tuple[dict[str, Any], Callable[[], None]]:
        props = copy.deepcopy(body.get("properties") or {})
        configs = props.get("ipConfigurations") or []
        if len(configs) != 1:
            raise bad("a network interface needs one IP configuration (the fake supports exactly one)")
        cfg = configs[0]
        cprops = cfg.setdefault("properties", {})
        subnet_id = (cprops.get("subnet") or {}).get("id", "")
        vnet = self.resources.get(subnet_id.lower().rsplit("/subnets/", 1)[0]) if "/subnets/" in subnet_id else None
        subnet = next((s for s in (vnet["properties"]["subnets"] if vnet else [])
                       if s["id"].lower() == subnet_id.lower()), None)
        if subnet is None:
            raise bad(f"Subnet {subnet_id} referenced by the network interface does not exist.",
                      "InvalidResourceReference")
        if vnet["location"].lower() != body["location"].lower():
            raise bad(f"Subnet {subnet_id} is in location {vnet['location']}, the network interface in "
                      f"{body['location']}.", "InvalidResourceReference")
        pip_id = (cprops.get("publicIPAddress") or {}).get("id", "")
        pip = self.resources.get(pip_id.lower()) if pip_id else None
        if pip_id and pip is None:
            raise bad(f"Public IP address {pip_id} does not exist.", "InvalidResourceReference")
        cfg_id = f"{rid}/ipConfigurations/{cfg.get('name') or 'ipconfig1'}"
        if pip is not None:
            used = (pip["properties"].get("ipConfiguration") or {}).get("id", "")
            if used and used.lower() != cfg_id.lower():
                raise bad(f"Public IP address {pip_id} is in use by {used}.", "PublicIPAddressInUse")
        nsg_id = (props.get("networkSecurityGroup") or {}).get("id", "")
        nsg = self.resources.get(nsg_id.lower()) if nsg_id else None
        if nsg_id and nsg is None:
            raise bad(f"Network security group {nsg_id} does not exist.", "InvalidResourceReference")
        if current is not None:
            cprops["privateIPAddress"] = current["properties"]["ipConfigurations"][0]["properties"]["privateIPAddress"]
            self._unlink_nic(current)
        else:
            cprops["privateIPAddress"] = self._allocate(subnet)
        cprops["privateIPAllocationMethod"] = cprops.get("privateIPAllocationMethod", "Dynamic")
        cfg["id"] = cfg_id
        cfg["name"] = cfg.get("name") or "ipconfig1"
        cprops["provisioningState"] = "Succeeded"
        subnet["properties"].setdefault("ipConfigurations", []).append({"id": cfg_id})
        if pip is not None:
            pip["properties"]["ipConfiguration"] = {"id": cfg_id}
        if nsg is not None:
            nsg["properties"].setdefault("networkInterfaces", []).append({"id": rid})
        if current and current["properties"].get("virtualMachine"):
            props["virtualMachine"] = current["properties"]["virtualMachine"]
        props["ipConfigurations"] = [cfg]
        return props, lambda: None

    def _allocate(self, subnet: dict[str, Any]) -> str:
        net = ipaddress.ip_network(subnet["properties"]["addressPrefix"])
        taken = {c["properties"]["ipConfigurations"][0]["properties"]["privateIPAddress"]
                 for c in self.resources.values() if c["type"] == NIC}
        for i, host in enumerate(net.hosts()):
            if i >= 3 and str(host) not in taken:  # Azure keeps .1-.3 of every subnet for itself
                return str(host)
        raise ArmError(400, "SubnetIsFull", f"Subnet {subnet['name']} has no free address.")

    def _unlink_nic(self, nic: dict[str, Any]) -> None:
        """Remove the references other resources hold to this NIC (before it changes or goes)."""
        cfg = nic["properties"]["ipConfigurations"][0]
        cfg_id = cfg["id"].lower()
        for r in self.resources.values():
            if r["type"] == VNET:
                for s in r["properties"].get("subnets", []):
                    s["properties"]["ipConfigurations"] = [c for c in s["properties"].get("ipConfigurations", [])
                                                           if c["id"].lower() != cfg_id]
            elif r["type"] == PIP and (r["properties"].get("ipConfiguration") or {}).get("id", "").lower() == cfg_id:
                r["properties"].pop("ipConfiguration", None)
            elif r["type"] == NSG:
                r["properties"]["networkInterfaces"] = [n for n in r["properties"].get("networkInterfaces", [])
                                                        if n["id"].lower() != nic["id"].lower()]

    def put_vm(self, rid: str, body: dict[str, Any], current: Any) -> tuple[dict[str, Any], Callable[[], None]]:
        props = copy.deepcopy(body.get("properties") or {})
        name = rid.rsplit("/", 1)[1]
        if not (props.get("hardwareProfile") or {}).get("vmSize"):
            raise bad("hardwareProfile.vmSize is required")
        storage = props.get("storageProfile") or {}
        image = storage.get("imageReference") or {}
        if not (image.get("id") or all(image.get(k) for k in ("publisher", "offer", "sku", "version"))):
            raise bad("storageProfile.imageReference needs an id or publisher, offer, sku and version",
                      "InvalidParameter")
        nics = (props.get("networkProfile") or {}).get("networkInterfaces") or []
        if not nics:
            raise bad("networkProfile.networkInterfaces is required", "InvalidParameter")
        nic_objs = []
        for ref in nics:
            nic = self.resources.get(ref.get("id", "").lower())
            if nic is None:
                raise ArmError(400, "NetworkInterfaceNotFound", f"Network interface {ref.get('id')} not found.")
            if nic.get("_reserved_until", 0.0) > time.monotonic():
                raise nic_reserved(nic["id"])
            owner = (nic["properties"].get("virtualMachine") or {}).get("id", "")
            if owner and owner.lower() != rid.lower():
                raise ArmError(400, "NicInUse", f"Network interface {nic['id']} is used by virtual machine {owner}.")
            if nic["location"].lower() != body["location"].lower():
                raise bad(f"Network interface {nic['id']} is in location {nic['location']}.", "NicLocationMismatch")
            nic_objs.append(nic)
        custom = ""
        os_profile = props.get("osProfile") or {}
        if current is None:
            computer = os_profile.get("computerName", name)
            # Naming rules: a Linux computerName is 1-64 characters, none of the VM name's forbidden
            # ones nor '.', and not only digits.
            if not re.fullmatch(f"[^{_VM_BAD}.]{{1,64}}", computer) or computer.isdigit():
                raise bad(f"Linux host name cannot exceed 64 characters in length or contain the following "
                          f"characters: ~!@#$%^&*()=+_[]{{}}\\|;:.'\",<>/?. (computerName '{computer}')",
                          "InvalidParameter")
            admin = os_profile.get("adminUsername", "")
            if not admin or admin.lower() in RESERVED_ADMIN_NAMES:
                raise bad(f"The Admin Username specified is not allowed: '{admin}'.", "InvalidParameter")
            linux = os_profile.get("linuxConfiguration") or {}
            keys = ((linux.get("ssh") or {}).get("publicKeys")) or []
            if linux.get("disablePasswordAuthentication") and not keys:
                raise bad("Authentication using either SSH or by user name and password must be enabled in Linux "
                          "profile.", "InvalidParameter")
            for k in keys:
                if k.get("path") != f"/home/{admin}/.ssh/authorized_keys":
                    raise bad(f"The SSH key path {k.get('path')} is not /home/{admin}/.ssh/authorized_keys.",
                              "InvalidParameter")
            if "customData" in os_profile:
                try:
                    custom = base64.b64decode(os_profile["customData"], validate=True).decode()
                except (binascii.Error, UnicodeDecodeError):
                    raise bad("customData must be base64-encoded.", "InvalidParameter") from None
            os_profile.pop("customData", None)  # never returned, as Azure does
            os_disk = storage.setdefault("osDisk", {})
            disk_name = os_disk.get("name") or f"{name}_OsDisk_1_{uuid.uuid4().hex}"
            disk_id = f"{rid.split('/providers/')[0]}/providers/{DISK}/{disk_name}"
            os_disk["name"] = disk_name
            os_disk.setdefault("managedDisk", {})["id"] = disk_id
            size = os_disk.get("diskSizeGB", 30)
            self.resources[disk_id.lower()] = {
                "id": disk_id, "name": disk_name, "type": DISK, "location": body["location"], "tags": {},
                "managedBy": rid, "properties": {"diskSizeGB": size, "provisioningState": "Succeeded",
                                                 "diskState": "Attached", "osType": "Linux"}}
            self.custom_data[rid.lower()] = custom
            self.events.append(("vm-put", name))
            self._vm_puts += 1
        else:
            if "customData" in os_profile:
                raise ArmError(409, "PropertyChangeNotAllowed", "Changing property 'customData' is not allowed.")
            props["osProfile"] = current["properties"]["osProfile"]
            props["storageProfile"] = current["properties"]["storageProfile"]
        props["osProfile"] = props.get("osProfile", os_profile) if current else os_profile
        props["vmId"] = current["properties"]["vmId"] if current else str(uuid.uuid4())
        for nic in nic_objs:
            nic["properties"]["virtualMachine"] = {"id": rid}
        key = rid.lower()

        def created() -> None:
            vm = self.resources.get(key)
            if vm is None or current is not None:
                return
            vm["_power"] = "running"
            self.events.append(("vm-created", name))
            private = nic_objs[0]["properties"]["ipConfigurations"][0]["properties"]["privateIPAddress"]
            if self.on_vm_created:
                self.on_vm_created(self.view(vm), private, self.custom_data.get(key, ""))

        return props, created

    def put_disk(self, rid: str, body: dict[str, Any], current: Any) -> tuple[dict[str, Any], Callable[[], None]]:
        props = copy.deepcopy(body.get("properties") or {})
        props.setdefault("diskState", "Unattached")
        return props, lambda: None

    def start_vm(self, rid: str) -> tuple[int, Any, dict[str, str]]:
        vm = self.resources.get(rid.lower())
        if vm is None:
            raise self.not_found(VM, rid.rsplit("/", 1)[1], rid.split("/")[4])

        def started() -> None:
            if vm["_power"] != "running":
                vm["_power"] = "running"
                private = self._vm_private_ip(vm)
                if self.on_vm_created:
                    self.on_vm_created(self.view(vm), private, self.custom_data.get(rid.lower(), ""))

        op = self.new_operation(started, "vm-start", vm["name"])
        return 202, None, {**self.location_headers(op), **self.async_headers(op)}

    def deallocate(self, rid: str) -> None:
        """What a Spot eviction does: the VM stops (and a booted host with it)."""
        with self.lock:
            vm = self.resources[rid.lower()]
            vm["_power"] = "deallocated"
        if self.on_vm_deleted:
            self.on_vm_deleted(self.view(vm))

    def _vm_private_ip(self, vm: dict[str, Any]) -> str:
        nic = self.resources.get(vm["properties"]["networkProfile"]["networkInterfaces"][0]["id"].lower())
        return nic["properties"]["ipConfigurations"][0]["properties"]["privateIPAddress"] if nic else ""

    # --- deletion ---------------------------------------------------------------------------------

    def check_deletable(self, r: dict[str, Any]) -> None:
        rtype, name = r["type"], r["name"]
        if rtype == NIC and r.get("_reserved_until", 0.0) > time.monotonic():
            raise nic_reserved(r["id"])
        if rtype == NIC and r["properties"].get("virtualMachine"):
            raise ArmError(400, "NicInUse", f"Network Interface {r['id']} is used by existing resource "
                           f"{r['properties']['virtualMachine']['id']}. In order to delete the network interface, "
                           "it must be dissociated from the resource.")
        if rtype == PIP and r["properties"].get("ipConfiguration"):
            raise ArmError(400, "PublicIPAddressCannotBeDeleted", f"Public IP address {r['id']} can not be deleted "
                           f"since it is still allocated to resource {r['properties']['ipConfiguration']['id']}.")
        if rtype == NSG and r["properties"].get("networkInterfaces"):
            raise ArmError(400, "InUseNetworkSecurityGroupCannotBeDeleted", f"Network security group {name} cannot "
                           "be deleted because it is in use by "
                           f"{r['properties']['networkInterfaces'][0]['id']}.")
        if rtype == VNET and any(s["properties"].get("ipConfigurations") for s in r["properties"].get("subnets", [])):
            raise ArmError(400, "InUseSubnetCannotBeDeleted", f"Subnet of {name} is in use and cannot be deleted.")
        if rtype == DISK and r.get("managedBy"):
            raise ArmError(409, "OperationNotAllowed", f"Disk {name} is attached to VM {r['managedBy']}.")

    def delete_resource(self, key: str) -> None:
        r = self.resources.get(key)
        if r is None:
            return
        self.check_deletable(r)  # something may have started using it meanwhile
        del self.resources[key]
        if r["type"] == NIC:
            self._unlink_nic(r)
        elif r["type"] == VM:
            self._vm_gone(r)

    def _vm_gone(self, vm: dict[str, Any]) -> None:
        # deleteOption (Compute API, NetworkInterfaceReference.properties.deleteOption; Network API,
        # PublicIPAddress.properties.deleteOption): Delete removes the NIC (and its public IP, when that
        # says Delete too) with the VM; Detach (the default) leaves it, reserved (NIC_RESERVATION_SECONDS).
        for ref in vm["properties"]["networkProfile"]["networkInterfaces"]:
            nic = self.resources.get(ref["id"].lower())
            if nic is None:
                continue
            nic["properties"].pop("virtualMachine", None)
            if (ref.get("properties") or {}).get("deleteOption") != "Delete":
                nic["_reserved_until"] = time.monotonic() + self.nic_reservation
                continue
            del self.resources[nic["id"].lower()]
            self._unlink_nic(nic)
            for cfg in nic["properties"].get("ipConfigurations") or []:
                pip_id = ((cfg.get("properties") or {}).get("publicIPAddress") or {}).get("id", "").lower()
                pip = self.resources.get(pip_id)
                if pip is not None and pip["properties"].get("deleteOption") == "Delete":
                    del self.resources[pip_id]
        os_disk = vm["properties"]["storageProfile"].get("osDisk") or {}
        disk_key = ((os_disk.get("managedDisk") or {}).get("id") or "").lower()
        disk = self.resources.get(disk_key)
        if disk is not None:
            if os_disk.get("deleteOption") == "Delete":
                del self.resources[disk_key]
            else:
                disk.pop("managedBy", None)
                disk["properties"]["diskState"] = "Unattached"
        self.custom_data.pop(vm["id"].lower(), None)
        self.events.append(("vm-deleted", vm["name"]))
        if self.on_vm_deleted:
            self.on_vm_deleted(self.view(vm))


def nic_reserved(nic_id: str) -> ArmError:
    return ArmError(400, "NicReservedForAnotherVm", f"Network interface {nic_id} is reserved for another virtual "
                    f"machine for {int(NIC_RESERVATION_SECONDS)} seconds after that machine's deletion. Retry "
                    "later.")


def _tags(body: dict[str, Any]) -> dict[str, str]:
    tags = body.get("tags") or {}
    if len(tags) > 50:
        raise bad("at most 50 tags", "InvalidTag")
    for k, v in tags.items():
        if not k or len(k) > 512 or any(c in k for c in "<>%&\\?/") or len(str(v)) > 256:
            raise bad(f"The tag name '{k}' or its value is invalid.", "InvalidTagNameCharacters")
    return {str(k): str(v) for k, v in tags.items()}


def _tag_filter(query: dict[str, list[str]]) -> Callable[[dict[str, Any]], bool]:
    text = query.get("$filter", [""])[0]
    if not text:
        return lambda r: True
    m = re.fullmatch(r"\s*tagName eq '([^']*)'(?:\s+and\s+tagValue eq '([^']*)')?\s*", text)
    if not m:
        raise bad(f"Invalid $filter '{text}'.", "InvalidFilterInQueryString")
    name, value = m.group(1), m.group(2)
    return lambda r: name in r.get("tags", {}) and (value is None or r["tags"][name] == value)


def _check_subnet(entry: dict[str, Any], vnet: dict[str, Any]) -> None:
    prefix = entry["properties"].get("addressPrefix", "")
    try:
        net = ipaddress.ip_network(prefix)
    except ValueError:
        raise bad(f"Subnet {entry['name']}: invalid addressPrefix '{prefix}'.", "InvalidAddressPrefixFormat") from None
    spaces = [ipaddress.ip_network(p) for p in vnet["properties"]["addressSpace"]["addressPrefixes"]]
    if not any(net.version == s.version and net.subnet_of(s) for s in spaces):
        raise bad(f"Subnet '{entry['name']}' is not valid in virtual network: its prefix {prefix} is outside the "
                  "address space.", "NetcfgSubnetRangeOutsideVnet")


def _check_rule(entry: dict[str, Any], others: list[dict[str, Any]], nsg_id: str) -> dict[str, Any]:
    p = entry["properties"]
    name = entry["name"]
    if not name:
        raise bad("a security rule needs a name", "InvalidRequestFormat")
    if p.get("protocol") not in NSG_PROTOCOLS:
        raise bad(f"Security rule {name}: invalid protocol '{p.get('protocol')}'.", "SecurityRuleInvalidProtocol")
    if p.get("access") not in ("Allow", "Deny") or p.get("direction") not in ("Inbound", "Outbound"):
        raise bad(f"Security rule {name}: access and direction are required.", "InvalidRequestFormat")
    priority = p.get("priority")
    if not isinstance(priority, int) or not 100 <= priority <= 4096:
        raise bad(f"Security rule {name}: priority must be between 100 and 4096.", "SecurityRuleInvalidPriority")
    for o in others:
        if o["properties"]["priority"] == priority and o["properties"]["direction"] == p["direction"]:
            raise bad(f"Security rule {name} conflicts with rule {o['name']}: same priority and direction.",
                      "SecurityRuleConflict")
    for single, plural in (("sourceAddressPrefix", "sourceAddressPrefixes"),
                           ("destinationAddressPrefix", "destinationAddressPrefixes"),
                           ("sourcePortRange", "sourcePortRanges"), ("destinationPortRange", "destinationPortRanges")):
        if bool(p.get(single)) == bool(p.get(plural)):
            raise bad(f"Security rule {name}: exactly one of {single} and {plural} is required.",
                      "SecurityRuleParameterContainsUnsupportedValue")
    return entry


def _handler(fake: ArmFake) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # else every keep-alive response waits ~40 ms for an ACK

        def setup(self) -> None:
            self.request.do_handshake()
            super().setup()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass

        def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("x-ms-request-id", str(uuid.uuid4()))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _dispatch(self) -> None:
            split = urlsplit(self.path)
            path = split.path
            with fake.lock:
                fake.requests.append((self.command, path))
            raw = self._body()
            try:
                parts = [p for p in path.split("/") if p]
                if len(parts) == 4 and parts[1:] == ["v2.0", ".well-known", "openid-configuration"]:
                    return self._send(200, fake.openid_configuration(parts[0]))
                if len(parts) == 4 and parts[1:] == ["oauth2", "v2.0", "token"] and self.command == "POST":
                    return self._send(200, fake.issue_token(parts[0], parse_qs(raw.decode())))
                fake.check_auth(self.headers.get("Authorization", ""))
                body = json.loads(raw) if raw else None
                url = f"{fake.url}{quote(path)}" + (f"?{split.query}" if split.query else "")
                status, out, headers = fake.handle(self.command, path, parse_qs(split.query), body, url)
                self._send(status, out, headers)
            except ArmError as exc:
                # Entra's errors are OAuth-shaped (lowercase codes); ARM's are {"error": {code, message}}.
                body_out = exc.body() if not exc.code.islower() else {"error": exc.code,
                                                                      "error_description": exc.message}
                self._send(exc.status, None if self.command == "HEAD" else body_out, exc.headers)
            except ValueError as exc:
                self._send(400, {"error": {"code": "InvalidRequestContent", "message": str(exc)[:200]}})

        do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _dispatch

    return Handler
