"""Google Cloud Storage (google-cloud-storage, imported only here; STORAGE_EMULATOR_HOST is honoured
by the client). Locking uses generation preconditions (Cloud Storage docs, "Request preconditions"):
`ifGenerationMatch=0` writes only when no live object has the name, `ifGenerationMatch=G` only while
the live object is generation G (or deletes only then); otherwise 412 conditionNotMet. An upload of one
object is atomic: readers see the old or the new generation. The etag dcx keeps is the generation."""

from __future__ import annotations

from typing import Any

from dcx.errors import DcxError, InputError
from dcx.stores import Location


class GCSBackend:
    def __init__(self, loc: Location) -> None:
        try:
            from google.api_core import exceptions as gexc
            from google.cloud import storage
        except ImportError:
            raise InputError("gs:// state stores need google-cloud-storage: pip install google-cloud-storage") from None
        import os

        self._exc = gexc
        self.url = loc.url
        self.prefix = f"{loc.prefix}/" if loc.prefix else ""
        kwargs: dict[str, Any] = {}
        if os.environ.get("STORAGE_EMULATOR_HOST"):  # a local emulator takes no credentials
            from google.auth.credentials import AnonymousCredentials

            kwargs = {"credentials": AnonymousCredentials(), "project": os.environ.get("GOOGLE_CLOUD_PROJECT", "dcx")}
        try:
            self.client = storage.Client(**kwargs)
        except Exception as exc:  # google.auth's DefaultCredentialsError and friends: one line
            raise DcxError(f"state store {self.url}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        self.bucket = self.client.bucket(loc.bucket)

    def _blob(self, key: str) -> Any:
        return self.bucket.blob(self.prefix + key)

    def _fail(self, op: str, exc: Exception) -> DcxError:
        if isinstance(exc, self._exc.NotFound) and op == "list":
            return InputError(f"state store {self.url}: bucket '{self.bucket.name}' does not exist")
        return DcxError(f"state store {self.url}: {op} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")

    def list(self, prefix: str) -> list[str]:
        try:
            return [b.name[len(self.prefix):] for b in self.client.list_blobs(self.bucket, prefix=self.prefix + prefix)]
        except self._exc.GoogleAPIError as exc:
            raise self._fail("list", exc) from None

    def get(self, key: str) -> tuple[bytes, str] | None:
        # The generation from the object's metadata, then the bytes of exactly that generation (a write
        # in between: 412, read again), so data and etag always belong together.
        for _ in range(5):
            try:
                blob = self.bucket.get_blob(self.prefix + key)
                if blob is None:
                    return None
                generation = blob.generation  # (a download may reset it from its own headers)
                return blob.download_as_bytes(if_generation_match=generation), str(generation)
            except (self._exc.NotFound, self._exc.PreconditionFailed):
                continue
            except self._exc.GoogleAPIError as exc:
                raise self._fail("get", exc) from None
        raise DcxError(f"state store {self.url}: {key} kept changing while being read")

    def _upload(self, key: str, data: bytes, **cond: int) -> str | None:
        blob = self._blob(key)
        try:
            blob.upload_from_string(data, content_type="application/octet-stream", **cond)
        except (self._exc.PreconditionFailed, self._exc.NotFound):
            if cond:
                return None
            raise
        except self._exc.GoogleAPIError as exc:
            raise self._fail("put", exc) from None
        return str(blob.generation)

    def put(self, key: str, data: bytes) -> str:
        got = self._upload(key, data)
        assert got is not None
        return got

    def delete(self, key: str) -> None:
        try:
            self._blob(key).delete()
        except self._exc.NotFound:
            pass
        except self._exc.GoogleAPIError as exc:
            raise self._fail("delete", exc) from None

    def create(self, key: str, data: bytes) -> str | None:
        return self._upload(key, data, if_generation_match=0)

    def replace(self, key: str, data: bytes, etag: str) -> str | None:
        return self._upload(key, data, if_generation_match=int(etag))

    def delete_if(self, key: str, etag: str) -> bool:
        try:
            self._blob(key).delete(if_generation_match=int(etag))
        except (self._exc.PreconditionFailed, self._exc.NotFound):
            return False
        except self._exc.GoogleAPIError as exc:
            raise self._fail("delete", exc) from None
        return True
