"""Compute Engine API access for the gcp provider: credentials (ADC), clients, retries, operations.

google-cloud-compute is imported here, inside functions, never at module import (it costs ~1.6 s).

- Credentials: `google.auth.default()` (Application Default Credentials: GOOGLE_APPLICATION_CREDENTIALS,
  `gcloud auth application-default login`, the metadata server on GCE).
- Endpoint: env DCX_GCP_ENDPOINT (e.g. `https://compute.p.googleapis.com` for a private endpoint, or
  `http://127.0.0.1:PORT` for a local fake) becomes every client's `api_endpoint`.
- Operations: insert/delete calls return an Operation; we wait on it with a Zone/Region/Global
  operations client built from the same credentials and endpoint (`operation.result()`'s internal
  poller is built without the client options and would call the public endpoint).
- Retries: the REST transport does not retry 429/503 for most methods; every call gets `retry=`.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

from dcx.errors import ProviderError

ENDPOINT_ENV = "DCX_GCP_ENDPOINT"
SCOPES = ["https://www.googleapis.com/auth/compute"]
OPERATION_TIMEOUT = 1200.0  # seconds; a bulkInsert of hundreds of VMs takes minutes


class GcpOperationError(ProviderError):
    """An operation that finished (DONE) with an error."""


def new_request_id() -> str:
    return str(uuid.uuid4())


def derived_request_id(*parts: str) -> str:
    """A stable request id (the API wants a UUID): a retried or repeated call is not done twice."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "dcx:" + "/".join(parts)))


def load_credentials() -> tuple[Any, str]:
    """(credentials, project of the credentials or "") from ADC; one clear line when there are none."""
    import google.auth
    from google.auth import exceptions as auth_exceptions

    try:
        credentials, project = google.auth.default(scopes=SCOPES)
    except auth_exceptions.DefaultCredentialsError as exc:
        detail = str(exc).split("\n")[0][:200]
        if "was not found" in detail or "does not exist" in detail or "is not a valid" in detail:
            # GOOGLE_APPLICATION_CREDENTIALS names a file that is missing or malformed: say which.
            raise ProviderError(f"Google credentials could not be loaded: {detail}",
                                hint="fix GOOGLE_APPLICATION_CREDENTIALS, or run "
                                     "`gcloud auth application-default login`") from None
        raise ProviderError("no Google credentials: run `gcloud auth application-default login` or set "
                            "GOOGLE_APPLICATION_CREDENTIALS",
                            hint="GOOGLE_APPLICATION_CREDENTIALS names a service-account key file (JSON)") from None
    return credentials, project or ""


def default_retry() -> Any:
    from google.api_core import exceptions as gexc
    from google.api_core.retry import Retry, if_exception_type

    return Retry(predicate=if_exception_type(gexc.TooManyRequests, gexc.ServiceUnavailable,
                                             gexc.InternalServerError, gexc.BadGateway, gexc.GatewayTimeout),
                 initial=1.0, maximum=30.0, multiplier=2.0, timeout=600.0)


