"""Azure Blob Storage (azure-storage-blob, imported only here). az://ACCOUNT/CONTAINER/PREFIX reaches
https://ACCOUNT.blob.core.windows.net with DefaultAzureCredential, or the account of
AZURE_STORAGE_CONNECTION_STRING when set (an account key or SAS; also how Azurite is reached).

Locking uses Blob conditional headers (Blob service REST API, "Specifying conditional headers for Blob
service operations"; Put Blob and Delete Blob): `If-None-Match: *` writes only when no blob has the
name, `If-Match: ETAG` writes or deletes only while the blob is that version; otherwise 409
BlobAlreadyExists / 412 ConditionNotMet. A Put Blob of one block blob replaces it whole (atomic)."""

from __future__ import annotations

import os
from typing import Any

from dcx.errors import DcxError, InputError
from dcx.stores import Location


class AzureBlobBackend:
    def __init__(self, loc: Location) -> None:
        try:
            from azure.core import MatchConditions
            from azure.core import exceptions as aexc
            from azure.storage.blob import BlobServiceClient
        except ImportError:
            raise InputError("az:// state stores need azure-storage-blob: pip install azure-storage-blob") from None
        self._exc, self._match = aexc, MatchConditions
        self.url = loc.url
        account, container = loc.bucket.split("/", 1)
        self.prefix = f"{loc.prefix}/" if loc.prefix else ""
        conn = os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "")
        try:
            if conn:
                service = BlobServiceClient.from_connection_string(conn)
                if service.account_name != account:
                    raise InputError(f"state store {self.url}: AZURE_STORAGE_CONNECTION_STRING is for account "
                                     f"'{service.account_name}', not '{account}'")
            else:
                service = BlobServiceClient(f"https://{account}.blob.core.windows.net", credential=self._credential())
        except ValueError as exc:
            raise InputError(f"state store {self.url}: AZURE_STORAGE_CONNECTION_STRING: {exc}") from None
        self.container = service.get_container_client(container)

    def _credential(self) -> Any:
        """DefaultAzureCredential with a token obtained once: no credential is one line at once, not the
        SDK's multi-line warnings on the terminal for every retry of the first call (~90 s)."""
        from azure.identity import DefaultAzureCredential

        from dcx.log import log
        from dcx.providers.azure_api import CREDENTIAL_HINT, route_sdk_logs

        route_sdk_logs(log)  # the chain's warnings go to the run log
        credential = DefaultAzureCredential(exclude_interactive_browser_credential=True)
        try:
            credential.get_token("https://storage.azure.com/.default")
        except self._exc.ClientAuthenticationError as exc:
            first = (str(exc).splitlines() or [""])[0][:200]
            raise DcxError(f"state store {self.url}: no usable Azure credentials ({first})",
                           hint=CREDENTIAL_HINT + ", or set AZURE_STORAGE_CONNECTION_STRING") from None
        return credential

    def _blob(self, key: str) -> Any:
        return self.container.get_blob_client(self.prefix + key)

    def _fail(self, op: str, exc: Exception) -> DcxError:
        if isinstance(exc, self._exc.ResourceNotFoundError) and "ContainerNotFound" in str(exc):
            return InputError(f"state store {self.url}: container '{self.container.container_name}' does not exist")
        first = str(exc).splitlines()[0] if str(exc) else ""
        return DcxError(f"state store {self.url}: {op} failed: {type(exc).__name__}: {first}")

    def list(self, prefix: str) -> list[str]:
        try:
            return [b.name[len(self.prefix):] for b in self.container.list_blobs(name_starts_with=self.prefix + prefix)]
        except self._exc.AzureError as exc:
            raise self._fail("list", exc) from None

    def get(self, key: str) -> tuple[bytes, str] | None:
        try:
            stream = self._blob(key).download_blob()
            return stream.readall(), stream.properties.etag
        except self._exc.ResourceNotFoundError as exc:
            if "ContainerNotFound" in str(exc):
                raise self._fail("get", exc) from None
            return None
        except self._exc.AzureError as exc:
            raise self._fail("get", exc) from None

    def _upload(self, key: str, data: bytes, **cond: Any) -> str | None:
        try:
            return self._blob(key).upload_blob(data, overwrite=True, **cond)["etag"]
        except (self._exc.ResourceModifiedError, self._exc.ResourceExistsError, self._exc.ResourceNotFoundError) as exc:
            if cond and "ContainerNotFound" not in str(exc):
                return None
            raise self._fail("put", exc) from None
        except self._exc.AzureError as exc:
            raise self._fail("put", exc) from None

    def put(self, key: str, data: bytes) -> str:
        got = self._upload(key, data)
        assert got is not None
        return got

    def delete(self, key: str) -> None:
        try:
            self._blob(key).delete_blob()
        except self._exc.ResourceNotFoundError:
            pass
        except self._exc.AzureError as exc:
            raise self._fail("delete", exc) from None

    def create(self, key: str, data: bytes) -> str | None:
        return self._upload(key, data, match_condition=self._match.IfMissing)  # If-None-Match: *

    def replace(self, key: str, data: bytes, etag: str) -> str | None:
        return self._upload(key, data, etag=etag, match_condition=self._match.IfNotModified)

    def delete_if(self, key: str, etag: str) -> bool:
        try:
            self._blob(key).delete_blob(etag=etag, match_condition=self._match.IfNotModified)
        except (self._exc.ResourceModifiedError, self._exc.ResourceNotFoundError):
            return False
        except self._exc.AzureError as exc:
            raise self._fail("delete", exc) from None
        return True
