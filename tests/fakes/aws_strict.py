"""A strict EC2 layer in front of moto: moto stays the state machine; this HTTP proxy on 127.0.0.1
checks the EC2 Query API requests against the rules of the EC2 API reference that moto does not
enforce, and answers with real EC2 error XML when one is broken. Every rule names its reference.
It is never stricter than the reference: where the reference allows something, it passes.

Rules (each in `StrictEc2.check` / the response hooks):
- Security group and rule descriptions: at most 255 characters of a-zA-Z0-9, space and
  ._-:/()#,@[]+=&;{}!$* (API reference: CreateSecurityGroup GroupDescription/GroupName, IpRange,
  Ipv6Range, UserIdGroupPair, PrefixListId: "Description ... Constraints").
- Tags: key 1-128 characters, value at most 256, keys may not start with "aws:", at most 50 tags per
  resource (EC2 User Guide "Tag restrictions"). EC2 itself allows any characters in tags.
- Rules per security group: 60 inbound rules per IP version; a rule naming a group counts once for
  each version; a referenced prefix list counts as its MaxEntries (VPC User Guide "Amazon VPC
  quotas", Security groups: "Inbound or outbound rules per security group"; Managed prefix lists:
  "the maximum number of entries for the prefix lists counts against the quota").
- RunInstances ClientToken: at most 64 ASCII characters; a repeat with the same parameters returns
  the original reservation, even when its instances were terminated since (tokens live at least 24 h
  after termination); different parameters -> IdempotentParameterMismatch ("Ensuring idempotency in
  Amazon EC2 API requests").
- Eventual consistency: the first `lag_calls` calls that name a resource made moments ago (by id in a
  parameter, not in a filter) answer its *.NotFound code ("Eventual consistency in the Amazon EC2
  API": "a resource ... created ... might not be immediately available to subsequent API calls").
  Instances: a launched instance is pending in the first describe that shows it, and one just
  terminated still shows its state from before in the first describe naming it (EC2 User Guide,
  "Instance lifecycle": pending before running; eventual consistency as above).
- DependencyViolation: right after TerminateInstances, detaching the VPC's internet gateway and
  deleting a group of those instances fail once more while their interfaces are released (EC2 API
  error codes: DependencyViolation; "the network interface ... is in use" / "mapped public
  address(es)").
"""

from __future__ import annotations

import hashlib
import http.client
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.fakes.server import LoopbackServer

DESCRIPTION_RE = re.compile(r"^[a-zA-Z0-9 ._\-:/()#,@\[\]+=&;{}!$*]*$")
DESCRIPTION_KEYS = re.compile(r"^(GroupDescription|GroupName|IpPermissions\.\d+\.(IpRanges|Ipv6Ranges|Groups|"
                              r"PrefixListIds)\.\d+\.Description)$")
TAG_KEY_RE = re.compile(r"^(TagSpecification\.\d+\.)?Tag\.\d+\.Key$")
RULE_QUOTA = 60
STATE_CODES = {"pending": 0, "running": 16, "stopping": 64}  # EC2 InstanceState codes
INSTANCE_STATE_RE = re.compile(r"(<instanceId>(i-[0-9a-f]+)</instanceId>.*?<instanceState>\s*<code>)(\d+)"
                               r"(</code>\s*<name>)([a-z-]+)(</name>)", re.S)
# Resource ids by prefix -> the NotFound code EC2 answers (EC2 API reference, "Error codes").
NOT_FOUND = {"vpc-": "InvalidVpcID.NotFound", "subnet-": "InvalidSubnetID.NotFound", "sg-": "InvalidGroup.NotFound",
             "igw-": "InvalidInternetGatewayID.NotFound", "rtb-": "InvalidRouteTableID.NotFound",
             "pl-": "InvalidPrefixListID.NotFound"}
# The id a create call makes, by its response element.
CREATED = {"CreateVpc": "vpcId", "CreateSubnet": "subnetId", "CreateSecurityGroup": "groupId",
           "CreateInternetGateway": "internetGatewayId", "CreateRouteTable": "routeTableId",
           "ImportKeyPair": "keyName", "CreateKeyPair": "keyName", "CreateManagedPrefixList": "prefixListId"}


def error_xml(code: str, message: str, request_id: str = "strict") -> bytes:
    """EC2's error body (Query API): Response/Errors/Error/{Code,Message}, RequestID."""
    from xml.sax.saxutils import escape

    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{escape(code)}</Code>'
            f"<Message>{escape(message)}</Message></Error></Errors><RequestID>{request_id}</RequestID>"
            "</Response>").encode()


