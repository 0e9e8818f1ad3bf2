"""Azure Resource Manager access for the azure provider: credentials, clients, errors and pollers.

The azure SDKs are imported here, inside functions, never at module import.

- Credentials: `DefaultAzureCredential` (environment: AZURE_TENANT_ID/AZURE_CLIENT_ID/AZURE_CLIENT_SECRET or a
  certificate; workload or managed identity; `az login`, azd, PowerShell), never an interactive browser.
  AZURE_AUTHORITY_HOST names another Entra authority (sovereign clouds, Azure Stack); when it is not one
  of Microsoft's well-known hosts, msal's instance discovery (which asks login.microsoftonline.com about
  the host) is turned off, since the user named that authority explicitly.
- Endpoint: env DCX_AZURE_ENDPOINT (e.g. https://management.chinacloudapi.cn, or a local fake) replaces
  https://management.azure.com; tokens are then asked for `ENDPOINT/.default`.
- TLS: env DCX_AZURE_CA_BUNDLE, a PEM file of CA certificates, becomes every client's and the
  credential's `connection_verify` (a private cloud's CA; tests' own CA). REQUESTS_CA_BUNDLE works too.
- Polling: long-running operations are polled every DCX_AZURE_POLL_INTERVAL seconds (default 5) unless
  Azure's Retry-After says otherwise. Throttling (429 + Retry-After) and 5xx are retried by azure-core's
  default retry policy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from dcx.errors import ProviderError

ENDPOINT_ENV = "DCX_AZURE_ENDPOINT"
CA_ENV = "DCX_AZURE_CA_BUNDLE"
POLL_ENV = "DCX_AZURE_POLL_INTERVAL"
SUBSCRIPTION_ENV = "AZURE_SUBSCRIPTION_ID"
DEFAULT_ENDPOINT = "https://management.azure.com"
DEFAULT_POLL = 5.0
PARALLEL_CALLS = 16  # initial requests of a batch of long-running operations sent at once
OPERATION_TIMEOUT = 1800.0  # seconds a batch of long-running operations may take before dcx gives up on it
POOL_SIZE = 64  # connections per client: every poller polls from its own thread
WELL_KNOWN_AUTHORITIES = {"login.microsoftonline.com", "login.chinacloudapi.cn", "login.microsoftonline.us",
                          "login.microsoftonline.de", "login.windows.net", "login.microsoft.com", "sts.windows.net"}
CREDENTIAL_HINT = ("run `az login`, or set AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET (a service "
                   "principal), or run on a machine with a managed identity")


class _ToDcxLog(logging.Handler):
    """azure-core and azure-identity log warnings (a failed credential in the chain, a retry) through
    Python's logging: they belong in the run log, not on the user's terminal."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__(logging.DEBUG)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.debug("%s: %s", record.name, record.getMessage().split("\n")[0][:500])


_log_routed = False
_log_lock = threading.Lock()


def route_sdk_logs(target: logging.Logger) -> None:
    global _log_routed
    with _log_lock:
        if _log_routed:
            return
        for name in ("azure", "msal"):
            logger = logging.getLogger(name)
            logger.propagate = False
            logger.setLevel(logging.WARNING)
            logger.addHandler(_ToDcxLog(target))
        _log_routed = True


def authority_is_custom() -> bool:
    host = os.environ.get("AZURE_AUTHORITY_HOST", "").strip()
    if not host:
        return False
    name = urlsplit(host if "://" in host else f"https://{host}").hostname or ""
    return name.lower() not in WELL_KNOWN_AUTHORITIES


