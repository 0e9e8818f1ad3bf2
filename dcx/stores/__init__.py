"""Where clusters' state lives: a directory (the default, DCX_HOME) or a bucket.

`--state URL` / `DCX_STATE`: a path (or file://PATH), `s3://bucket/prefix`, `gs://bucket/prefix` or
`az://account/container/prefix`. A bucket store is mirrored: a locked command downloads the cluster's
objects into a private working directory under DCX_HOME/cache/, runs exactly as against a local
directory, and uploads what changed on every state save and at its end (see mirror.py). The cloud
SDK of a store is imported only when that store is used.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from dcx.errors import InputError

SCHEMES = ("s3", "gs", "az")


@dataclass(frozen=True)
class Location:
    scheme: str  # "" for a directory
    bucket: str = ""  # az: "ACCOUNT/CONTAINER"
    prefix: str = ""  # no leading or trailing "/"
    path: str = ""  # a directory store's path

    @property
    def url(self) -> str:
        if not self.scheme:
            return self.path
        return f"{self.scheme}://{self.bucket}/{self.prefix}".rstrip("/")


def parse_url(url: str) -> Location:
    """A store URL, or an InputError (exit 2) naming what is wrong with it."""
    if "://" not in url or url.startswith("file://"):
        path = url.removeprefix("file://")
        if not path:
            raise InputError("--state/DCX_STATE: empty path")
        return Location("", path=str(Path(path).expanduser()))
    scheme, rest = url.split("://", 1)
    if scheme not in SCHEMES:
        raise InputError(f"--state/DCX_STATE: '{scheme}://' is not a store: use a directory, s3://BUCKET/PREFIX, "
                         "gs://BUCKET/PREFIX or az://ACCOUNT/CONTAINER/PREFIX")
    parts = [p for p in rest.split("/") if p]
    need = 2 if scheme == "az" else 1
    if len(parts) < need or any(p in (".", "..") for p in parts):
        shape = "az://ACCOUNT/CONTAINER/PREFIX" if scheme == "az" else f"{scheme}://BUCKET/PREFIX"
        raise InputError(f"--state/DCX_STATE: '{url}' is not {shape}")
    return Location(scheme, "/".join(parts[:need]), "/".join(parts[need:]))


def cache_root(home: Path, loc: Location) -> Path:
    """The private working directory of a bucket store on this machine (one per store URL)."""
    digest = hashlib.sha256(loc.url.encode()).hexdigest()[:16]
    return home / "cache" / f"{loc.scheme}-{digest}"


def machine_root(loc: Location) -> Path:
    """Where a bucket store's machine-local provider files live on this machine (not under DCX_HOME,
    which a CI runner may lose while the machines live on): DCX_MACHINE_DIR, else root's
    /var/lib/dcx/machines, else the user's state dir."""
    import platformdirs

    default = "/var/lib/dcx/machines" if os.geteuid() == 0 else f"{platformdirs.user_state_dir('dcx')}/machines"
    return Path(os.environ.get("DCX_MACHINE_DIR") or default) / cache_root(Path(), loc).name


_MIRRORS: dict[str, object] = {}


def open_mirror(url: str, home: Path):  # -> dcx.stores.mirror.Mirror (imported lazily: it is cheap, the SDKs are not)
    """The one Mirror of a bucket store in this process (it remembers what it downloaded)."""
    from dcx.stores.crypto import check_kms
    from dcx.stores.mirror import Mirror

    loc = parse_url(url)
    check_kms(loc.scheme)  # DCX_STATE_KMS_KEY with a gs:// or az:// store: one line, exit 2, before anything
    key = f"{loc.url}|{home}"
    if key not in _MIRRORS:
        _MIRRORS[key] = Mirror(backend_for(loc), cache_root(home, loc), machine_root(loc))
    return _MIRRORS[key]


def backend_for(loc: Location):  # -> dcx.stores.backend.Backend
    if loc.scheme == "s3":
        from dcx.stores.s3 import S3Backend

        return S3Backend(loc)
    if loc.scheme == "gs":
        from dcx.stores.gcs import GCSBackend

        return GCSBackend(loc)
    from dcx.stores.azure_blob import AzureBlobBackend

    return AzureBlobBackend(loc)


def state_url() -> str:
    return os.environ.get("DCX_STATE", "")


def is_remote(url: str) -> bool:
    return bool(url) and parse_url(url).scheme != ""


def give_up_locks() -> list[str]:
    """--timeout ran out: every bucket store lock this process holds is released after what its run saved
    is pushed (dcx.deadline). Returns the clusters whose lock could not be released."""
    left: list[str] = []
    for mirror in list(_MIRRORS.values()):
        left += mirror.give_up()  # type: ignore[attr-defined]
    return left
