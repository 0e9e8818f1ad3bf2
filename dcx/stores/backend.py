"""What a bucket store must offer: plain object reads and writes, and the conditional writes the lock
is built on (create-if-absent, replace-if-unchanged, delete-if-unchanged). An etag is whatever the
service uses to name one version of an object (S3 ETag, GCS generation, Azure ETag)."""

from __future__ import annotations

from typing import Protocol


class Backend(Protocol):
    url: str

    def list(self, prefix: str) -> list[str]:
        """Keys under prefix (relative to the store's root), all pages."""

    def get(self, key: str) -> tuple[bytes, str] | None:
        """(data, etag), or None when there is no such object."""

    def put(self, key: str, data: bytes) -> str:
        """Write one object whole (a reader sees the old or the new object, never a part); its etag."""

    def delete(self, key: str) -> None: ...

    def create(self, key: str, data: bytes) -> str | None:
        """Write only if no object has that key; the etag, or None when one exists."""

    def replace(self, key: str, data: bytes, etag: str) -> str | None:
        """Write only if the object is still version `etag`; the new etag, or None when it is not (or gone)."""

    def delete_if(self, key: str, etag: str) -> bool:
        """Delete only if the object is still version `etag`; False when it is not."""