class Api:
    """Clients sharing one set of credentials, endpoint and retry policy."""

    def __init__(self) -> None:
        self._credentials: Any = None
        self.credentials_project = ""
        self._clients: dict[str, Any] = {}
        self.retry = None
        self.endpoint = os.environ.get(ENDPOINT_ENV, "").strip()

    def ensure_credentials(self) -> None:
        if self._credentials is None:
            self._credentials, self.credentials_project = load_credentials()
            self.retry = default_retry()

    def identity(self) -> str:
        """Who the credentials are: a service account's email, else "" (a user's ADC does not say it
        without a call to Google's token-info endpoint)."""
        self.ensure_credentials()
        email = getattr(self._credentials, "service_account_email", "") or ""
        return "" if email == "default" else str(email)

    def client(self, name: str) -> Any:
        """A compute_v1 client by class name (InstancesClient, FirewallsClient, ...), made once."""
        if name not in self._clients:
            self.ensure_credentials()
            from google.cloud import compute_v1

            options = {"api_endpoint": self.endpoint} if self.endpoint else None
            self._clients[name] = getattr(compute_v1, name)(credentials=self._credentials, client_options=options)
        return self._clients[name]

    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """Turn API and auth failures into one-line ProviderErrors naming what was being done."""
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as auth_exceptions

        try:
            yield
        except gexc.GoogleAPICallError as exc:
            raise ProviderError(f"GCP {what}: {_api_message(exc)}", hint=_hint(exc)) from None
        except gexc.RetryError as exc:
            cause = exc.cause if isinstance(exc.cause, gexc.GoogleAPICallError) else None
            raise ProviderError(f"GCP {what}: gave up after retries"
                                + (f": {_api_message(cause)}" if cause else "")) from None
        except auth_exceptions.RefreshError as exc:
            first = str(exc).split("\n")[0][:160]
            raise ProviderError(f"GCP {what}: the Google credentials were refused when getting a token ({first})",
                                hint="run `gcloud auth application-default login` again, or check "
                                     "GOOGLE_APPLICATION_CREDENTIALS") from None
        except auth_exceptions.TransportError as exc:
            raise ProviderError(f"GCP {what}: cannot reach the Google token service "
                                f"({type(exc).__name__})") from None

    # --- operations -----------------------------------------------------------------------------

    def wait(self, project: str, op: Any, what: str, timeout: float = OPERATION_TIMEOUT) -> Any:
        """Wait until the operation is DONE; raise a ProviderError with its first error."""
        from google.cloud import compute_v1

        done = compute_v1.Operation.Status.DONE
        deadline = time.monotonic() + timeout
        with self.errors(what):
            while op.status != done:
                if time.monotonic() > deadline:
                    raise ProviderError(f"GCP {what}: operation {op.name} not done after {int(timeout)} s")
                # `wait` returns when the operation is done or after about two minutes: loop.
                if op.zone:
                    op = self.client("ZoneOperationsClient").wait(
                        project=project, zone=op.zone.rsplit("/", 1)[1], operation=op.name, retry=self.retry)
                elif op.region:
                    op = self.client("RegionOperationsClient").wait(
                        project=project, region=op.region.rsplit("/", 1)[1], operation=op.name, retry=self.retry)
                else:
                    op = self.client("GlobalOperationsClient").wait(project=project, operation=op.name,
                                                                    retry=self.retry)
        if op.error and op.error.errors:
            first = op.error.errors[0]
            more = f" (and {len(op.error.errors) - 1} more)" if len(op.error.errors) > 1 else ""
            raise GcpOperationError(f"GCP {what}: {first.code}: {first.message}{more}", hint=_op_hint(first.code))
        return op


def is_not_found(exc: BaseException) -> bool:
    from google.api_core import exceptions as gexc

    return isinstance(exc, gexc.NotFound)


def _api_message(exc: Any) -> str:
    message = getattr(exc, "message", "") or str(exc)
    return f"{getattr(exc, 'code', '')} {message}".strip().split("\n")[0][:300]


def _hint(exc: Any) -> str | None:
    from google.api_core import exceptions as gexc

    if isinstance(exc, gexc.Forbidden | gexc.PermissionDenied):
        return "the account needs the Compute Admin role (roles/compute.admin) and the Compute Engine API enabled"
    if isinstance(exc, gexc.Unauthorized):
        return "run `gcloud auth application-default login` again, or check GOOGLE_APPLICATION_CREDENTIALS"
    if isinstance(exc, gexc.NotFound) and "projects/" in str(exc) and "/" not in str(exc).split("projects/")[1][:64]:
        return "check gcp.project (or GOOGLE_CLOUD_PROJECT) and that the Compute Engine API is enabled"
    return None


def _op_hint(code: str) -> str | None:
    if "QUOTA" in code.upper():
        return "raise the quota in the Cloud console (IAM & Admin > Quotas) or use fewer/smaller machines"
    if "ALREADY" in code.upper():
        return ("a resource with that name exists but is not this cluster's (an earlier cluster whose state was "
                "lost?): `dcx cluster destroy -f FILE` removes it")
    return None