def params_digest(form: dict[str, str]) -> str:
    """A request's parameters but its ClientToken: what a repeat of the token must match."""
    return hashlib.sha256(repr(sorted((k, v) for k, v in form.items() if k != "ClientToken")).encode()).hexdigest()


class Refusal(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.status = code, message, status


class StrictEc2(LoopbackServer):
    """Forwards to moto (`target`, its URL); `refused` lists "Action:Code" of each refusal. Use it in
    a with-block (or start()/close())."""

    def __init__(self, target: str, lag_calls: int = 1) -> None:
        self.target_url = target
        self.target = urllib.parse.urlsplit(target).netloc
        self.lag_calls = lag_calls
        self.refused: list[str] = []
        self.actions: list[str] = []
        self.lock = threading.RLock()
        self.tokens: dict[tuple[str, str], tuple[str, bytes]] = {}  # (region, token) -> (params digest, answer)
        self.lagging: dict[str, int] = {}  # id or key name -> calls still answered NotFound
        self.stale_states: dict[str, str] = {}  # instance id -> state the next describe still shows
        self.unseen: set[str] = set()  # launched instances no describe has shown yet (still pending)
        self.last_shown: dict[str, str] = {}  # instance id -> the state the last describe showed
        self.placed: dict[str, tuple[str, set[str]]] = {}  # instance -> (VPC, groups), from its launch
        self.releasing_vpcs: dict[str, int] = {}  # vpc -> refusals left for DetachInternetGateway
        self.releasing_groups: dict[str, int] = {}  # group -> refusals left for DeleteSecurityGroup
        self._clients: dict[str, Any] = {}
        layer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                self._forward(b"")

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                auth = self.headers.get("Authorization", "")
                scope = re.search(r"Credential=[^/]+/\d+/([^/]+)/([^/]+)/", auth)
                region, service = (scope.group(1), scope.group(2)) if scope else ("", "")
                if service != "ec2":
                    self._forward(body)
                    return
                form = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode(), keep_blank_values=True).items()}
                action = form.get("Action", "")
                with layer.lock:
                    layer.actions.append(action)
                try:
                    replay = layer.check(region, action, form)
                except Refusal as ref:
                    with layer.lock:
                        layer.refused.append(f"{action}:{ref.code}")
                    self._answer(ref.status, {"Content-Type": "text/xml"}, error_xml(ref.code, ref.message))
                    return
                if replay is not None:
                    self._answer(200, {"Content-Type": "text/xml"}, replay)
                    return
                status, headers, data = self._forward(body, answer=False)
                if status == 200:
                    data = layer.after(region, action, form, data)
                self._answer(status, headers, data)

            def _forward(self, body: bytes, answer: bool = True) -> tuple[int, dict[str, str], bytes]:
                conn = http.client.HTTPConnection(layer.target, timeout=300)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                keep = {k: v for k, v in resp.getheaders()
                        if k.lower() not in ("content-length", "transfer-encoding", "connection")}
                if answer:
                    self._answer(resp.status, keep, data)
                return resp.status, keep, data

            def _answer(self, status: int, headers: dict[str, str], data: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        super().__init__(Handler, "aws-strict")

    # --- moto, read directly (the layer's own look-ups never pass its rules) ------------------------

    def moto(self, region: str) -> Any:
        import boto3

        with self.lock:
            if region not in self._clients:
                self._clients[region] = boto3.client(
                    "ec2", region_name=region, endpoint_url=self.target_url, aws_access_key_id="testing",
                    aws_secret_access_key="testing")
            return self._clients[region]

    # --- the rules, before a request reaches moto -----------------------------------------------

    def check(self, region: str, action: str, form: dict[str, str]) -> bytes | None:
        """Raise Refusal for a broken rule; return an answer to give instead of moto's (a replay)."""
        self._check_descriptions(form)
        self._check_tags(form)
        self._check_lag(action, form)
        if action == "AuthorizeSecurityGroupIngress":
            self._check_rule_quota(region, form)
        elif action == "RunInstances":
            return self._check_token(region, form)
        elif action == "DetachInternetGateway":
            self._check_release(self.releasing_vpcs, form.get("VpcId", ""),
                                f"Network {form.get('VpcId')} has some mapped public address(es). Please unmap "
                                "those public address(es) before detaching the gateway.")
        elif action == "DeleteSecurityGroup":
            self._check_release(self.releasing_groups, form.get("GroupId", ""),
                                f"resource {form.get('GroupId')} has a dependent object")
        return None

    def _check_descriptions(self, form: dict[str, str]) -> None:
        # API reference, CreateSecurityGroup (GroupName, GroupDescription) and IpRange / Ipv6Range /
        # UserIdGroupPair / PrefixListId Description: "Up to 255 characters in length. Allowed
        # characters are a-z, A-Z, 0-9, spaces, and ._-:/()#,@[]+=&;{}!$*".
        for key, value in form.items():
            if DESCRIPTION_KEYS.match(key) and (len(value) > 255 or not DESCRIPTION_RE.match(value)):
                bad = sorted({c for c in value if not DESCRIPTION_RE.match(c)})
                raise Refusal("InvalidParameterValue", f"Value ({value}) for parameter {key} is invalid. "
                              f"Character sets beyond ASCII are not supported. {''.join(bad)!r}")

    def _check_tags(self, form: dict[str, str]) -> None:
        # EC2 User Guide, "Tag restrictions": key 1-128 characters, value 0-256, "aws:" reserved
        # (keys), at most 50 tags per resource; EC2 allows any characters.
        per_spec: dict[str, int] = {}
        for key, value in form.items():
            if not TAG_KEY_RE.match(key):
                continue
            spec = key.split("Tag.")[0]
            per_spec[spec] = per_spec.get(spec, 0) + 1
            tag_value = form.get(key[:-len("Key")] + "Value", "")
            if not 1 <= len(value) <= 128:
                raise Refusal("InvalidParameterValue", f"Tag key exceeds the maximum length of 128 characters: {key}")
            if value.lower().startswith("aws:"):
                raise Refusal("InvalidParameterValue", "Tag keys starting with 'aws:' are reserved for internal use")
            if len(tag_value) > 256:
                raise Refusal("InvalidParameterValue", f"Tag value exceeds the maximum length of 256 characters: "
                              f"{value}")
        if any(n > 50 for n in per_spec.values()):
            raise Refusal("TagLimitExceeded", "The maximum number of Tags for a resource has been reached.")

    def _check_lag(self, action: str, form: dict[str, str]) -> None:
        # "Eventual consistency in the Amazon EC2 API": ids named directly (not filters, not the tags
        # a create call carries) are unknown for the first calls after their create call.
        with self.lock:
            for key, value in form.items():
                if key.startswith(("Filter.", "TagSpecification.")) or self.lagging.get(value, 0) <= 0:
                    continue
                if key != "KeyName" and not value.startswith(tuple(NOT_FOUND)):
                    continue
                self.lagging[value] -= 1
                code = "InvalidKeyPair.NotFound" if key == "KeyName" else NOT_FOUND[
                    next(p for p in NOT_FOUND if value.startswith(p))]
                raise Refusal(code, f"The ID '{value}' does not exist")

    def _check_rule_quota(self, region: str, form: dict[str, str]) -> None:
        # VPC quotas: 60 inbound rules per group and IP version; a group reference counts for both
        # versions; a prefix list counts as its MaxEntries.
        group_id = form.get("GroupId", "")
        if not group_id:
            return
        ec2 = self.moto(region)
        groups = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
        perms = groups[0].get("IpPermissions") or [] if groups else []
        v4, v6 = self._weights(region, perms)
        new: list[dict[str, Any]] = []
        index: dict[str, dict[str, Any]] = {}
        for key, value in form.items():
            m = re.match(r"^IpPermissions\.(\d+)\.(IpRanges|Ipv6Ranges|Groups|PrefixListIds)\.(\d+)\.(\w+)$", key)
            if m:
                perm = index.setdefault(m.group(1), {"IpRanges": {}, "Ipv6Ranges": {}, "UserIdGroupPairs": {},
                                                     "PrefixListIds": {}})
                kind = "UserIdGroupPairs" if m.group(2) == "Groups" else m.group(2)
                perm[kind].setdefault(m.group(3), {})[m.group(4)] = value
        for perm in index.values():
            new.append({k: list(v.values()) for k, v in perm.items()})
        add4, add6 = self._weights(region, new)
        if v4 + add4 > RULE_QUOTA or v6 + add6 > RULE_QUOTA:
            raise Refusal("RulesPerSecurityGroupLimitExceeded",
                          "The maximum number of rules per security group has been reached.")

    def _weights(self, region: str, perms: list[dict[str, Any]]) -> tuple[int, int]:
        v4 = v6 = 0
        for perm in perms:
            v4 += len(perm.get("IpRanges") or [])
            v6 += len(perm.get("Ipv6Ranges") or [])
            pairs = len(perm.get("UserIdGroupPairs") or [])
            v4, v6 = v4 + pairs, v6 + pairs
            for ref in perm.get("PrefixListIds") or []:
                found = self.moto(region).describe_managed_prefix_lists(
                    PrefixListIds=[ref["PrefixListId"]])["PrefixLists"]
                size = int(found[0].get("MaxEntries") or 1) if found else 1
                if found and found[0].get("AddressFamily") == "IPv6":
                    v6 += size
                else:
                    v4 += size
        return v4, v6

    def _check_token(self, region: str, form: dict[str, str]) -> bytes | None:
        # RunInstances ClientToken: "Constraints: Maximum 64 ASCII characters"; a repeat returns the
        # original result, a repeat with other parameters is IdempotentParameterMismatch; EC2 keeps
        # a token at least 24 hours after the instances' termination (this layer: its whole life).
        token = form.get("ClientToken", "")
        if not token:
            return None
        if len(token) > 64 or not token.isascii():
            raise Refusal("InvalidParameterValue", "ClientToken must be at most 64 ASCII characters")
        digest = params_digest(form)
        with self.lock:
            seen = self.tokens.get((region, token))
        if seen is None:
            return None
        if seen[0] != digest:
            raise Refusal("IdempotentParameterMismatch",
                          "The client token you have provided is associated with a resource that has "
                          "different parameters.")
        return seen[1]

    def _check_release(self, pending: dict[str, int], key: str, message: str) -> None:
        with self.lock:
            if pending.get(key, 0) > 0:
                pending[key] -= 1
                raise Refusal("DependencyViolation", message)

    # --- after moto answered ----------------------------------------------------------------------

    def after(self, region: str, action: str, form: dict[str, str], data: bytes) -> bytes:
        text = data.decode(errors="replace")
        with self.lock:
            if action in CREATED:
                m = re.search(rf"<{CREATED[action]}>([^<]+)</{CREATED[action]}>", text)
                if m:
                    self.lagging[m.group(1)] = self.lag_calls
            if action == "RunInstances":
                if form.get("ClientToken"):
                    self.tokens[(region, form["ClientToken"])] = (params_digest(form), data)
                launched = set(re.findall(r"<instanceId>(i-[0-9a-f]+)</instanceId>", text))
                self.unseen |= launched
                # Where they are (one launch: one subnet, VPC and set of groups), for DependencyViolation.
                vpc = re.search(r"<vpcId>([^<]+)</vpcId>", text)
                groups = set(re.findall(r"<groupId>(sg-[0-9a-f]+)</groupId>", text))
                for iid in launched:
                    self.placed[iid] = (vpc.group(1) if vpc else "", groups)
        if action == "TerminateInstances":
            self._terminated(form)
        elif action == "DescribeInstances":
            data = self._stale_describe(form, text)
        return data

    def _terminated(self, form: dict[str, str]) -> None:
        with self.lock:
            for iid in (v for k, v in form.items() if k.startswith("InstanceId.")):
                shown = "pending" if iid in self.unseen else self.last_shown.get(iid, "running")
                if shown in STATE_CODES:
                    self.stale_states[iid] = shown
                vpc, groups = self.placed.get(iid, ("", set()))
                if vpc:
                    self.releasing_vpcs[vpc] = 1
                for group in groups:
                    self.releasing_groups[group] = 1

    def _stale_describe(self, form: dict[str, str], text: str) -> bytes:
        """A launched instance is pending in the first describe that shows it (moto: running at once);
        one just terminated, in the first describe naming it, still shows its state from before."""
        named = {v for k, v in form.items() if k.startswith("InstanceId.")}

        def shown(m: re.Match[str]) -> str:
            iid, state = m.group(2), m.group(5)
            with self.lock:
                if iid in named and iid in self.stale_states:
                    state = self.stale_states.pop(iid)
                elif iid in self.unseen and state == "running":
                    state = "pending"
                self.unseen.discard(iid)
                self.last_shown[iid] = state
            if state == m.group(5):
                return m.group(0)
            return f"{m.group(1)}{STATE_CODES[state]}{m.group(4)}{state}{m.group(6)}"

        # One pass over the answer (an instance's id comes before its state in each item).
        return INSTANCE_STATE_RE.sub(shown, text).encode()
