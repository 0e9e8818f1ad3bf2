"""S3 (or any endpoint speaking its API: AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 are honoured by boto3).

Locking uses S3's conditional writes (S3 User Guide, "Add preconditions to S3 operations with
conditional requests"): PutObject with `If-None-Match: *` fails with 412 PreconditionFailed when the key
exists, with `If-Match: ETAG` when the object is another version (404 NoSuchKey when it is gone); two
concurrent conditional writes may also see 409 ConditionalRequestConflict, which asks for a retry.
DeleteObject takes `If-Match` too. A PutObject of one object is atomic: no partial object is readable.
"""

from __future__ import annotations

import time
from typing import Any

from dcx.errors import DcxError, InputError
from dcx.stores import Location

RETRIES = 5


class S3Backend:
    def __init__(self, loc: Location) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:  # pragma: no cover - boto3 is a dependency
            raise InputError("s3:// state stores need boto3: pip install boto3") from None
        self.url = loc.url
        self.bucket = loc.bucket
        self.prefix = f"{loc.prefix}/" if loc.prefix else ""
        self.client = boto3.client("s3", config=Config(retries={"mode": "adaptive", "max_attempts": 5}))

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _call(self, op: str, **kw: Any) -> Any:
        """One S3 call; transport and permission failures become one line naming the store."""
        from botocore.exceptions import BotoCoreError, ClientError

        for attempt in range(RETRIES):
            try:
                return getattr(self.client, op)(Bucket=self.bucket, **kw)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code == "ConditionalRequestConflict" and attempt < RETRIES - 1:
                    time.sleep(0.2 * (attempt + 1))  # 409: a concurrent conditional write; S3 asks for a retry
                    continue
                if code in ("PreconditionFailed", "NoSuchKey", "404", "ConditionalRequestConflict"):
                    raise
                if code == "NoSuchBucket":
                    raise InputError(f"state store {self.url}: bucket '{self.bucket}' does not exist") from None
                raise DcxError(f"state store {self.url}: {op} failed: {code}: "
                               f"{exc.response.get('Error', {}).get('Message', '')}") from None
            except BotoCoreError as exc:
                raise DcxError(f"state store {self.url}: {exc}") from None
        raise AssertionError("unreachable")

    @staticmethod
    def _code(exc: Exception) -> str:
        return getattr(exc, "response", {}).get("Error", {}).get("Code", "")

    def list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        token: dict[str, str] = {}
        while True:
            page = self._call("list_objects_v2", Prefix=self._key(prefix), **token)
            keys += [o["Key"][len(self.prefix):] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return keys
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def get(self, key: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        try:
            r = self._call("get_object", Key=self._key(key))
        except ClientError:
            return None
        return r["Body"].read(), r["ETag"]

    def put(self, key: str, data: bytes) -> str:
        return self._call("put_object", Key=self._key(key), Body=data)["ETag"]

    def delete(self, key: str) -> None:
        self._call("delete_object", Key=self._key(key))

    def create(self, key: str, data: bytes) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self._call("put_object", Key=self._key(key), Body=data, IfNoneMatch="*")["ETag"]
        except ClientError as exc:
            if self._code(exc) in ("PreconditionFailed", "ConditionalRequestConflict"):
                return None
            raise

    def replace(self, key: str, data: bytes, etag: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self._call("put_object", Key=self._key(key), Body=data, IfMatch=etag)["ETag"]
        except ClientError as exc:
            if self._code(exc) in ("PreconditionFailed", "NoSuchKey", "404", "ConditionalRequestConflict"):
                return None
            raise

    def delete_if(self, key: str, etag: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._call("delete_object", Key=self._key(key), IfMatch=etag)
        except ClientError as exc:
            if self._code(exc) in ("PreconditionFailed", "NoSuchKey", "404", "ConditionalRequestConflict"):
                return False
            raise
        return True