class AzureApi:
    """One credential and one client per (kind, subscription), with the endpoint, CA and polling settings."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.endpoint = os.environ.get(ENDPOINT_ENV, "").strip().rstrip("/")
        self.ca_bundle = os.environ.get(CA_ENV, "").strip()
        raw_poll = os.environ.get(POLL_ENV, "").strip()
        try:
            self.poll_interval = float(raw_poll) if raw_poll else DEFAULT_POLL
        except ValueError:
            raise ProviderError(f"{POLL_ENV}={raw_poll!r} is not a number of seconds") from None
        if self.ca_bundle and not os.path.isfile(self.ca_bundle):
            raise ProviderError(f"{CA_ENV} names {self.ca_bundle}, which is not a file",
                                hint="give the path of a PEM file of CA certificates, or unset it")
        self._credential: Any = None
        self._token_checked = False
        self.identity = ""  # who the credential is (from its token's claims), once credential() ran
        self._clients: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        route_sdk_logs(log)
        from dcx.log import register_secret

        register_secret(os.environ.get("AZURE_CLIENT_SECRET", ""))  # never in a log line or an error

    @property
    def scope(self) -> str:
        return f"{self.endpoint or DEFAULT_ENDPOINT}/.default"

    def _transport_kwargs(self) -> dict[str, Any]:
        return {"connection_verify": self.ca_bundle} if self.ca_bundle else {}

    def credential(self) -> Any:
        """The credential, with a token already obtained once (so a missing or refused credential is
        reported as such, in one line, before any resource call)."""
        with self._lock:
            if self._credential is None:
                from azure.identity import DefaultAzureCredential

                kwargs: dict[str, Any] = {"exclude_interactive_browser_credential": True, **self._transport_kwargs()}
                if authority_is_custom():
                    kwargs["disable_instance_discovery"] = True
                self._credential = DefaultAzureCredential(**kwargs)
            if not self._token_checked:
                self._check_token()
                self._token_checked = True
            return self._credential

    def _check_token(self) -> None:
        from azure.core.exceptions import ClientAuthenticationError
        from azure.identity import CredentialUnavailableError

        try:
            self.identity = identity_of(self._credential.get_token(self.scope).token)
        except ClientAuthenticationError as exc:
            text = str(getattr(exc, "message", "") or exc)
            # DefaultAzureCredential reports "every credential was unavailable" as a plain
            # ClientAuthenticationError too; a credential that was tried and refused says so.
            if isinstance(exc, CredentialUnavailableError) or not ("AADSTS" in text or "Authentication failed" in text):
                raise ProviderError("no Azure credentials found", hint=CREDENTIAL_HINT) from None
            raise ProviderError(f"the Azure credentials were refused: {_auth_detail(exc)}",
                                hint="check AZURE_TENANT_ID/AZURE_CLIENT_ID/AZURE_CLIENT_SECRET, or run `az login` "
                                     "again") from None
        except ValueError as exc:  # e.g. an authority msal cannot use
            raise ProviderError(f"Azure credentials: {str(exc).splitlines()[0][:200]}",
                                hint="check AZURE_AUTHORITY_HOST and AZURE_TENANT_ID") from None

    def client(self, kind: str, subscription: str) -> Any:
        """A management client: kind is "resource", "network" or "compute"."""
        key = (kind, subscription)
        if key in self._clients:
            return self._clients[key]
        credential = self.credential()
        import requests
        from azure.core.pipeline.transport import RequestsTransport

        if kind == "resource":
            from azure.mgmt.resource.resources import ResourceManagementClient as cls
        elif kind == "network":
            from azure.mgmt.network import NetworkManagementClient as cls
        else:
            from azure.mgmt.compute import ComputeManagementClient as cls
        # Every poller polls from its own thread: a bigger connection pool than requests' 10, so that
        # a pool of 50 VMs reuses connections instead of opening and discarding them.
        session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        transport = RequestsTransport(session=session, session_owner=True, **self._transport_kwargs())
        kwargs: dict[str, Any] = {"polling_interval": self.poll_interval, "transport": transport}
        if self.endpoint:
            kwargs.update(base_url=self.endpoint, credential_scopes=[self.scope])
        client = cls(credential, subscription, **kwargs)
        with self._lock:
            return self._clients.setdefault(key, client)

    def resource(self, subscription: str) -> Any:
        return self.client("resource", subscription)

    def network(self, subscription: str) -> Any:
        return self.client("network", subscription)

    def compute(self, subscription: str) -> Any:
        return self.client("compute", subscription)

    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """Turn SDK errors into one-line ProviderErrors naming what was being done."""
        from azure.core.exceptions import AzureError

        try:
            yield
        except AzureError as exc:
            raise provider_error(what, exc) from None

    def run_all(self, what: str, items: list[Any], begin: Callable[[Any], Any]) -> list[Any]:
        """Start a long-running operation for every item (their first requests PARALLEL_CALLS at a time),
        then wait on every poller; pollers poll from their own threads, so the operations run together.
        Every operation is waited for before the first error, if any, is raised. Returns the results."""
        if not items:
            return []
        from azure.core.exceptions import AzureError

        failures: list[tuple[Any, BaseException]] = []

        def start(item: Any) -> Any:
            try:
                return begin(item)
            except (AzureError, ProviderError) as exc:
                failures.append((item, exc))
                return None

        with ThreadPoolExecutor(max_workers=min(PARALLEL_CALLS, len(items))) as pool:
            pollers = list(pool.map(start, items))
        results = []
        deadline = time.monotonic() + OPERATION_TIMEOUT
        for item, poller in zip(items, pollers, strict=True):
            if poller is None:
                results.append(None)
                continue
            try:
                poller.wait(timeout=max(0.0, deadline - time.monotonic()))
                if not poller.done():
                    # A re-run finds what finished meanwhile (deterministic names): nothing is lost.
                    failures.append((item, ProviderError(
                        f"Azure {what} {_label(item)}: still running after {OPERATION_TIMEOUT / 60:.0f} minutes",
                        hint="check the operation in the Azure portal, then run the command again")))
                    results.append(None)
                    continue
                results.append(poller.result())
            except AzureError as exc:
                failures.append((item, exc))
                results.append(None)
        if failures:
            item, exc = failures[0]
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            error = exc if isinstance(exc, ProviderError) else provider_error(f"{what} {_label(item)}", exc)
            raise ProviderError(error.message + more, hint=error.hint) from None
        return results


def identity_of(token: str) -> str:
    """Who an Entra access token was issued to, from its claims (the token is a JWT; its signature is
    not ours to check): a user's `upn` (or `unique_name`), else an application's `appid` (or `azp`),
    else the object id `oid`. "" when the token says none of them (an opaque token)."""
    import base64
    import json

    parts = token.split(".")
    if len(parts) != 3:
        return ""
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return ""
    if not isinstance(claims, dict):
        return ""
    for key, label in (("upn", ""), ("unique_name", ""), ("appid", "app:"), ("azp", "app:"), ("oid", "oid:")):
        if claims.get(key):
            return f"{label}{claims[key]}"[:256]  # a tag value holds at most 256 characters
    return ""


def provider_error(what: str, exc: BaseException) -> ProviderError:
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError

    if isinstance(exc, ClientAuthenticationError):
        return ProviderError(f"Azure {what}: authentication failed: {_auth_detail(exc)}", hint=CREDENTIAL_HINT)
    if isinstance(exc, HttpResponseError):
        code, message = error_of(exc)
        error = ProviderError(f"Azure {what}: {code}: {message}" if code else f"Azure {what}: {message}",
                              hint=_hint(code, getattr(exc, "status_code", None)))
        error.code = code  # type: ignore[attr-defined] # callers react to some codes (registration)
        return error
    # Transport errors: cannot connect, TLS, timeouts.
    return ProviderError(f"Azure {what}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                         hint=f"check the network, and {ENDPOINT_ENV} / {CA_ENV} if set")


def _label(item: Any) -> str:
    return item if isinstance(item, str) else str(getattr(item, "name", item))


def error_of(exc: Any) -> tuple[str, str]:
    """(ARM error code, first line of its message) of an HttpResponseError."""
    error = getattr(exc, "error", None)
    code = getattr(error, "code", None) or ""
    message = getattr(error, "message", None) or getattr(exc, "message", None) or str(exc)
    message = str(message).strip().split("\n")[0]
    if code and message.startswith(f"({code})"):
        message = message[len(code) + 2:].strip()
    return code, message[:300]


def code_of(exc: BaseException) -> str:
    """The ARM error code of an SDK error, or of a ProviderError made from one."""
    if isinstance(exc, ProviderError):
        return str(getattr(exc, "code", "") or "")
    return error_of(exc)[0]


NOT_REGISTERED = "MissingSubscriptionRegistration"
REGISTRATION_TIMEOUT = 600.0  # seconds; Azure documents registration as taking "a few minutes"


def register_namespace(api: AzureApi, subscription: str, namespace: str) -> None:
    """Register a resource provider namespace in the subscription and wait until it is Registered
    (Resources API: Providers - Register, then Providers - Get until registrationState is Registered).
    An identity that may not register gets one line saying what to ask the subscription's admin for."""
    rc = api.resource(subscription)
    api.log.info("azure: registering resource provider %s in subscription %s", namespace, subscription)
    try:
        with api.errors(f"register resource provider {namespace}"):
            rc.providers.register(namespace)
    except ProviderError as exc:
        if code_of(exc) not in ("AuthorizationFailed", "LinkedAuthorizationFailed"):
            raise
        raise ProviderError(f"Azure subscription {subscription} has not registered the resource provider {namespace} "
                            "and this identity may not register it",
                            hint=f"ask an admin of the subscription to run `az provider register --namespace "
                                 f"{namespace}` (or to grant {namespace}/register/action)") from None
    deadline = time.monotonic() + REGISTRATION_TIMEOUT
    while True:
        with api.errors(f"get resource provider {namespace}"):
            state = rc.providers.get(namespace).registration_state
        if state == "Registered":
            return
        if time.monotonic() > deadline:
            raise ProviderError(f"Azure resource provider {namespace}: still {state} after "
                                f"{REGISTRATION_TIMEOUT / 60:.0f} minutes", hint="run the command again later")
        time.sleep(max(api.poll_interval, 1.0))


