"""boto3 plumbing for the aws provider: one EC2 client per region (botocore's adaptive retry mode),
credentials and region resolved through boto3's own chain with one-line errors, AWS errors turned
into ProviderError, and small helpers for tags, filters and paging.

boto3 is imported here, inside methods: importing dcx.providers.aws must not import it. boto3 honours
AWS_ENDPOINT_URL (and AWS_ENDPOINT_URL_EC2) itself, which is how the tests point it at moto.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

from dcx.errors import ProviderError

RETRIES = {"mode": "adaptive", "max_attempts": 10}
CREDENTIALS_HINT = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, "
                    "or run `aws configure` (boto3's standard credential chain)")
REGION_HINT = "set aws.region in the pool, or AWS_REGION / AWS_DEFAULT_REGION, or a region in ~/.aws/config"
# EC2 API reference, CreateSecurityGroup / IpRange / Ipv6Range / UserIdGroupPair "Description":
# "Up to 255 characters in length. Allowed characters are a-z, A-Z, 0-9, spaces, and
# ._-:/()#,@[]+=&;{}!$*" (group names: the same set).
EC2_TEXT_RE = re.compile(r"^[a-zA-Z0-9 ._\-:/()#,@\[\]+=&;{}!$*]{0,255}$")
# EC2 User Guide, "Tag restrictions": keys 1-128 characters, values up to 256, "aws:" reserved.
TAG_KEY_MAX, TAG_VALUE_MAX = 128, 256
# "Eventual consistency in the Amazon EC2 API": a resource made a moment ago may be unknown to the
# next calls that name it. Waits between tries (seconds) for such calls.
SETTLE_DELAYS = (0.5, 1, 2, 4, 8, 15)
# Codes meaning the credentials themselves are wrong (not retryable, not the user's spec).
AUTH_CODES = {"AuthFailure", "UnrecognizedClientException", "InvalidClientTokenId", "SignatureDoesNotMatch",
              "ExpiredToken", "RequestExpired", "InvalidAccessKeyId"}


def code_of(exc: BaseException) -> str:
    """The AWS error code of a botocore ClientError ('' for anything else)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def message_of(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Message", "")).strip()
    return str(exc)


class AwsApi:
    """Clients per region, made once per run (boto3 sessions are not thread-safe; clients are)."""

    def __init__(self) -> None:
        self._session: Any = None
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._caller: str | None = None

    def session(self) -> Any:
        if self._session is None:
            import boto3

            with self.errors("read the AWS configuration"):
                self._session = boto3.session.Session()
        return self._session

    def default_region(self) -> str:
        """AWS_REGION, then boto3's chain (AWS_DEFAULT_REGION, the profile's config)."""
        return os.environ.get("AWS_REGION", "") or self.session().region_name or ""

    def region(self, configured: str) -> str:
        region = configured or self.default_region()
        if not region:
            raise ProviderError("no AWS region for an aws pool", hint=REGION_HINT)
        return region

    def caller(self) -> str:
        """The ARN of the identity the credentials belong to (STS GetCallerIdentity needs no IAM
        permission): recorded in the dcx:created-by tag. '' when STS cannot say. Asked in a region
        dcx works in (its partition's STS: GovCloud and China credentials work only there)."""
        if self._caller is None:
            self._caller = ""
            region = next(iter(self._clients), "") or self.default_region() or "us-east-1"
            with contextlib.suppress(Exception):
                sts = self.session().client("sts", region_name=region)
                self._caller = str(sts.get_caller_identity().get("Arn", ""))[:TAG_VALUE_MAX]
        return self._caller

    def ec2(self, region: str) -> Any:
        with self._lock:
            client = self._clients.get(region)
            if client is None:
                from botocore.config import Config

                session = self.session()
                with self.errors("read the AWS credentials"):
                    credentials = session.get_credentials()
                if credentials is None:
                    raise ProviderError("no AWS credentials found", hint=CREDENTIALS_HINT)
                client = session.client("ec2", region_name=region, config=Config(retries=RETRIES))
                self._clients[region] = client
            return client

    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """Turn botocore's exceptions into one line naming what dcx was doing."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            NoRegionError,
            PartialCredentialsError,
            ProfileNotFound,
            WaiterError,
        )

        try:
            yield
        except NoCredentialsError:
            raise ProviderError("no AWS credentials found", hint=CREDENTIALS_HINT) from None
        except NoRegionError:
            raise ProviderError("no AWS region for an aws pool", hint=REGION_HINT) from None
        except (PartialCredentialsError, ProfileNotFound) as exc:
            raise ProviderError(f"incomplete AWS credentials: {exc}", hint=CREDENTIALS_HINT) from None
        except ClientError as exc:
            code = code_of(exc)
            if code in AUTH_CODES:
                raise ProviderError(f"AWS rejected the credentials ({code}) while trying to {what}",
                                    hint=CREDENTIALS_HINT) from None
            if code in ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException"):
                raise ProviderError(f"AWS denied permission to {what} ({code})",
                                    hint="the credentials' IAM policy must allow the EC2 actions dcx uses") from None
            raise ProviderError(f"AWS could not {what}: {code}: {message_of(exc)}") from None
        except WaiterError as exc:
            # e.g. "Waiter InstanceRunning failed: ... matched expected path: "terminated"" (a spot
            # request not fulfilled, an instance that failed to start).
            raise ProviderError(f"AWS: cannot {what}: {exc}") from None
        except EndpointConnectionError as exc:
            raise ProviderError(f"cannot reach AWS to {what}: {exc}",
                                hint="check the network, a proxy, or AWS_ENDPOINT_URL") from None
        except BotoCoreError as exc:
            raise ProviderError(f"AWS SDK error while trying to {what}: {exc}") from None


def ec2_text(text: str, what: str) -> str:
    """A security group name or description, or a rule description, as EC2 accepts it; anything else
    is dcx's bug (or a name that slipped past the spec's checks), said before any call is made."""
    if not EC2_TEXT_RE.match(text):
        bad = "".join(sorted({c for c in text if not EC2_TEXT_RE.match(c)}))
        raise ProviderError(f"{what} '{text[:80]}' is not valid for EC2 "
                            + (f"(characters {bad!r} are not allowed)" if bad else "(over 255 characters)"))
    return text


def checked_tags(tags: dict[str, str]) -> dict[str, str]:
    """Tags as EC2 accepts them (the one check of every tag dcx sends)."""
    for key, value in tags.items():
        if not 1 <= len(key) <= TAG_KEY_MAX or key.lower().startswith("aws:"):
            raise ProviderError(f"tag key '{key[:40]}' is not valid for EC2 (1-{TAG_KEY_MAX} characters, "
                                "not starting with aws:)")
        if len(value) > TAG_VALUE_MAX:
            raise ProviderError(f"the value of tag '{key}' is longer than {TAG_VALUE_MAX} characters")
    return tags


def settle(call: Any, *args: Any, **kwargs: Any) -> Any:
    """Make a call that names a resource dcx made moments ago: EC2 may answer *.NotFound for a while
    after the create call (eventual consistency); retry those briefly, then let the error through."""
    for delay in (*SETTLE_DELAYS, None):
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            if delay is None or not code_of(exc).endswith(".NotFound"):
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")


def tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in checked_tags(tags).items()]


def tags_of(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags") or []}


def tag_spec(resource_type: str, tags: dict[str, str]) -> dict[str, Any]:
    return {"ResourceType": resource_type, "Tags": tag_list(tags)}


def paged(client: Any, operation: str, key: str, **params: Any) -> list[dict[str, Any]]:
    """Every item of a describe call, page by page (one call per page, never one per resource)."""
    out: list[dict[str, Any]] = []
    if not client.can_paginate(operation):  # e.g. describe_key_pairs: one answer holds everything
        params.pop("PaginationConfig", None)
        pages = [getattr(client, operation)(**params)]
    else:
        pages = client.get_paginator(operation).paginate(**params)
    for page in pages:
        if key == "Instances":  # describe_instances pages reservations
            for reservation in page.get("Reservations", []):
                out.extend(reservation.get("Instances", []))
        else:
            out.extend(page.get(key, []))
    return out


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