def is_not_found(exc: BaseException) -> bool:
    from azure.core.exceptions import ResourceNotFoundError

    return isinstance(exc, ResourceNotFoundError)


def _auth_detail(exc: BaseException) -> str:
    """The line of an identity error that says why (AADSTS...), never the whole chain's report."""
    text = str(getattr(exc, "message", "") or exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "AADSTS" in ln:
            return ln[ln.index("AADSTS"):][:200]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def _hint(code: str, status: int | None) -> str | None:
    if status == 403 or code in ("AuthorizationFailed", "LinkedAuthorizationFailed"):
        return "the identity needs the Contributor role on the subscription (or on the resource group)"
    if code in ("SubscriptionNotFound", "InvalidSubscriptionId"):
        return "check azure.subscription (or AZURE_SUBSCRIPTION_ID)"
    if "Quota" in code or code in ("SkuNotAvailable", "ZonalAllocationFailed", "AllocationFailed",
                                   "OverconstrainedAllocationRequest"):
        return "use another vmSize or location, or raise the quota in the Azure portal (Quotas)"
    if code in ("NoRegisteredProviderFound", "LocationNotAvailableForResourceType", "InvalidLocation"):
        return "check azure.location (e.g. westeurope)"
    if code == "MissingSubscriptionRegistration":
        return "register the resource provider: az provider register --namespace Microsoft.Compute (and .Network)"
    return None
